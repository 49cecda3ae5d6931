import Foundation
import SlimtuneChat

// slimtune-chat EXPORT_FOLDER "question" [function]   e.g. slimtune-chat .. "Hi" ctx_4096
let args = CommandLine.arguments
guard args.count >= 3 else {
    print("usage: slimtune-chat EXPORT_FOLDER \"question\" [ctx_2048|ctx_4096]")
    exit(2)
}
let chat = try await SlimtuneChat(folder: URL(fileURLWithPath: args[1]),
                                  function: args.count > 3 ? args[3] : "ctx_2048")
print(try await chat.reply(to: [["role": "user", "content": args[2]]]))
