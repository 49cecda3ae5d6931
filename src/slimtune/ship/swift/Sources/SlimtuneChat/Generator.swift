import CoreML
import Foundation

/// Greedy decoding on the stateful model: the KV cache lives in an MLState.
///
/// Model.mlpackage computes `logits` (1, T, vocab) for `inputIds` (1, T) at positions
/// END - T ..< END, given `causalMask` (1, 1, T, END); it writes their keys and values into the
/// `keyCache` / `valueCache` states. The prompt is one call (T = END = its length), then each
/// new token one call (T = 1, END + 1). slimtune checks this same loop in torch
/// (slimtune/ship/coreml_model.py: stateful_greedy) against transformers.
public final class Generator {
    public let model: MLModel
    public let context: Int

    /// function: "ctx_2048", "ctx_4096", ... (one per context length); compute units left to Core ML.
    public init(package: URL, function: String, computeUnits: MLComputeUnits = .all) async throws {
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits
        config.functionName = function
        let compiled = try await MLModel.compileModel(at: package)
        model = try await MLModel.load(contentsOf: compiled, configuration: config)
        context = Int(function.split(separator: "_").last ?? "") ?? 2048
    }

    public func greedy(prompt: [Int], maxNewTokens: Int, stopIds: Set<Int>) throws -> [Int] {
        let state = model.makeState()  // a fresh, empty KV cache
        var logits = try step(prompt, end: prompt.count, state: state)
        var out: [Int] = []
        var end = prompt.count
        for _ in 0..<maxNewTokens {
            let next = lastRowArgmax(logits)
            out.append(next)
            if stopIds.contains(next) || end >= context { break }
            end += 1
            logits = try step([next], end: end, state: state)
        }
        return out
    }

    func step(_ ids: [Int], end: Int, state: MLState) throws -> MLMultiArray {
        let T = ids.count
        let input = try MLMultiArray(shape: [1, NSNumber(value: T)], dataType: .int32)
        for (i, id) in ids.enumerated() { input[i] = NSNumber(value: id) }
        // 0 where token t (position end - T + t) may look at position s, a large negative after it
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: T), NSNumber(value: end)], dataType: .float16)
        let start = end - T
        for t in 0..<T {
            for s in 0..<end { mask[t * end + s] = NSNumber(value: s <= start + t ? 0.0 : -1e4) }
        }
        let features = try MLDictionaryFeatureProvider(dictionary: ["inputIds": input, "causalMask": mask])
        let result = try model.prediction(from: features, using: state)
        return result.featureValue(for: "logits")!.multiArrayValue!
    }

    func lastRowArgmax(_ logits: MLMultiArray) -> Int {
        let T = logits.shape[1].intValue, V = logits.shape[2].intValue
        let s1 = logits.strides[1].intValue, s2 = logits.strides[2].intValue
        var best = 0
        var bestValue = -Float.infinity
        logits.withUnsafeBufferPointer(ofType: Float16.self) { p in
            for v in 0..<V {
                let x = Float(p[(T - 1) * s1 + v * s2])
                if x > bestValue { bestValue = x; best = v }
            }
        }
        return best
    }
}
