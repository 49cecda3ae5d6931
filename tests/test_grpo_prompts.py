"""The shipped RL prompt set (assets/grpo_prompts.jsonl): valid constraints that its own text
asks for, reproducible from its script, and no overlap with the held-out IFEval-style prompts."""

import inspect
import json
import re
import runpy
from pathlib import Path

import pytest

from slimtune.evaluate.ifeval import CHECKERS, check

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src/slimtune/assets"


NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def load(name):
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def rows():
    return load("grpo_prompts.jsonl")


@pytest.fixture(scope="module")
def held_out():
    return [r["prompt"] for r in load("ifeval_prompts.jsonl")]


def text_of(row):
    (msg,) = row["messages"]
    assert msg["role"] == "user" and msg["content"].strip()
    return msg["content"]


def words(s):
    return re.findall(r"[a-z0-9]+", s.lower())


def ngrams(s, n=5):
    w = words(s)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def overlaps(prompt, held):
    """Why `prompt` repeats a held-out prompt (same normalised text, or 5 words in a row), or None."""
    for h in held:
        if words(prompt) == words(h):
            return f"same text as {h!r}"
        shared = ngrams(prompt) & ngrams(h)
        if shared:
            return f"shares {' '.join(sorted(shared)[0])!r} with {h!r}"
    return None


def test_no_prompt_repeats_or_paraphrases_a_held_out_prompt(rows, held_out):
    bad = [(text_of(r), why) for r in rows if (why := overlaps(text_of(r), held_out))]
    assert not bad, bad[:5]


def test_the_overlap_check_catches_a_copy_and_a_light_edit(held_out):
    h = held_out[0]
    assert overlaps(h.upper() + "  ", held_out)
    assert overlaps("Please: " + h.replace("3", "three"), held_out)
    assert overlaps("Tell me about hiking in the hills today.", held_out) is None


def test_size_uniqueness_and_variety(rows):
    texts = [words(text_of(r)) for r in rows]
    assert 200 <= len(rows) <= 300
    assert len({tuple(t) for t in texts}) == len(rows)
    types = {c["type"] for r in rows for c in r["constraints"]}
    assert types == set(CHECKERS)  # every checker of `slimtune eval` is trained on
    assert sum(len(r["constraints"]) > 1 for r in rows) >= 30


def test_every_constraint_is_valid_and_asked_for_in_the_prompt(rows):
    for r in rows:
        text = text_of(r)
        lower = text.lower()
        for c in r["constraints"]:
            args = {k: v for k, v in c.items() if k != "type"}
            inspect.signature(CHECKERS[c["type"]][0]).bind("", **args)  # TypeError on bad arguments
            for key in ("n", "min", "max"):
                if key in args:
                    assert str(args[key]) in text or NUMBER_WORDS.get(args[key], "-") in lower, (text, c)
            for key in ("phrase", "word", "marker"):
                if key in args:
                    assert args[key].lower() in lower, (text, c)
            for w in args.get("words", []) + args.get("options", []) + args.get("keys", []):
                assert w.lower() in lower, (text, c)
        types = [c["type"] for c in r["constraints"]]
        if "lowercase" in types:  # a phrase the answer must contain must be lowercase too
            assert all(w == w.lower() for c in r["constraints"] for w in c.get("words", []) if c["type"] != "forbidden")


def test_short_answers_that_follow_the_instructions_exist(rows):
    """Limits a 135M model can meet within 128 tokens: few items, modest word counts."""
    for r in rows:
        for c in r["constraints"]:
            assert c.get("n", 0) <= 5 and c.get("max", 0) <= 80 and c.get("min", 0) <= 40, c
    samples = {"bullets": "- a\n- b", "json": '{"name": 1, "colour": 2}'}
    assert check(samples["bullets"], {"type": "bullets", "n": 2})
    assert check(samples["json"], next(c for r in rows for c in r["constraints"] if c["type"] == "json"))


def test_the_script_writes_exactly_the_shipped_file(tmp_path):
    ns = runpy.run_path(str(ROOT / "scripts/make_grpo_prompts.py"))
    written = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ns["rows"]())
    assert written == (ASSETS / "grpo_prompts.jsonl").read_text()


def test_the_data_layer_reads_it_as_builtin_grpo_prompts(rows):
    from slimtune.data.reader import read_rows

    read = read_rows("builtin:grpo_prompts")
    assert [r for _, r in read] == rows and read[0][0] == 1  # (line, row): errors can name file:line
