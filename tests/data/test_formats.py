"""Each format reads into messages; each kind of bad input names its file, line and field."""

import json

import pytest

from slimtune.data.formats import chitchat_to_messages
from slimtune.data.reader import load_chats
from slimtune.errors import DataError


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize("row, expect", [
    (CHAT, CHAT["messages"]),
    ({"instruction": "Add", "input": "2+2", "output": "4"},
     [{"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]),
    ({"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"},
     [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
], ids=["messages", "alpaca", "dolly", "sharegpt"])
def test_formats_detected_and_converted(tmp_path, row, expect):
    assert load_chats(write(tmp_path, [row, row])) == [expect, expect]


def test_json_list_file_and_system_prompt(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "Add", "output": "4"}]))
    (chat,) = load_chats(p, system_prompt="Be brief.")
    assert chat[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("rows, line, field, match", [
    ([json.dumps(CHAT), "{not json"], 2, None, "not valid JSON"),
    ([CHAT, {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}],
     2, "messages[0].role", "unknown role"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}],
     1, "messages[1].content", "empty assistant turn"),
    ([{"messages": [{"role": "user", "content": "x"}]}], 1, "messages[0].content", "no assistant turn"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z"}]}], 1, "messages[2].content", "must end with an assistant"),
    ([CHAT, {"instruction": "a", "output": "b"}], 2, None, "one file holds one format"),
    ([{"instruction": "a", "output": ""}], 1, "output", "missing or empty"),
    ([{"conversations": [{"from": "alien", "value": "x"}]}], 1, "conversations[0].from", "unknown role"),
    ([{"question": "x", "answer": "y"}], 1, None, "cannot tell the format"),
    ([CHAT, CHAT, {"messages": "hello"}], 3, "messages", "non-empty list"),
], ids=["bad_json", "unknown_role", "empty_assistant", "missing_assistant", "not_ending_assistant",
        "mixed_formats", "alpaca_missing_output", "sharegpt_role", "unknown_format", "messages_not_list"])
def test_bad_input_names_file_line_field(tmp_path, rows, line, field, match):
    p = write(tmp_path, rows)
    with pytest.raises(DataError, match=match) as e:
        load_chats(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}"), msg
    assert e.value.line == line
    if field:
        assert f"field '{field}'" in msg


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_chats(tmp_path / "nope.jsonl")


def test_chitchat_conversation():
    conv = {"messages": [[{"text": "hi", "sender": "a"}, {"text": "there", "sender": "a"}],
                         [{"text": "hello", "sender": "b"}], [{"text": "bye", "sender": "a"}]]}
    assert chitchat_to_messages(conv) == [{"role": "user", "content": "hi\nthere"},
                                          {"role": "assistant", "content": "hello"}]
