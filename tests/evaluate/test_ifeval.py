"""IFEval-style checkers: one passing and one failing answer per constraint type; the shipped prompts."""

import json

import pytest

from slimtune.errors import DataError
from slimtune.evaluate.ifeval import CHECKERS, check, ifeval_metrics, load_ifeval

# (constraint, answers that pass, answers that fail)
CASES = [
    ({"type": "bullets", "n": 3}, ["- a\n- b\n* c", "Intro:\n  - a\n- b\n\u2022 c\nbye"],
     ["- a\n- b", "- a\n- b\n- c\n- d", "1. a\n2. b\n3. c", "**bold**\n- a\n- b"]),
    ({"type": "numbered", "n": 2}, ["1. a\n2) b", "Steps:\n1. boil\n2. pour"], ["1. a", "1. a\n2. b\n3. c", "- a\n- b"]),
    ({"type": "words", "min": 3, "max": 5}, ["one two three", "it's a well-known fact"], ["one two", "a b c d e f"]),
    ({"type": "words", "max": 1}, ["Tokyo.", "Tokyo"], ["It is Tokyo."]),
    ({"type": "sentences", "min": 2, "max": 2}, ["It rained. We stayed in!", "Why? Because."],
     ["One sentence only.", "One. Two. Three."]),
    ({"type": "paragraphs", "n": 2}, ["First part.\n\nSecond part.", "a\nb\n\n  \n\nc"], ["One block\nstill one.", "a\n\nb\n\nc"]),
    ({"type": "json", "keys": ["name", "age"]}, ['{"name": "Ann", "age": 3}', '```json\n{"name": "A", "age": 1, "x": 0}\n```'],
     ['{"name": "Ann"}', 'Here: {"name": "A", "age": 1}', '["name", "age"]', "{name: 1}"]),
    ({"type": "no_commas"}, ["No commas here. None at all."], ["Yes, one comma.", "   "]),
    ({"type": "starts_with", "phrase": "Dear friend,"}, ["Dear friend, thanks!", "  dear FRIEND, hi"], ["Hi. Dear friend, thanks"]),
    ({"type": "ends_with", "phrase": "The end."}, ["Once upon a time. The end.", "x THE END.  \n"], ["The end. Or is it?", "The end"]),
    ({"type": "keywords", "words": ["sand", "waves"]}, ["Sand and WAVES."], ["sand only", "sandy waves"]),
    ({"type": "forbidden", "words": ["dog", "dogs"]}, ["Cats and hotdogs are fine."], ["A Dog barked.", "two dogs", ""]),
    ({"type": "keyword_count", "word": "go", "min": 3}, ["Go, go, GO team!"], ["go go, going, gone"]),
    ({"type": "lowercase"}, ["all small, 123."], ["One capital.", "123 !"]),
    ({"type": "uppercase"}, ["ALL BIG, 123!"], ["ALL BIG but one", "123"]),
    ({"type": "title"}, ["<<A Poem>>\nroses are red"], ["<A Poem>", "<<>> text", "<< >>"]),
    ({"type": "quoted"}, ['"Patience is bitter, but its fruit is sweet."', "\u201cso it goes\u201d"], ['He said "hi"', '""']),
    ({"type": "postscript", "marker": "P.S."}, ["See you soon.\nP.S. Bring snacks."], ["P.S. only a postscript", "See you. P.S. inline"]),
    ({"type": "placeholders", "n": 2}, ["Hi [name], see you on [date]."], ["Hi [name].", "Hi [], bye []"]),
    ({"type": "highlights", "n": 2}, ["It is *very* important and *urgent*."], ["Only **bold** and *one*.", "no marks"]),
    ({"type": "one_of", "options": ["My answer is yes.", "My answer is no."]}, ["My answer is yes.", " my answer is NO "],
     ["My answer is yes, because...", "Yes."]),
]


def test_every_checker_has_cases():
    assert {c["type"] for c, _, _ in CASES} == set(CHECKERS)


@pytest.mark.parametrize("constraint,good,bad", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_checker_passes_and_fails(constraint, good, bad):
    for text in good:
        assert check(text, constraint), text
    for text in bad:
        assert not check(text, constraint), text


def test_shipped_prompts_are_many_varied_and_valid():
    rows = load_ifeval()
    assert len(rows) >= 60 and len({r["id"] for r in rows}) == len(rows)
    assert len({r["prompt"] for r in rows}) == len(rows)
    types = {c["type"] for r in rows for c in r["constraints"]}
    assert types == set(CHECKERS)  # every checker is used by some prompt
    assert sum(len(r["constraints"]) > 1 for r in rows) >= 10  # some prompts combine constraints


def test_bad_rows_name_line_and_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x", "constraints": [{"type": "bullets", "n": 1}]}) + "\n"
                 + json.dumps({"prompt": "y", "constraints": [{"type": "bullets", "count": 1}]}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2.*constraints\[0\].*bad arguments for 'bullets'"):
        load_ifeval(str(f))
    f.write_text(json.dumps({"prompt": "x", "constraints": [{"type": "rhymes"}]}) + "\n")
    with pytest.raises(DataError, match="unknown constraint type 'rhymes'"):
        load_ifeval(str(f))


def test_pass_rates_prompt_and_constraint_level():
    rows = [{"id": "a", "prompt": "p", "constraints": [{"type": "lowercase"}, {"type": "no_commas"}]},
            {"id": "b", "prompt": "q", "constraints": [{"type": "lowercase"}]}]
    m = ifeval_metrics(rows, [{"text": "all fine here"}, {"text": "Not lower"}])
    assert m == {"prompts": 2, "prompt_pass": 0.5, "constraint_pass": 2 / 3,
                 "by_type": {"lowercase": {"n": 2, "pass": 0.5}, "no_commas": {"n": 1, "pass": 1.0}}}
    m = ifeval_metrics(rows, [{"text": "all, fine"}, {"text": "ok"}])
    assert m["prompt_pass"] == 0.5 and m["by_type"]["no_commas"]["pass"] == 0.0
