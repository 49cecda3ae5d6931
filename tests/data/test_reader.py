"""Column mapping, and the prompt-completion and raw-text formats."""

import json

import pandas as pd
import pytest

from slimtune.config import build_config
from slimtune.data.reader import load_chats
from slimtune.data.reader import parse_columns
from slimtune.errors import ConfigError, DataError


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_columns_map_a_csv_export_to_alpaca(tmp_path):
    p = tmp_path / "qa.csv"
    pd.DataFrame([{"id": 1, "question": "2+2?", "answer": "4"}]).to_csv(p, index=False)
    chats = load_chats(p, columns={"instruction": "question", "output": "answer"})
    assert chats == [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]


def test_columns_map_a_conversation_column_to_messages(tmp_path):
    rows = [{"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             "messages": "an unrelated column of the same name"}]
    assert load_chats(jsonl(tmp_path / "c.jsonl", rows), columns="messages=conversation")[0][1]["content"] == "Hello"


@pytest.mark.parametrize("rows, columns, where, match", [
    ([{"question": "q", "answer": ""}], "instruction=question,output=answer", ":1 field 'answer'", "missing or empty"),
    ([{"question": "q", "answer": "a"}, {"question": "q2", "answer": None}], "instruction=question,output=answer",
     ":2 field 'answer'", "missing for format 'alpaca'"),
    ([{"conv": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}], "messages=conv",
     ":1 field 'conv[1].role'", "unknown role"),
    ([{"question": "q", "reply": "a"}], "instruction=question,output=answer", ":1", "no column 'answer'|column 'answer'"),
], ids=["empty_cell", "null_in_row_2", "nested_field", "mapped_column_missing"])
def test_column_errors_name_the_row_and_the_files_column(tmp_path, rows, columns, where, match):
    p = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=match) as e:
        load_chats(p, columns=columns)
    assert str(e.value).startswith(f"{p}{where}")


def test_columns_config_accepts_yaml_dicts_and_key_value_strings():
    a = build_config({"data": {"columns": {"instruction": "question", "output": "answer"}}})
    b = build_config({}, ["data.columns=instruction=question,output=answer"])
    assert a.data.columns == b.data.columns == {"instruction": "question", "output": "answer"}
    with pytest.raises(ConfigError, match="unknown field 'question'"):
        build_config({}, ["data.columns=question=instruction"])
    with pytest.raises(ConfigError, match="ours=theirs"):
        parse_columns("instruction")


def test_prompt_completion_strings_and_message_lists(tmp_path):
    rows = [{"prompt": "Capital of France?", "completion": "Paris."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
             "completion": [{"role": "assistant", "content": "4"}]}]
    a, b = load_chats(jsonl(tmp_path / "pc.jsonl", rows))
    assert a == [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    assert [m["role"] for m in b] == ["system", "user", "assistant"]
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": [{"role": "user", "content": "y"}]}])
    with pytest.raises(DataError, match="field 'completion': the completion must be one assistant turn"):
        load_chats(bad)


def test_text_rows_are_not_chats(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])
    with pytest.raises(DataError, match="raw text rows hold no chat"):
        load_chats(p)
    with pytest.raises(DataError, match=":1 field 'text': empty text"):
        load_chats(jsonl(tmp_path / "e.jsonl", [{"text": "  "}]), fmt="text")
