"""Data utilities: convert, mix (weights, shuffle, dedupe), split, and render + stats.

Writers produce JSONL, written atomically: ChatML `messages` for chats (mix always), and for
convert / split the canonical row of the source's format (messages, prompt + completion, text).
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..utils import atomic_write_text
from .formats import Messages, load_chitchat
from .reader import load_chats
from .render import IGNORE, render_chat


def _row(chat: Messages) -> dict:
    tools = getattr(chat, "tools", None)  # a formats.Chat keeps its row's tools
    return {"messages": list(chat), **({"tools": tools} if tools else {})}


def write_chats(chats: list[Messages], path: str | Path) -> None:
    write_records([_row(c) for c in chats], path)


def write_records(rows: list[dict], path: str | Path) -> None:
    """JSONL, one row a line: {"messages"}, {"prompt", "completion"} or {"text"}."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _normalise(chat: Messages) -> str:
    """Text key for near-duplicate detection: case, accents, punctuation and spacing ignored."""
    text = " | ".join(f"{m['role']}:{m['content']}" for m in chat)
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"[\W_]+", " ", text).strip()


class Deduper:
    """Remembers what it has seen: exact duplicates first, then normalised-text duplicates."""

    def __init__(self):
        self.exact, self.norm = set(), set()
        self.n_exact = self.n_near = 0

    def keep(self, chat: Messages) -> bool:
        exact = json.dumps(_row(chat), sort_keys=True, ensure_ascii=False)  # tools count too
        if exact in self.exact:
            self.n_exact += 1
            return False
        self.exact.add(exact)
        norm = _normalise(chat)
        if norm in self.norm:
            self.n_near += 1
            return False
        self.norm.add(norm)
        return True


def dedupe(chats: list[Messages]) -> tuple[list[Messages], int, int]:
    """Drop exact duplicates, then normalised-text duplicates. Returns (kept, n_exact, n_near)."""
    d = Deduper()
    kept = [c for c in chats if d.keep(c)]
    return kept, d.n_exact, d.n_near


def parse_weighted(spec: str) -> tuple[str, float]:
    """'file.jsonl:3' -> ('file.jsonl', 3.0); no weight means 1. 'builtin:x' keeps its colon;
    'chitchat:N' is N chitchat conversations (weight 1) and 'chitchat:N:W' the same with weight W."""
    if spec.startswith("chitchat"):
        parts = spec.split(":")
        if len(parts) > 3 or (len(parts) == 3 and not parts[1]):
            raise DataError(f"'{spec}': write chitchat, chitchat:N (N conversations) or chitchat:N:W (weight W)")
        return ":".join(parts[:2]), _weight(spec, parts[2]) if len(parts) == 3 else 1.0
    path, sep, weight = spec.rpartition(":")
    if sep and path and path != "builtin":
        try:
            float(weight)
        except ValueError:
            return spec, 1.0
        return path, _weight(spec, weight)
    return spec, 1.0


