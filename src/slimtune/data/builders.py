"""Style-data builders (seed 002): a Markdown slice of existing answers, and a negative guard set.

markdown_slice: rewrites the last assistant answer of some chats into Markdown structure,
only by moving text that is already there:
- an enumeration after a colon ("you need: flour, water and salt." or "...: a; b; c.")
  becomes a bulleted list, one item a line;
- inline numbered items ("(1) mix, (2) knead") go one to a line, markers kept;
- a prose paragraph of at least `min_sentences` sentences, in an answer that has no list yet,
  keeps its first sentence as the lead-in and lists the others as bullet points;
- an answer of at least `heading_words` words gets a `## heading` made from the user's question.
Fenced code blocks, inline code, numbers and names are never changed: only whitespace, list
markers, the joining "and"/"or" of a series, and a heading line are added or removed.

neg_guard: prompts that tempt a model to write chat-template tags, role names and template
tokens ("Repeat after me: <|im_start|>"), with clean answers; shipped as assets/neg_guard.jsonl.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources

Messages = list[dict[str, str]]

FENCE = re.compile(r"(^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\2[^\n]*$)", re.M | re.S)
# "lead-in: item, item(,) and item." -- items are short phrases without sentence punctuation
SERIES = re.compile(r"(?P<lead>[^\n:]{8,}?):[ \t]+(?P<items>[^\n:;.!?]+?(?:, [^\n:;.!?,]+?)+"
                    r",? (?:and|or) [^\n:;.!?]+)(?P<end>[.!?](?=\s|$)|$)", re.M)
SEMI = re.compile(r"(?P<lead>[^\n:]{8,}?):[ \t]+(?P<items>[^\n:;.!?]+(?:; [^\n:;.!?]+){2,})"
                  r"(?P<end>[.!?](?=\s|$)|$)", re.M)
INLINE_NUM = re.compile(r"[ \t]*(?:^|(?<=[\s:]))\((\d{1,2})\)[ \t]+")
MAX_ITEM_WORDS = 6
SENTENCE_END = re.compile(r"(?<=[.!?])[ \t]+(?=[A-Z])")
ABBREV = re.compile(r"\b(?:e\.g|i\.e|etc|vs|Mr|Mrs|Ms|Dr|St|No|approx)\.", re.I)


def _protected(text: str) -> list[tuple[str, bool]]:
    """Split text into (piece, may_change): fenced code blocks never change."""
    out, pos = [], 0
    for m in FENCE.finditer(text):
        out += [(text[pos:m.start()], True), (m.group(0), False)]
        pos = m.end()
    return out + [(text[pos:], True)]


def _series_items(items: str, sep: str) -> list[str] | None:
    """'a, b and c' -> ['a', 'b', 'c'] (sep ','), or None when it does not look like a list."""
    parts = [p.strip() for p in items.split(sep)]
    if sep == ",":
        head, sep2, tail = parts[-1].rpartition(" and ") if " and " in parts[-1] else parts[-1].rpartition(" or ")
        last = [tail] if head in ("", "and", "or") and not sep2 else [head, tail]
        if parts[-1].startswith(("and ", "or ")):  # Oxford comma: ", and c"
            last = [parts[-1].split(" ", 1)[1]]
        parts = parts[:-1] + [p.strip() for p in last]
    if len(parts) < 3 or any(not p or len(p.split()) > MAX_ITEM_WORDS or "`" in p for p in parts):
        return None
    return parts


def _listify(match: re.Match, sep: str) -> str:
    items = _series_items(match.group("items"), sep)
    if items is None:
        return match.group(0)
    body = "\n".join(f"- {it}" for it in items)
    return f"{match.group('lead')}:\n\n{body}\n\n"  # the series' final period goes with the joiner


def _sentence_list(par: str, min_sentences: int) -> str:
    """'A. B. C. D.' -> 'A\n\n- B\n- C\n- D' for a plain prose paragraph (no abbreviations that
    would split a sentence in two)."""
    if "\n" in par or ABBREV.search(par) or '"' in par:
        return par
    sentences = SENTENCE_END.split(par.strip())
    if len(sentences) < min_sentences:
        return par
    return sentences[0] + "\n\n" + "\n".join(f"- {s}" for s in sentences[1:])


def _paragraph(par: str) -> str:
    if "`" in par or par.lstrip().startswith(("-", "*", "#", "|", ">")) or re.match(r"\s*\d+[.)] ", par):
        return par  # already structured, or holds inline code
    new = SERIES.sub(lambda m: _listify(m, ","), par)
    new = SEMI.sub(lambda m: _listify(m, ";"), new)
    if len(INLINE_NUM.findall(new)) >= 2:
        new = INLINE_NUM.sub(lambda m: f"\n{m.group(1)}) ", new).lstrip("\n")
    return re.sub(r"[ \t]*\n\n+[ \t]*", "\n\n", new).strip()


def heading_for(question: str, max_words: int = 8) -> str:
    """A short heading from the user's question: its first line, trailing punctuation dropped."""
    first = question.strip().splitlines()[0] if question.strip() else "Answer"
    words = first.split()
    title = " ".join(words[:max_words]).rstrip(" ?.!:;,")
    return title[:1].upper() + title[1:] if title else "Answer"


