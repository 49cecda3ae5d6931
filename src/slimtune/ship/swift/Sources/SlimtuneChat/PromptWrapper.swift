import Foundation

/// The training chat template as plain string building, read from prompt_format.json.
///
/// slimtune matched the Jinja template against ChatML and Llama-3 headers at export (the check
/// the Ollama Modelfile uses); `family` is nil when it is neither, and then
/// `SlimtuneChat` renders prompts with the tokenizer's own Jinja template instead.
public struct PromptWrapper: Decodable {
    public let family: String?        // "chatml" | "llama3" | nil
    public let prefix: String         // text the template writes before the first turn (a BOS)
    public let defaultSystem: String? // system prompt the template injects when none is given
    public let stopIds: [Int]         // end of turn and eos: generation stops on any of them

    enum CodingKeys: String, CodingKey {
        case family, prefix
        case defaultSystem = "default_system"
        case stopIds = "stop_ids"
    }

    public static func load(folder: URL) throws -> PromptWrapper {
        let data = try Data(contentsOf: folder.appendingPathComponent("prompt_format.json"))
        return try JSONDecoder().decode(PromptWrapper.self, from: data)
    }

    /// messages: [["role": "system" | "user" | "assistant", "content": text]], ending with a user
    /// turn -> the prompt text, ending with the assistant header.
    public func render(_ messages: [[String: String]]) -> String? {
        var turns = messages
        if let system = defaultSystem, turns.first?["role"] != "system" {
            turns.insert(["role": "system", "content": system], at: 0)
        }
        switch family {
        case "chatml":
            return prefix + turns.map { "<|im_start|>\($0["role"]!)\n\($0["content"]!)<|im_end|>\n" }.joined()
                + "<|im_start|>assistant\n"
        case "llama3":
            return prefix + turns.map { "<|start_header_id|>\($0["role"]!)<|end_header_id|>\n\n\($0["content"]!)<|eot_id|>" }.joined()
                + "<|start_header_id|>assistant<|end_header_id|>\n\n"
        default:
            return nil
        }
    }
}