def _weight(spec: str, text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise DataError(f"'{text}' in '{spec}' is not a number: the weight goes after the last ':'") from None
    if w <= 0:
        raise DataError(f"weight must be > 0 in '{spec}'")
    return w


def _load(path: str, fmt: str, system_prompt, columns, split, subset) -> list[Messages]:
    if path.startswith("chitchat"):
        n = path.partition(":")[2]
        if n and not n.isdigit():
            raise DataError(f"'{path}': chitchat:N takes a whole number of conversations")
        return load_chitchat(int(n) if n else None, system_prompt)
    return load_chats(path, fmt, system_prompt, columns, split, subset)


def mix(specs: list[str], seed: int = 0, fmt: str = "auto", do_dedupe: bool = True,
        system_prompt: str | None = None, log=print, columns: dict | None = None,
        split: str | None = None, subset: str | None = None) -> list[Messages]:
    """Weighted mix: each source is deduplicated, then repeated `int(w)` times plus a seeded
    random `frac(w)` share of it (weight 3 = upsample x3, 0.5 = half), then all are shuffled."""
    rng = random.Random(seed)
    out: list[Messages] = []
    seen = Deduper()  # shared across sources, so one chat never comes in through two of them
    for spec in specs:
        path, w = parse_weighted(spec)
        chats = _load(path, fmt, system_prompt, columns, split, subset)
        n_read, n_exact0, n_near0 = len(chats), seen.n_exact, seen.n_near
        if do_dedupe:
            chats = [c for c in chats if seen.keep(c)]
        n_exact, n_near = seen.n_exact - n_exact0, seen.n_near - n_near0
        whole, frac = int(w), w - int(w)
        taken = chats * whole + rng.sample(chats, round(frac * len(chats)))
        log(f"{path}: read {n_read}, exact duplicates {n_exact}, near duplicates {n_near}, "
            f"weight {w:g} -> {len(taken)} examples")
        out += taken
    rng.shuffle(out)
    log(f"mixed: {len(out)} examples")
    return out


def split(chats: list[Messages], val_fraction: float, seed: int = 0) -> tuple[list[Messages], list[Messages]]:
    """Seeded train/val split; at least one held-out example when val_fraction > 0."""
    if not chats:
        return [], []
    idx = list(range(len(chats)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(val_fraction * len(chats))) if val_fraction > 0 else 0
    n_val = min(n_val, len(chats) - 1)
    val = [chats[i] for i in sorted(idx[:n_val])]
    train = [chats[i] for i in sorted(idx[n_val:])]
    return train, val


@dataclass
class RenderStats:
    examples: int = 0
    dropped: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        ls = sorted(self.lengths)
        pct = (lambda q: ls[min(len(ls) - 1, int(q / 100 * len(ls)))] if ls else 0)
        return {"examples": self.examples, "dropped": self.dropped, "truncated": self.truncated,
                "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                "trained_fraction": round(self.trained_tokens / max(1, self.tokens), 4),
                "length_p50": pct(50), "length_p90": pct(90), "length_p99": pct(99),
                "length_max": ls[-1] if ls else 0, "length_mean": round(sum(ls) / max(1, len(ls)), 1)}


def render_all(chats: list[Messages], tokenizer, train_on: str = "assistant", max_length: int | None = None,
               drop_untrained: bool = True, source: str = "data",
               train_reasoning: bool = True) -> tuple[list[dict], RenderStats]:
    """Render chats into examples {input_ids, labels}; count truncated and dropped ones."""
    examples, st = [], RenderStats()
    for i, chat in enumerate(chats):
        try:
            ids, labels = render_chat(chat, tokenizer, train_on, train_reasoning=train_reasoning)
        except DataError as e:
            raise DataError(f"{source} example {i + 1}: {e}") from None
        if max_length is not None and len(ids) > max_length:
            st.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        n_trained = sum(lab != IGNORE for lab in labels[1:])  # position 0 is never a target
        if n_trained == 0:
            if not drop_untrained:
                raise DataError(f"{source} example {i + 1}: no trained tokens left after truncation to "
                                f"{max_length}; raise data.max_length or set data.drop_untrained=true")
            st.dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        st.examples += 1
        st.tokens += len(ids)
        st.trained_tokens += n_trained
        st.lengths.append(len(ids))
    return examples, st


def highlight(example: dict, tokenizer, color: bool = False) -> str:
    """The example's text with trained tokens marked: ANSI green on a terminal, else [[...]]."""
    out, run, trained_run = [], [], None
    on, off = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")

    def flush():
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{on}{text}{off}" if trained_run else text)

    for tid, lab in zip(example["input_ids"], example["labels"]):
        t = lab != IGNORE
        if t != trained_run:
            flush()
            run, trained_run = [], t
        run.append(tid)
    flush()
    return "".join(out)