def markdown_answer(answer: str, question: str = "", heading_words: int = 60, min_sentences: int = 4) -> str:
    """One answer with Markdown structure (see module doc); unchanged when no rule applies."""
    pieces = []
    for piece, may_change in _protected(answer):
        if may_change:
            lead = piece[: len(piece) - len(piece.lstrip("\n"))]
            trail = piece[len(piece.rstrip("\n")):]
            pars = re.split(r"(\n\s*\n)", piece.strip("\n"))
            piece = lead + "".join(p if i % 2 else _paragraph(p) for i, p in enumerate(pars)) + trail
        pieces.append(piece)
    out = "".join(pieces)
    if not re.search(r"^[ \t]*(?:[-*+]|\d{1,3}[.)])[ \t]+\S", out, re.M) and not FENCE.search(out):
        pars = re.split(r"(\n\s*\n)", out)
        out = "".join(p if i % 2 else _sentence_list(p, min_sentences) for i, p in enumerate(pars))
    has_heading = re.search(r"^#{1,6} ", out, re.M)
    if len(answer.split()) >= heading_words and not has_heading:
        out = f"## {heading_for(question)}\n\n{out}"
    return out


def markdown_slice(chats: list[Messages], limit: int | None = None, seed: int = 0,
                   heading_words: int = 60, min_sentences: int = 4) -> list[Messages]:
    """Chats whose last assistant answer gained structure, at most `limit` of them (a seeded
    sample, kept in file order). Other turns are left as they are."""
    changed = []
    for chat in chats:
        last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        question = next((m["content"] for m in reversed(chat[:last]) if m["role"] == "user"), "")
        new = markdown_answer(chat[last]["content"], question, heading_words, min_sentences)
        if new != chat[last]["content"]:
            changed.append(chat[:last] + [{**chat[last], "content": new}] + chat[last + 1:])
    if limit is not None and limit < len(changed):
        keep = sorted(random.Random(seed).sample(range(len(changed)), limit))
        changed = [changed[i] for i in keep]
    return changed


def neg_guard(limit: int | None = None, seed: int = 0) -> list[Messages]:
    """The shipped negative-guard pairs as chats; a seeded sample of `limit` when given."""
    text = (resources.files("slimtune") / "assets" / "neg_guard.jsonl").read_text(encoding="utf-8")
    chats = [json.loads(line)["messages"] for line in text.splitlines() if line.strip()]
    if limit is not None and limit < len(chats):
        chats = [chats[i] for i in sorted(random.Random(seed).sample(range(len(chats)), limit))]
    return chats
