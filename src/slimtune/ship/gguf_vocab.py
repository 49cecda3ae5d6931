"""The tokenizer as GGUF metadata, under llama.cpp's keys (what convert_hf_to_gguf.py writes).

A GGUF carries no tokenizer.json: a byte-level BPE tokenizer travels as
    tokenizer.ggml.model = "gpt2", .pre (llama.cpp's name for the pre-tokenizer regex),
    .tokens (one string per embedding row, in the byte-level spelling: " the" -> "Ġthe"),
    .token_type (1 normal, 3 control = special added token, 4 user-defined = plain added token,
    5 unused = a padding row with no token), .merges ("a b"), special token ids, add_bos/add_eos,
    and tokenizer.chat_template.
Readers rebuild the split regex from `.pre`, so it has to name the regex the tokenizer really
uses; an unknown pre-tokenizer is refused rather than guessed.
"""

from __future__ import annotations

import json

from ..errors import SlimtuneError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Split regexes as they appear in tokenizer.json, and llama.cpp's names for them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
SUPPORTED = ("byte-level BPE with the GPT-2 regex (gpt-2), digits split then GPT-2 (smollm), "
             "the Llama-3 regex (llama-bpe) or the Qwen2 regex (qwen2)")


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json `pre_tokenizer` block."""
    def is_byte_level(p, regex):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex and not p.get("add_prefix_space")

    if pre and is_byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and is_byte_level(steps[1], True):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and is_byte_level(steps[1], False):
        name = SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name and steps[0].get("behavior") == "Isolated":
            return name
    raise SlimtuneError(f"cannot describe this tokenizer's pre-tokenizer to llama.cpp "
                        f"({json.dumps(pre)[:200]}); GGUF export supports {SUPPORTED}")


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the chat template (<|im_end|>,
    <|eot_id|>), found by rendering one; None when the template closes turns with plain text."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Banana"}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # a template that rejects this chat: leave the end of turn to the reader
        return None
    if "Banana" not in text:
        return None
    after = text[text.rindex("Banana") + len("Banana"):]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special), None)


def vocab_metadata(tokenizer, n_vocab: int) -> dict:
    """Everything `tokenizer.*` in the GGUF, as {key: value} for `add_vocab`.

    n_vocab: rows of the embedding matrix; token ids the tokenizer does not use become
    `[PAD<i>]` rows of type unused (as convert_hf_to_gguf.py pads Qwen's 151,936 rows).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise SlimtuneError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise SlimtuneError(f"GGUF export supports byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2/3); "
                            f"this one is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}")
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise SlimtuneError(f"GGUF export cannot carry the tokenizer's normalizer {spec['normalizer']}")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: tok for tok, i in model["vocab"].items()}
    top = max([*by_id, *added], default=-1)
    if top >= n_vocab:
        raise SlimtuneError(f"the tokenizer has token id {top} but the model has only {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(CONTROL if added[i]["special"] else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_types": types, "merges": merges,
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id, "eot": end_of_turn_id(tokenizer) if tokenizer.chat_template else None,
            "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
            "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
            "chat_template": tokenizer.chat_template}


def add_vocab(writer, meta: dict) -> None:
    """Write `vocab_metadata` into a gguf.GGUFWriter."""
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    for key in ("bos", "eos", "unk", "pad", "eot"):
        if meta[key] is not None:
            getattr(writer, f"add_{key}_token_id")(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    writer.add_add_space_prefix(False)
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])
