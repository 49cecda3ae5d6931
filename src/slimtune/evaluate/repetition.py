"""Repetition and degeneration of generated answers: pure functions of the text.

What small models get wrong and style metrics miss: "Strawberries, Oranges, Oranges, Oranges,
Oranges"; a list that repeats "Learn by yourself" six times; answers that run to the token limit.

- loop: a unit of 2-32 words said 3 times in a row, one word 4 times in a row, or one line
  (list markers and numbering stripped) 3 times anywhere;
- distinct-1 / distinct-2 (Li et al. 2016): unique word uni/bigrams over all of them, pooled over
  the answers;
- longest repeated span: the longest word sequence said twice without overlapping itself;
- hit the limit: the answer stopped at max_new_tokens instead of its end-of-turn token.

Words are lowercase runs of letters, digits and apostrophes; punctuation is ignored.
"""

from __future__ import annotations

import re

WORD = re.compile(r"[\w']+")
LIST_MARK = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])?\s*")
MAX_UNIT = 32


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def tandem_repeat(ws: list[str], min_repeats: int = 3, min_single: int = 4) -> tuple[int, int] | None:
    """(unit length, start) of the first unit of words repeated back to back: units of >= 2 words
    `min_repeats` times, a single word `min_single` times; None if there is none."""
    n = len(ws)
    for size in range(1, min(MAX_UNIT, n // 2) + 1):
        need = min_single if size == 1 else min_repeats
        if size * need > n:
            break
        run = 0  # positions i where ws[i] == ws[i + size], in a row
        for i in range(n - size):
            run = run + 1 if ws[i] == ws[i + size] else 0
            if run >= size * (need - 1):
                return size, i - run + 1
    return None


def repeated_lines(text: str, min_repeats: int = 3) -> str | None:
    """A non-empty line (markers and numbers stripped, case and spacing ignored) said >= min_repeats times."""
    seen: dict[str, int] = {}
    for line in text.splitlines():
        key = " ".join(words(LIST_MARK.sub("", line)))
        if key:
            seen[key] = seen.get(key, 0) + 1
            if seen[key] >= min_repeats:
                return key
    return None


def in_loop(text: str) -> bool:
    return tandem_repeat(words(text)) is not None or repeated_lines(text) is not None


def longest_repeated_span(ws: list[str]) -> int:
    """Length in words of the longest sequence occurring twice without overlap (0 if none)."""
    n, best = len(ws), 0
    prev = [0] * (n + 1)  # prev[j]: common run ending at (i - 1, j - 1)
    for i in range(1, n + 1):
        cur = [0] * (n + 1)
        for j in range(i + 1, n + 1):  # j > i: the later occurrence
            if ws[i - 1] == ws[j - 1]:
                cur[j] = min(prev[j - 1] + 1, j - i)  # the two copies may not overlap
                best = max(best, cur[j])
        prev = cur
    return best


def distinct(texts: list[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams, pooled over texts; None when there are none."""
    grams = [tuple(ws[i:i + n]) for ws in map(words, texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def sample_repetition(answer: dict) -> dict:
    """Per answer: {loop, longest_repeat, distinct_1, distinct_2, hit_limit}."""
    text = answer["text"]
    return {"loop": in_loop(text), "longest_repeat": longest_repeated_span(words(text)),
            "distinct_1": distinct([text], 1), "distinct_2": distinct([text], 2),
            "hit_limit": not answer.get("ended", True)}


def repetition_metrics(answers: list[dict]) -> dict:
    """Over answers ({text, ended, ...}): loop_share, distinct_1, distinct_2 (pooled),
    longest_repeat_mean / _max (words), hit_limit_share."""
    if not answers:
        return {}
    per = [sample_repetition(a) for a in answers]
    n = len(per)
    spans = [p["longest_repeat"] for p in per]
    texts = [a["text"] for a in answers]
    return {"loop_share": sum(p["loop"] for p in per) / n,
            "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2),
            "longest_repeat_mean": sum(spans) / n, "longest_repeat_max": max(spans),
            "hit_limit_share": sum(p["hit_limit"] for p in per) / n}
