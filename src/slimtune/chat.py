"""Interactive chat with a run or a model, answers streamed through the training template."""

from __future__ import annotations

import sys

from .data.formats import with_system
from .generate import generate, keep_decoders

Messages = list[dict[str, str]]


def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
              seed: int = 0, read=input, out=sys.stdout, **knobs) -> Messages:
    """Interactive multi-turn chat, answers streamed as they are generated. Returns the history.

    Commands: /reset (forget the conversation, keep the system prompt), /exit (or Ctrl-D).
    knobs: top_p, top_k, repetition_penalty, no_repeat_ngram_size for `generate`.
    """
    with keep_decoders():  # the weights stay fixed while chatting: one decoder build, not one per turn
        return _turns(model, tokenizer, with_system([], system), max_new_tokens, temperature, seed, read, out, knobs)


def _turns(model, tokenizer, start: Messages, max_new_tokens, temperature, seed, read, out, knobs) -> Messages:
    messages = list(start)
    print("chat: /reset starts over, /exit quits", file=out, flush=True)
    turn = 0
    while True:
        try:
            line = read("you> ")
        except EOFError:
            print(file=out)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            print("(conversation reset)", file=out, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        print("bot> ", end="", file=out, flush=True)
        res = generate(model, tokenizer, messages, max_new_tokens, temperature, seed=seed + turn,
                       streamer=Streamer(tokenizer, out), **knobs)
        if not res["ended"]:
            print(f"[stopped at {max_new_tokens} tokens]", file=out, flush=True)
        messages.append({"role": "assistant", "content": res["text"]})
        turn += 1
    return messages


class Streamer:
    """Prints the answer to `out` as it is generated: `put(new ids)` after each step, `end()`.

    Text ending in a partial UTF-8 character waits for the next token.
    """

    def __init__(self, tokenizer, out):
        self.tok, self.out, self.ids, self.shown = tokenizer, out, [], 0

    def put(self, ids: list[int]):
        self.ids += list(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def end(self):
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()
