"""Render a chat through the tokenizer's own chat template into (input_ids, labels).

The one rendering used for training, evaluation, chat and merge checks. How the mask is found,
for any template (with or without `{% generation %}` markers):

    prefix_i = template(messages[:i], add_generation_prompt=True)   # ends with the assistant header
    upto_i   = template(messages[:i+1])                             # ... + content + end of turn
    full     = template(messages)

Each `upto_i` must be a prefix of `full` (else the template rewrites earlier turns, and a mask
computed from it would be silently wrong: we refuse). The text between `prefix_i` and `upto_i`,
less trailing whitespace, is assistant turn i: its content and its end-of-turn token. The pieces
are tokenised one by one, as at inference, where the prompt is tokenised and the answer is
generated token by token after it. So system and user text, role headers, a default system
prompt the template injects and a trailing newline are never trained.

Labels follow the Hugging Face convention: aligned with input_ids (the model shifts), -100 where
not trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError

IGNORE = -100


@dataclass
class Segment:
    text: str
    trained: bool


def _template(tokenizer, messages, add_generation_prompt=False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises for templates that reject a role order, etc.
        raise DataError(f"the tokenizer's chat template failed on this chat: {e}") from None


def chat_segments(messages: list[dict], tokenizer, train_on: str = "assistant") -> list[Segment]:
    """Split the rendered chat into consecutive text pieces, each trained or not."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; use an instruct model's tokenizer")
    full = _template(tokenizer, messages)
    if train_on == "all":
        return [Segment(full, True)]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    segments, pos = [], 0
    for i in turns:
        prefix = _template(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _template(tokenizer, messages[: i + 1]).rstrip()
        if not (full.startswith(prefix) and full.startswith(upto) and upto.startswith(prefix)):
            raise DataError(
                f"the chat template renders turn {i} differently depending on what follows it "
                "(it rewrites earlier turns, e.g. strips reasoning, or adds tags to the last turn only); "
                "the assistant mask cannot be trusted. Use train_on=last, or a template without that behaviour")
        if len(prefix) < pos:
            raise DataError(f"the chat template's turn {i} overlaps the previous assistant turn")
        segments.append(Segment(full[pos:len(prefix)], False))
        segments.append(Segment(upto[len(prefix):], True))
        pos = len(upto)
    segments.append(Segment(full[pos:], False))
    return [s for s in segments if s.text]


def _encode(tokenizer, text: str) -> list[int]:
    # The template already wrote any BOS it wants; the tokenizer must not add another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that may close an assistant turn: eos and every special added token."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def render_chat(messages: list[dict], tokenizer, train_on: str = "assistant",
                max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Render one chat: `(input_ids, labels)`, two lists of the same length.

    train_on: "assistant" (every assistant turn), "last" (the last one), "all" (every token).
    Each trained assistant turn includes its end-of-turn token (e.g. <|im_end|>, <|eot_id|>).
    max_length truncates both lists from the right, so labels stay aligned.
    """
    if train_on not in ("assistant", "last", "all"):
        raise ValueError(f"train_on must be assistant, last or all, not {train_on!r}")
    input_ids: list[int] = []
    labels: list[int] = []
    eot = end_of_turn_ids(tokenizer) if train_on != "all" else None
    for seg in chat_segments(messages, tokenizer, train_on):
        ids = _encode(tokenizer, seg.text)
        if seg.trained and eot is not None and (not ids or ids[-1] not in eot):
            raise DataError("the chat template does not close assistant turns with an end-of-turn token, "
                            f"so a model trained on it never learns to stop (turn ends with {seg.text[-20:]!r})")
        input_ids += ids
        labels += ids if seg.trained else [IGNORE] * len(ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def render_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of a chat followed by the assistant header, ready to generate the next turn."""
    return _encode(tokenizer, _template(tokenizer, messages, add_generation_prompt=True))
