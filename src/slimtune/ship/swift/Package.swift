// swift-tools-version:5.10
// Written by `slimtune export --format coreml`: loads ../Model.mlpackage and chats with it greedily.
import PackageDescription

let package = Package(
    name: "SlimtuneChat",
    platforms: [.macOS(.v15), .iOS(.v18)],  // stateful Core ML models (the KV cache) need these
    products: [
        .library(name: "SlimtuneChat", targets: ["SlimtuneChat"]),
        .executable(name: "slimtune-chat", targets: ["slimtune-chat"]),
    ],
    dependencies: [
        // tokenizer.json + chat template reader (BPE, added tokens, Jinja)
        .package(url: "https://github.com/huggingface/swift-transformers", from: "1.0.0"),
    ],
    targets: [
        .target(name: "SlimtuneChat", dependencies: [.product(name: "Transformers", package: "swift-transformers")]),
        .executableTarget(name: "slimtune-chat", dependencies: ["SlimtuneChat"]),
    ]
)
