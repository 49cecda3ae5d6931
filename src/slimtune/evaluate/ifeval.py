"""Verifiable instruction following (IFEval-style, offline): prompts whose instructions code can check.

    assets/ifeval_prompts.jsonl: {"id", "prompt", "constraints": [{"type": "bullets", "n": 3}, ...]}
    answer text --CHECKERS[type](text, **args)--> pass / fail
    --> per constraint type and overall: instruction-level and prompt-level (every constraint) pass rates

The idea follows IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language
Models"); the prompts and checkers are this project's own, written to fit answers of ~128 tokens.
Checks are strict: the answer as generated, no lenient variants.
"""

from __future__ import annotations

import inspect
import json
import re
from collections import defaultdict

from ..data.reader import read_rows
from ..errors import DataError

WORD = re.compile(r"[A-Za-z0-9][\w'\-]*")
BULLET = re.compile(r"^[ \t]*[-*\u2022][ \t]+\S", re.M)
NUMBERED = re.compile(r"^[ \t]*\d{1,3}[.)][ \t]+\S", re.M)
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
HIGHLIGHT = re.compile(r"(?<!\*)\*[^\s*][^\n*]*\*(?!\*)")  # *text*, not **text**
FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```$", re.S)


def _has(text: str, word: str) -> int:
    """How often `word` (a word or phrase) occurs as whole words, case-insensitive."""
    return len(re.findall(rf"(?<![\w']){re.escape(word)}(?![\w'])", text, re.I))


def bullets(text: str, n: int) -> bool:
    """Exactly n Markdown bullet lines ("- ", "* ", "• ")."""
    return len(BULLET.findall(text)) == n


def numbered(text: str, n: int) -> bool:
    """Exactly n numbered list lines ("1. ", "2) ")."""
    return len(NUMBERED.findall(text)) == n


def word_count(text: str, min: int = 0, max: int | None = None) -> bool:  # noqa: A002 (the constraint's own names)
    """Word count within [min, max]."""
    count = len(WORD.findall(text))
    return count >= min and (max is None or count <= max)


def sentences(text: str, min: int = 1, max: int | None = None) -> bool:  # noqa: A002
    """Sentence count within [min, max]: text split after . ! ? followed by a space or a line end."""
    count = len([s for s in SENTENCE_SPLIT.split(text.strip()) if s.strip()])
    return count >= min and (max is None or count <= max)


def paragraphs(text: str, n: int) -> bool:
    """Exactly n paragraphs separated by blank lines."""
    return len([p for p in re.split(r"\n[ \t]*\n", text.strip()) if p.strip()]) == n


def json_keys(text: str, keys: list[str]) -> bool:
    """The whole answer (optionally in one ``` fence) is a JSON object with every key."""
    body = text.strip()
    fenced = FENCE.match(body)
    try:
        obj = json.loads(fenced.group(1) if fenced else body)
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


def no_commas(text: str) -> bool:
    return "," not in text and bool(text.strip())


def starts_with(text: str, phrase: str) -> bool:
    return text.strip().lower().startswith(phrase.lower())


def ends_with(text: str, phrase: str) -> bool:
    """The answer's last characters are the phrase (case-insensitive); nothing follows it."""
    return text.strip().lower().endswith(phrase.lower())


def keywords(text: str, words: list[str]) -> bool:
    """Every keyword appears as a whole word."""
    return all(_has(text, w) for w in words)


def forbidden(text: str, words: list[str]) -> bool:
    """None of the words appears as a whole word (and the answer is not empty)."""
    return bool(text.strip()) and not any(_has(text, w) for w in words)


def keyword_count(text: str, word: str, min: int) -> bool:  # noqa: A002
    """`word` appears at least `min` times."""
    return _has(text, word) >= min


def lowercase(text: str) -> bool:
    """Letters, and none of them uppercase."""
    return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)


def uppercase(text: str) -> bool:
    """Letters, and none of them lowercase."""
    return any(c.isalpha() for c in text) and not any(c.islower() for c in text)


def title(text: str) -> bool:
    """A title in double angle brackets, e.g. <<A Day Out>>."""
    return bool(re.search(r"<<[^<>\n]*\w[^<>\n]*>>", text))


def quoted(text: str) -> bool:
    """The whole answer is wrapped in double quotes."""
    t = text.strip()
    return len(t) > 2 and t[0] in "\"\u201c" and t[-1] in "\"\u201d"


def postscript(text: str, marker: str = "P.S.") -> bool:
    """A line starting with the marker (P.S.) after some other text."""
    return bool(re.search(rf"\S[\s\S]*\n[ \t]*{re.escape(marker)}", text))


