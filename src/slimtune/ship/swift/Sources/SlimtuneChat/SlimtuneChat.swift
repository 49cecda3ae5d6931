import CoreML
import Foundation
import Tokenizers

/// The exported folder as one object: tokenizer, prompt wrapper, model.
///
///     let chat = try await SlimtuneChat(folder: URL(fileURLWithPath: "export"))
///     print(try await chat.reply(to: [["role": "user", "content": "Hi"]]))
public final class SlimtuneChat {
    public let tokenizer: any Tokenizer
    public let wrapper: PromptWrapper
    public let generator: Generator

    /// folder: the export (Model.mlpackage, tokenizer files, prompt_format.json);
    /// function: a context length's function ("ctx_2048" by default, "ctx_4096", ...).
    public init(folder: URL, function: String = "ctx_2048", computeUnits: MLComputeUnits = .all) async throws {
        tokenizer = try await AutoTokenizer.from(modelFolder: folder)
        wrapper = try PromptWrapper.load(folder: folder)
        generator = try await Generator(package: folder.appendingPathComponent("Model.mlpackage"),
                                        function: function, computeUnits: computeUnits)
    }

    /// Token ids of the chat with the assistant header, as slimtune rendered them in training.
    public func promptIds(_ messages: [[String: String]]) throws -> [Int] {
        if let text = wrapper.render(messages) {
            return tokenizer.encode(text: text, addSpecialTokens: false)
        }
        return try tokenizer.applyChatTemplate(messages: messages)  // the Jinja template itself
    }

    public func reply(to messages: [[String: String]], maxNewTokens: Int = 256) async throws -> String {
        let ids = try generator.greedy(prompt: try promptIds(messages), maxNewTokens: maxNewTokens,
                                       stopIds: Set(wrapper.stopIds))
        return tokenizer.decode(tokens: ids.filter { !wrapper.stopIds.contains($0) })
    }
}
