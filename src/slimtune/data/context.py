"""Context distillation rows: each chat rendered twice, with and without the teacher's context.

    student  <system default>  user: Q                       assistant: A <eot>
    teacher  <system: S>       user: P + Q                   assistant: A <eot>
                                (S = distill.teacher_system, P = distill.teacher_prefix)

Both renderings use the same tokenizer and template (render.render_chat), so the trained answer
tokens must come out identical; the teacher's row then predicts the same targets at its own
positions, and `hidden[:, :-1][labels[:, 1:] != -100]` of the two batches line up row by row. A
template that tokenises an answer differently once the context is there (it rewrites earlier turns,
or merges a token across the boundary) is refused, naming the example. The student's row is cut at
data.max_length as usual; the teacher's is cut where the student's trained positions end.
"""

from __future__ import annotations

from ..config import DataCfg
from ..errors import DataError
from .reader import load_chats
from .prepare import Prepared, read_records
from .render import IGNORE, render_chat
from .tools import RenderStats, render_all, split


def with_context(messages: list[dict], system: str | None, prefix: str | None) -> list[dict]:
    """The chat the teacher sees: `system` before the chat's own system turn (or as its system turn),
    `prefix` + a blank line before the first user message."""
    out = [dict(m) for m in messages]
    if prefix:
        first = next((m for m in out if m["role"] == "user"), None)
        if first is None:
            raise DataError("distill.teacher_prefix needs a user message to put it before")
        first["content"] = f"{prefix}\n\n{first['content']}"
    if system:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{system}\n\n{out[0]['content']}"
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def trained_targets(labels: list[int]) -> list[int]:
    """The trained target tokens in order (labels[t + 1] for trained positions t)."""
    return [lab for lab in labels[1:] if lab != IGNORE]


def context_row(messages: list[dict], tokenizer, system: str | None, prefix: str | None,
                train_on: str = "assistant", max_length: int | None = None, where: str = "example") -> dict:
    """{input_ids, labels, teacher_input_ids, teacher_labels}: the chat as the student and as the
    teacher see it, with the same trained targets in the same order (DataError otherwise)."""
    ids, labels = render_chat(messages, tokenizer, train_on, max_length)
    t_ids, t_labels = render_chat(with_context(messages, system, prefix), tokenizer, train_on)
    student, teacher = trained_targets(labels), trained_targets(t_labels)
    if teacher[:len(student)] != student:
        at = next((i for i, (a, b) in enumerate(zip(student, teacher)) if a != b), min(len(student), len(teacher)))
        show = (lambda seq: repr(tokenizer.decode(seq[max(0, at - 3):at + 3])))
        raise DataError(f"{where}: with the teacher's context the chat template writes the answer tokens "
                        f"differently (trained token {at}: student {show(student)}, teacher {show(teacher)}); "
                        "context distillation compares the two models on identical answer tokens. Use "
                        "teacher_system or teacher_prefix alone, or a template that leaves the answers unchanged.")
    # cut the teacher's row after its len(student)-th trained target, as the student's was cut
    keep, seen = len(t_ids), 0
    for t in range(1, len(t_labels)):
        if t_labels[t] != IGNORE:
            seen += 1
            if seen == len(student):
                keep = t + 1
                break
    t_labels = t_labels[:keep] if student else [IGNORE] * keep
    return {"input_ids": ids, "labels": labels, "teacher_input_ids": t_ids[:keep], "teacher_labels": t_labels}


def _chats(spec: str, cfg: DataCfg, seed: int) -> list[list[dict]]:
    out = []
    for r in read_records(spec, cfg, seed):
        if "text" in r:
            raise DataError(f"{spec}: context distillation needs chats, not raw text")
        out.append(r["messages"] if "messages" in r else r["prompt"] + r["completion"])
    return out


def _rows(chats, tokenizer, cfg: DataCfg, system, prefix, source: str) -> tuple[list[dict], RenderStats]:
    rows, st = [], RenderStats()
    for i, chat in enumerate(chats):
        row = context_row(chat, tokenizer, system, prefix, cfg.train_on, cfg.max_length, f"{source} example {i + 1}")
        n = len(trained_targets(row["labels"]))
        if n == 0:
            st.dropped += 1
            continue
        rows.append(row)
        st.examples += 1
        st.tokens += len(row["input_ids"])
        st.trained_tokens += n
        st.lengths.append(len(row["input_ids"]))
    return rows, st


def prepare_context(cfg: DataCfg, tokenizer, system: str | None, prefix: str | None, seed: int = 0,
                    log=None) -> Prepared:
    """data.prepare's train / held-out split (the same seeded split of source rows), each example a
    `context_row`. Not cached: both renderings are made here."""
    if not cfg.train:
        raise DataError("no training data: set data.train")
    chats = _chats(cfg.train, cfg, seed)
    if cfg.val:
        train_c, val_c = chats, _chats(cfg.val, cfg, seed)
    else:
        tr, va = split(list(range(len(chats))), cfg.val_fraction, seed)
        train_c, val_c = [chats[i] for i in tr], [chats[i] for i in va]
    train, st = _rows(train_c, tokenizer, cfg, system, prefix, cfg.train)
    train = train[:cfg.max_examples] if cfg.max_examples else train
    val, vst = _rows(val_c, tokenizer, cfg, system, prefix, cfg.val or "held-out split")
    general = []
    if cfg.general_prompts:
        general, _ = render_all(load_chats(cfg.general_prompts), tokenizer, source=cfg.general_prompts,
                                train_on=cfg.train_on, max_length=cfg.max_length)
    if log:
        log(f"context distillation: {len(train)} train / {len(val)} held-out chats rendered with and without "
            "the teacher's context")
    return Prepared(train, val, general, {"format": "messages", "train": st.summary(), "val": vst.summary()})
