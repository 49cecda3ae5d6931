"""Style builders: the Markdown slice only moves text; the negative guard set is varied and clean."""

import json
import re
from collections import Counter

import pytest

from slimtune.cli import main
from slimtune.data.builders import markdown_answer, markdown_slice, neg_guard
from slimtune.data.formats import builtin_path
from slimtune.data.reader import load_chats
from slimtune.evaluate.style import has_heading, has_list, stray_tags

NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
NAME = re.compile(r"\b[A-Z][a-z]+[A-Z]\w*|\b[A-Z]{2,}\w*")  # iPhone-like and acronyms: never touched
CODE = "```python\ndef add(a, b):\n    return a + b  # tools: a, b and c.\n```"


def fences(text):
    return re.findall(r"```.*?```", text, re.S)


def test_colon_enumeration_becomes_a_list():
    out = markdown_answer("To bake bread you need four things: flour, water, yeast and 2 g of salt.", "How?")
    assert out == "To bake bread you need four things:\n\n- flour\n- water\n- yeast\n- 2 g of salt"
    assert has_list(out)


def test_long_prose_gets_a_heading_and_sentence_points():
    answer = ("Sunlight contains every color. Air molecules scatter blue light more than red. "
              "This is called Rayleigh scattering. So the sky looks blue. ") * 3
    out = markdown_answer(answer.strip(), "Why is the sky blue?", heading_words=20)
    assert out.startswith("## Why is the sky blue\n\n") and has_heading(out) and has_list(out)


def test_code_blocks_numbers_and_names_are_never_changed():
    chats = load_chats(builtin_path("instructions"))
    extra = [[{"role": "user", "content": "Show me"}, {"role": "assistant", "content":
              f"Use NASA data from 1969: Apollo, Gemini and Mercury.\n\n{CODE}\n\nThe iPhone costs 999.99 USD here."}]]
    sliced = markdown_slice(chats + extra, heading_words=40)
    assert len(sliced) > 40
    originals = {json.dumps(c[:-1]): c[-1]["content"] for c in chats + extra}
    words = lambda t: Counter(w for w in re.findall(r"[\w']+", t) if w not in ("and", "or"))  # noqa: E731
    for chat in sliced:
        before, after = originals[json.dumps(chat[:-1])], chat[-1]["content"]
        heading = re.match(r"## (.*)\n\n", after)  # made from the question: the only new text
        body = after[heading.end():] if heading else after
        assert fences(body) == fences(before)
        assert Counter(NUMBER.findall(body)) == Counter(NUMBER.findall(before))
        assert Counter(NAME.findall(body)) == Counter(NAME.findall(before))
        assert words(body) == words(before)  # only the joining 'and' / 'or' of a series may go
    assert any(CODE in c[-1]["content"] and "- Apollo" in c[-1]["content"] for c in sliced)


def test_slice_limit_is_a_seeded_sample():
    chats = load_chats(builtin_path("instructions"))
    a, b = markdown_slice(chats, limit=10, seed=1), markdown_slice(chats, limit=10, seed=2)
    assert len(a) == 10 and a == markdown_slice(chats, limit=10, seed=1) and a != b


def test_neg_guard_pairs_are_many_varied_and_clean():
    pairs = neg_guard()
    prompts = [c[0]["content"] for c in pairs]
    assert len(pairs) >= 60 and len(set(prompts)) == len(prompts)
    assert len({p.split()[0] for p in prompts}) >= 25  # not one template filled in
    tempting = [p for p in prompts if stray_tags(p) or re.search(r"(?i)\b(user|assistant|system|human)\b", p)]
    assert len(tempting) >= 0.6 * len(prompts)
    for c in pairs:
        assert [m["role"] for m in c] == ["user", "assistant"]
        assert stray_tags(c[1]["content"]) == [], c[1]["content"]


@pytest.mark.parametrize("cmd", [["markdown-slice", "builtin:instructions", "--limit", "5"], ["neg-guard", "--limit", "7"]])
def test_builders_cli_write_chats_that_mix(tmp_path, cmd):
    out = tmp_path / "o.jsonl"
    assert main(["data", *cmd, "--out", str(out)]) == 0
    assert len(load_chats(out)) == int(cmd[-1])
    assert main(["data", "mix", f"{out}:2", "--out", str(tmp_path / "m.jsonl")]) == 0
