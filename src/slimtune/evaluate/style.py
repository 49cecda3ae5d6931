"""Style metrics of generated answers: pure functions of the text (and generation counts).

Each answer is a dict from `generate.generate`: {text, n_tokens, ended, seconds}. The text keeps
special tokens, so a model that writes template tags into its answer (or starts the next turn
itself) is caught by `stray_tags`.
"""

from __future__ import annotations

import re
from collections import Counter

LIST = re.compile(r"^[ \t]*(?:[-*+\u2022]|\d{1,3}[.)])[ \t]+\S", re.M)     # "- a", "* a", "1. a", "2) a"
HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+\S|^[^\n]+\n[ \t]*(?:=+|-{3,})[ \t]*$", re.M)  # ATX or setext
CODE_BLOCK = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1", re.M | re.S)  # a closed fence
STRAY = re.compile(
    r"<\|[^|<>\n]{1,40}\|>"                         # <|im_start|>, <|eot_id|>, <|end|> ...
    r"|\[/?INST\]|<</?SYS>>"                         # Llama 2 / Mistral
    r"|</?s>|<(?:start|end)_of_turn>"                # sentencepiece bos/eos, Gemma turns
    r"|^[ \t]*(?:#{1,4}[ \t]*)?(?i:user|assistant|system|human)[ \t]*:?[ \t]*$"  # a role header line
    r"|^[ \t]*(?:#{1,4}[ \t]*)?(?:User|Assistant|Human|USER|ASSISTANT|HUMAN)[ \t]*:",  # the next turn
    re.M)


def has_list(text: str) -> bool:
    return bool(LIST.search(text))


def has_heading(text: str) -> bool:
    return bool(HEADING.search(text))


def has_code_block(text: str) -> bool:
    return bool(CODE_BLOCK.search(text))


def banned_hits(text: str, phrases: list[str]) -> dict[str, int]:
    """{phrase: occurrences} for the phrases found in text, case-insensitive."""
    low = text.lower()
    hits = {p: low.count(p.lower()) for p in phrases if p}
    return {p: n for p, n in hits.items() if n}


def stray_tags(text: str) -> list[str]:
    """Chat-template tags and role headers that leaked into an answer's text."""
    return [m.group(0).strip() for m in STRAY.finditer(text)]


def style_metrics(answers: list[dict], banned_phrases: list[str] = ()) -> dict:
    """Aggregate over answers: shares (0-1) with lists / headings / code blocks / banned phrases /
    stray tags / end-of-turn, banned-phrase counts, mean length in tokens, generation tokens/s."""
    n = len(answers)
    if n == 0:
        return {"answers": 0}
    texts = [a["text"] for a in answers]
    share = (lambda xs: sum(bool(x) for x in xs) / n)
    banned = [banned_hits(t, list(banned_phrases)) for t in texts]
    by_phrase = Counter()
    for b in banned:
        by_phrase.update(b)
    strays = [stray_tags(t) for t in texts]
    tags = Counter(tag for s in strays for tag in s)
    tokens = sum(a["n_tokens"] for a in answers)
    # throughput of what was generated now: an answer read from the cache took no time here
    fresh = [a for a in answers if not a.get("cached")]
    seconds = sum(a["seconds"] for a in fresh)
    return {
        "answers": n,
        "list_share": share(map(has_list, texts)),
        "heading_share": share(map(has_heading, texts)),
        "code_block_share": share(map(has_code_block, texts)),
        "banned_share": share(banned),
        "banned_hits": sum(by_phrase.values()),
        "banned_by_phrase": dict(by_phrase.most_common()),
        "stray_tag_share": share(strays),
        "stray_tags": dict(tags.most_common(10)),
        "mean_tokens": tokens / n,
        "ended_share": share(a["ended"] for a in answers),
        "tokens_per_s": sum(a["n_tokens"] for a in fresh) / seconds if seconds > 0 else None,
    }