def placeholders(text: str, n: int) -> bool:
    """At least n placeholders in square brackets, e.g. [name]."""
    return len(re.findall(r"\[[^\[\]\n]+\]", text)) >= n


def highlights(text: str, n: int) -> bool:
    """At least n sections highlighted with single asterisks, *like this*."""
    return len(HIGHLIGHT.findall(text)) >= n


def one_of(text: str, options: list[str]) -> bool:
    """The answer is exactly one of the options (case, surrounding spaces and final . ! ignored)."""
    norm = (lambda s: s.strip().rstrip(".!").strip().lower())
    return norm(text) in {norm(o) for o in options}


CHECKERS = {  # type: (checker, readable name)
    "bullets": (bullets, "exact number of bullets"),
    "numbered": (numbered, "exact number of numbered items"),
    "words": (word_count, "word count in range"),
    "sentences": (sentences, "sentence count in range"),
    "paragraphs": (paragraphs, "exact number of paragraphs"),
    "json": (json_keys, "JSON with given keys"),
    "no_commas": (no_commas, "no commas"),
    "starts_with": (starts_with, "starts with a phrase"),
    "ends_with": (ends_with, "ends with a phrase"),
    "keywords": (keywords, "includes keywords"),
    "forbidden": (forbidden, "avoids forbidden words"),
    "keyword_count": (keyword_count, "keyword at least N times"),
    "lowercase": (lowercase, "all lowercase"),
    "uppercase": (uppercase, "all capitals"),
    "title": (title, "title in <<double brackets>>"),
    "quoted": (quoted, "wrapped in double quotes"),
    "postscript": (postscript, "ends with a P.S."),
    "placeholders": (placeholders, "N [placeholders]"),
    "highlights": (highlights, "N *highlighted* parts"),
    "one_of": (one_of, "answers with one of given options"),
}


def check(text: str, constraint: dict) -> bool:
    """Does `text` follow the constraint {"type": ..., **args}?"""
    args = {k: v for k, v in constraint.items() if k != "type"}
    return bool(CHECKERS[constraint["type"]][0](text, **args))


def load_ifeval(spec: str = "builtin:ifeval_prompts", limit: int | None = None) -> list[dict]:
    """Rows {id, prompt, constraints} from a JSONL file; each constraint's type and arguments are
    checked here (a DataError names file:line:field), so a bad row fails before any model runs."""


    rows = []
    for line, row in read_rows(spec):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("constraints"), list) \
                or not row["constraints"]:
            raise DataError("expected 'prompt' (string) and 'constraints' (non-empty list)", path=spec, line=line)
        for i, c in enumerate(row["constraints"]):
            where = f"constraints[{i}]"
            if not isinstance(c, dict) or c.get("type") not in CHECKERS:
                raise DataError(f"unknown constraint type {c.get('type') if isinstance(c, dict) else c!r}; "
                                f"choose one of: {', '.join(CHECKERS)}", path=spec, line=line, field=where)
            try:
                inspect.signature(CHECKERS[c["type"]][0]).bind("", **{k: v for k, v in c.items() if k != "type"})
            except TypeError as e:
                raise DataError(f"bad arguments for '{c['type']}': {e}", path=spec, line=line, field=where) from None
        rows.append({"id": row.get("id", str(line)), "prompt": row["prompt"], "constraints": row["constraints"]})
        if limit and len(rows) >= limit:
            break
    return rows


def sample_ifeval(text: str, constraints: list[dict]) -> list[bool]:
    return [check(text, c) for c in constraints]


def ifeval_metrics(rows: list[dict], answers: list[dict]) -> dict:
    """Pass rates over prompts: prompt_pass (every constraint of a prompt), constraint_pass (all
    constraints pooled), by_type {type: {n, pass}}."""
    if not rows:
        return {}
    by_type: dict[str, list[bool]] = defaultdict(list)
    prompt_ok = []
    for row, ans in zip(rows, answers):
        oks = sample_ifeval(ans["text"], row["constraints"])
        prompt_ok.append(all(oks))
        for c, ok in zip(row["constraints"], oks):
            by_type[c["type"]].append(ok)
    pooled = [ok for oks in by_type.values() for ok in oks]
    return {"prompts": len(rows), "prompt_pass": sum(prompt_ok) / len(rows),
            "constraint_pass": sum(pooled) / len(pooled),
            "by_type": {t: {"n": len(v), "pass": sum(v) / len(v)} for t, v in sorted(by_type.items())}}
