"""Generation and chat with the training template.

Prompts are always rendered by `data.render.render_prompt` (the chat template plus the assistant
header), so what the model sees at inference is what it saw in training. Generation stops on eos
or on the template's end-of-turn token (found by rendering a one-turn chat, as training does).
Works on plain and merged models and on every PEFT adapter: PEFT's generate adds soft prompts
and prefixes itself.
"""

from __future__ import annotations

import sys
import time

import torch

from .data.render import IGNORE, render_chat, render_prompt
from .errors import DataError

Messages = list[dict[str, str]]


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an answer: eos, the template's end-of-turn token, the model's eos.

    The end-of-turn token is the last trained token of a rendered assistant turn (e.g.
    <|im_end|>, or <|eot_id|> for Llama 3, which is not its eos).
    """
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    _, labels = render_chat(chat, tokenizer, train_on="last")
    trained = [t for t in labels if t != IGNORE]
    if trained:
        ids.add(trained[-1])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])
    return sorted(ids)


def generate(model, tokenizer, messages: Messages, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, streamer=None, top_k: int = 0, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0) -> dict:
    """Answer the chat `messages` (ending with a user turn), one prompt, streamed if `streamer`.

    temperature 0 is greedy; > 0 samples, reproducibly for a given seed (the global RNG is left
    as it was). top_k 0, repetition_penalty 1 and no_repeat_ngram_size 0 are off. Many prompts at
    once: `fastgen.generate_many` (same answers, several times faster). Returns {text, n_tokens, ended, seconds}: text without the end-of-turn token
    (other special tokens are kept, so stray template tags stay visible); n_tokens generated
    tokens, the end-of-turn token included; ended True when it stopped on an end-of-turn token
    rather than the token limit.
    """
    from transformers import GenerationConfig

    ids = render_prompt(messages, tokenizer)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    stops = stop_ids(tokenizer, model)
    sample = temperature > 0
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                               temperature=temperature if sample else None, top_p=top_p if sample else None,
                               top_k=top_k or None, repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
                               no_repeat_ngram_size=no_repeat_ngram_size or None, eos_token_id=stops,
                               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=gen_cfg, streamer=streamer)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    new = out[0, input_ids.shape[1]:].tolist()  # PEFT and plain models both return prompt + new
    ended = bool(new) and new[-1] in stops
    text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False)
    return {"text": text.strip(), "n_tokens": len(new), "ended": ended, "seconds": seconds}


def load_prompts(spec: str, limit: int | None = None, system_prompt: str | None = None) -> list[Messages]:
    """Chats to answer, each ending with a user turn, from a file or `builtin:eval_prompts`.

    Rows: {"prompt": str}, {"messages": [...]} (a trailing assistant turn is dropped), alpaca /
    dolly {"instruction", "input"/"context"}; a .txt file is one prompt per line.
    system_prompt is added to chats without a system turn (as data.system_prompt is in training).
    """
    from .data.formats import read_rows, resolve_path, with_system

    path = resolve_path(spec)
    if path.suffix == ".txt":
        rows = [(i, {"prompt": line}) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    else:
        rows = read_rows(path)
    chats = []
    for line, row in rows:
        if isinstance(row.get("prompt"), str):
            msgs = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("messages"), list):
            msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
        elif isinstance(row.get("instruction"), str):
            extra = row.get("input") or row.get("context") or ""
            msgs = [{"role": "user", "content": f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]}]
        else:
            raise DataError("expected a 'prompt' string, 'messages', or 'instruction'", path=str(path), line=line)
        if not msgs or msgs[-1]["role"] != "user":
            raise DataError("the chat must end with a user turn to be answered", path=str(path), line=line)
        chats.append(with_system(msgs, system_prompt))
        if limit and len(chats) >= limit:
            break
    return chats


def last_user(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
              seed: int = 0, read=input, out=sys.stdout, **knobs) -> Messages:
    """Interactive multi-turn chat, answers streamed as they are generated. Returns the history.

    Commands: /reset (forget the conversation, keep the system prompt), /exit (or Ctrl-D).
    knobs: top_p, top_k, repetition_penalty, no_repeat_ngram_size for `generate`.
    """
    from .data.formats import with_system

    start = with_system([], system)
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
    """Prints the answer to `out` as it is generated (the `streamer` protocol of HF generate).

    The first `put` is the prompt and is skipped; text ending in a partial UTF-8 character waits.
    """

    def __init__(self, tokenizer, out):
        self.tok, self.out, self.ids, self.shown, self.prompt = tokenizer, out, [], 0, True

    def put(self, value):
        if self.prompt:  # the first call carries the prompt
            self.prompt = False
            return
        self.ids += value.reshape(-1).tolist()
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
