"""Preference rows: TRL's shapes rendered by the chat template; bad rows name file:line:field."""

import json

import pytest

from slimtune.data.preference import load_preferences, render_pair, render_unpaired, split_rows
from slimtune.data.render import render_prompt
from slimtune.errors import DataError

USER = [{"role": "user", "content": "What is the capital of France?"}]


def write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pair_shares_the_prompt_and_scores_content_plus_end_of_turn(family_tokenizer):
    tok = family_tokenizer
    row = {"prompt": USER, "chosen": [{"role": "assistant", "content": "Paris."}],
           "rejected": [{"role": "assistant", "content": "The capital is Paris, Paris, Paris."}]}
    ex, cut = render_pair(row, tok)
    assert not cut
    assert ex["prompt_ids"] == render_prompt(USER, tok)  # exactly what generation sees
    chosen_text = tok.decode(ex["chosen_ids"])
    assert chosen_text.strip().startswith("Paris.") and ex["chosen_ids"][-1] in (tok.eos_token_id,
                                                                                tok.convert_tokens_to_ids("<|eot_id|>"))
    assert tok.decode(ex["rejected_ids"]).startswith("The capital is Paris")


def test_text_rows_equal_message_rows(tokenizer):
    text = {"prompt": USER[0]["content"], "chosen": "Paris.", "rejected": "Lyon."}
    msgs = {"prompt": USER, "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Lyon."}]}
    assert render_pair(text, tokenizer)[0] == render_pair(msgs, tokenizer)[0]


def test_implicit_prompt_is_the_shared_first_turns(tokenizer):
    row = {"chosen": USER + [{"role": "assistant", "content": "Paris."}],
           "rejected": USER + [{"role": "assistant", "content": "Lyon."}]}
    explicit = {"prompt": USER, "chosen": "Paris.", "rejected": "Lyon."}
    assert render_pair(row, tokenizer)[0] == render_pair(explicit, tokenizer)[0]


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "hi", "chosen": "Same answer.", "rejected": "Same answer. "}, "rejected", "identical"),
    ({"prompt": "hi", "chosen": "  ", "rejected": "x"}, "chosen", "empty"),
    ({"prompt": "hi", "chosen": [{"role": "assistant", "content": ""}], "rejected": "x"}, "chosen[0].content", "empty"),
    ({"prompt": USER + [{"role": "assistant", "content": "Paris."}], "chosen": "a", "rejected": "b"},
     "prompt[1]", "ends with an assistant turn"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role", "unknown role"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen", "one assistant turn"),
])
def test_bad_rows_name_file_line_field(tmp_path, tokenizer, row, field, words):
    good = {"prompt": "hi", "chosen": "fine", "rejected": "dog"}
    path = write(tmp_path, [good, row])
    with pytest.raises(DataError) as e:
        load_preferences(path, tokenizer)
    assert e.value.path == path and e.value.line == 2 and e.value.field == field
    assert words in str(e.value) and f"{path}:2 field '{field}'" in str(e.value)


def test_truncation_keeps_the_prompt_and_drops_or_refuses_empty_completions(tmp_path, tokenizer):
    long_prompt = "the quick brown fox " * 30
    rows = [{"prompt": "hi", "chosen": "fine " * 40, "rejected": "dog"},
            {"prompt": long_prompt, "chosen": "fine", "rejected": "dog"}]
    path = write(tmp_path, rows)
    out, stats = load_preferences(path, tokenizer, max_length=40)
    assert len(out) == 1 and stats.truncated == 1 and stats.dropped == [f"{path}:2"]
    ex = out[0]
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == 40 and ex["rejected_ids"][-1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match=r"p.jsonl:2 field 'chosen'.*leaves nothing"):
        load_preferences(path, tokenizer, max_length=40, drop_untrained=False)


def test_kto_rows_and_pairs_unpaired(tmp_path, tokenizer):
    rows = [{"prompt": "hi", "completion": "fine", "label": True}, {"prompt": "hi", "completion": "dog", "label": False}]
    out, _ = load_preferences(write(tmp_path, rows), tokenizer, kind="unpaired")
    assert [r["label"] for r in out] == [True, False]
    assert out[0]["prompt_ids"] == render_pair({"prompt": "hi", "chosen": "fine", "rejected": "dog"}, tokenizer)[0]["prompt_ids"]
    pairs, _ = load_preferences(write(tmp_path, [{"prompt": "hi", "chosen": "fine", "rejected": "dog"}], "q.jsonl"),
                                tokenizer, kind="unpaired")
    assert [(r["completion_ids"], r["label"]) for r in pairs] == [(out[0]["completion_ids"], True),
                                                                  (out[1]["completion_ids"], False)]
    with pytest.raises(DataError, match="label must be true"):
        render_unpaired({"prompt": "hi", "completion": "x", "label": "yes"}, tokenizer, path="f", line=3)
    with pytest.raises(DataError, match=r"needs \{prompt, chosen, rejected\}"):
        load_preferences(write(tmp_path, rows, "k.jsonl"), tokenizer, kind="paired")


def test_split_keeps_both_rows_of_a_pair_on_one_side(tmp_path, tokenizer):
    rows = [{"prompt": f"q {i}", "chosen": "fine", "rejected": "dog"} for i in range(10)]
    out, _ = load_preferences(write(tmp_path, rows), tokenizer, kind="unpaired")
    train, val = split_rows(out, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert not {r["where"] for r in train} & {r["where"] for r in val}


@pytest.mark.parametrize("ext", ["parquet", "csv", "arrow"])
def test_preference_rows_from_parquet_csv_and_arrow_equal_jsonl(tmp_path, tokenizer, ext):
    """Text rows (prompt / chosen / rejected strings, or KTO's prompt / completion / label) read from
    any columnar file give the same examples as the JSONL file; a bad row still names its row."""
    from datasets import Dataset

    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}, wrong."} for i in range(4)]
    want, _ = load_preferences(write(tmp_path, rows), tokenizer)
    ds = Dataset.from_list(rows)
    path = str(tmp_path / f"p.{ext}")
    {"parquet": ds.to_parquet, "csv": lambda p: ds.to_csv(p, index=False)}.get(ext, lambda p: None)(path)
    if ext == "arrow":
        path = str(tmp_path / "p_disk")
        ds.save_to_disk(path)
    got, _ = load_preferences(path, tokenizer)
    assert [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in got] == \
           [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in want]
    kto = Dataset.from_list([{"prompt": "Hi?", "completion": "Hello.", "label": True},
                             {"prompt": "Hi?", "completion": "Go away.", "label": False}])
    kto.to_parquet(str(tmp_path / "k.parquet"))
    got, _ = load_preferences(str(tmp_path / "k.parquet"), tokenizer, kind="unpaired")
    assert [e["label"] for e in got] == [True, False]
    bad = Dataset.from_list([*rows[:2], {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet.*3"):
        load_preferences(str(tmp_path / "bad.parquet"), tokenizer)
