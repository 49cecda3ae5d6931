"""Read chat data files and turn every row into a list of messages `[{role, content}, ...]`.

Formats (detected per file from the first row's keys, or named):
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- alpaca:   {"instruction", "input" (optional), "output"}
- dolly:    {"instruction", "context" (optional), "response"}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}

Every error is a DataError naming the file, the line (JSONL; the row number for a JSON list)
and the field.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import DataError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
# Keys that identify each format; a row must have all of them.
SIGNATURES = {
    "messages": {"messages"},
    "sharegpt": {"conversations"},
    "dolly": {"instruction", "response"},
    "alpaca": {"instruction", "output"},
}
# Formats that hold a list of turns: (list key, role key, text key, role names -> ours, hint).
TURN_LISTS = {
    "messages": ("messages", "role", "content", {r: r for r in ROLES}, ", ".join(ROLES)),
    "sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES, "human, gpt, system"),
}
BUILTIN = {"instructions", "general_prompts", "eval_prompts", "ifeval_prompts"}


def with_system(messages: Messages, system_prompt: str | None) -> Messages:
    """`messages` with a system turn `system_prompt` first, unless it is empty or the chat has one.

    The one place data.system_prompt is applied: training data, eval prompts and chat all use it.
    """
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def builtin_path(name: str) -> Path:
    """Path of a data file shipped with slimtune (`builtin:instructions`, ...)."""
    if name not in BUILTIN:
        raise DataError(f"unknown built-in data set 'builtin:{name}'; choose one of: {', '.join(sorted(BUILTIN))}")
    return Path(str(resources.files("slimtune") / "assets" / f"{name}.jsonl"))


def resolve_path(spec: str) -> Path:
    path = builtin_path(spec.split(":", 1)[1]) if spec.startswith("builtin:") else Path(spec)
    if not path.exists():
        raise DataError("file not found; check the path (or use builtin:instructions)", path=str(path))
    return path


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) for a JSONL file or a JSON file holding a list of objects."""
    path = resolve_path(str(path))
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg}, column {e.colno}); fix the file or use JSONL",
                            path=str(path), line=e.lineno) from None
        if not isinstance(data, list):
            raise DataError("a .json data file must hold a list of objects", path=str(path), line=1)
        rows = list(enumerate(data, start=1))  # 'line' is the row number in a JSON list
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object",
                                path=str(path), line=lineno) from None
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path=str(path), line=lineno)
    if not rows:
        raise DataError("the file holds no rows", path=str(path))
    return rows


def detect_format(row: dict, path: str = "?", line: int = 1) -> str:
    found = [name for name, keys in SIGNATURES.items() if keys <= row.keys()]
    if len(found) != 1:
        hint = "; ".join(f"{n}: {sorted(k)}" for n, k in SIGNATURES.items())
        raise DataError(f"cannot tell the format from keys {sorted(row)}; expected one of {hint}",
                        path=path, line=line)
    return found[0]


def _text(row: dict, key: str, path, line, required=True) -> str:
    val = row.get(key)
    if val is None or (isinstance(val, str) and not val.strip()):
        if required:
            raise DataError("missing or empty; every example needs it", path=path, line=line, field=key)
        return ""
    if not isinstance(val, str):
        raise DataError(f"expected a string, got {type(val).__name__}", path=path, line=line, field=key)
    return val


def row_to_messages(row: dict, fmt: str, path: str, line: int, system_prompt: str | None = None) -> Messages:
    """Convert one row of a known format to messages, validating as it goes."""
    if fmt in TURN_LISTS:
        list_key, role_key, text_key, roles, hint = TURN_LISTS[fmt]
        raw = row[list_key]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"must be a non-empty list of {{{role_key}, {text_key}}}",
                            path=path, line=line, field=list_key)
        msgs = []
        for i, m in enumerate(raw):
            where = f"{list_key}[{i}]"
            if not isinstance(m, dict) or role_key not in m or text_key not in m:
                raise DataError(f"each turn needs '{role_key}' and '{text_key}'", path=path, line=line, field=where)
            role = roles.get(str(m[role_key]).lower())
            if role is None:
                raise DataError(f"unknown role {m[role_key]!r}; use one of {hint}",
                                path=path, line=line, field=f"{where}.{role_key}")
            if not isinstance(m[text_key], str):
                raise DataError(f"{text_key} must be a string", path=path, line=line, field=f"{where}.{text_key}")
            msgs.append({"role": role, "content": m[text_key]})
        field_of = lambda i: f"{list_key}[{i}].{text_key}"  # noqa: E731
    elif fmt in ("alpaca", "dolly"):
        extra_key, answer_key = ("input", "output") if fmt == "alpaca" else ("context", "response")
        instruction = _text(row, "instruction", path, line)
        extra = _text(row, extra_key, path, line, required=False)
        answer = _text(row, answer_key, path, line)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        field_of = lambda i: answer_key  # noqa: E731
    else:
        raise DataError(f"unknown format {fmt!r}", path=path, line=line)

    _validate(msgs, path, line, field_of)
    return with_system(msgs, system_prompt)


def _validate(msgs: Messages, path, line, field_of) -> None:
    """A chat alternates user/assistant after an optional system turn and ends with an assistant."""
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise DataError("a system message may only come first", path=path, line=line, field=field_of(i))
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError("empty assistant turn: nothing to train on; remove the row or fill it in",
                            path=path, line=line, field=field_of(i))
    turns = [m for m in msgs if m["role"] != "system"]
    if not any(m["role"] == "assistant" for m in turns):
        raise DataError("no assistant turn: nothing to train on", path=path, line=line, field=field_of(len(msgs) - 1))
    if turns[-1]["role"] != "assistant":
        raise DataError("the chat must end with an assistant turn (drop the trailing user turn)",
                        path=path, line=line, field=field_of(len(msgs) - 1))


def load_chats(path: str | Path, fmt: str = "auto", system_prompt: str | None = None) -> list[Messages]:
    """Read a file of one format into a list of chats; mixed formats in one file are an error."""
    rows = read_rows(path)
    path = str(path)
    first_fmt = detect_format(rows[0][1], path, rows[0][0]) if fmt == "auto" else fmt
    chats = []
    for line, row in rows:
        row_fmt = detect_format(row, path, line) if fmt == "auto" else fmt
        if row_fmt != first_fmt:
            raise DataError(f"this row looks like '{row_fmt}' but the file starts as '{first_fmt}'; "
                            "one file holds one format (convert with `slimtune data convert`)", path=path, line=line)
        if not SIGNATURES[row_fmt] <= row.keys():
            missing = sorted(SIGNATURES[row_fmt] - row.keys())[0]
            raise DataError(f"missing for format '{row_fmt}'", path=path, line=line, field=missing)
        chats.append(row_to_messages(row, row_fmt, path, line, system_prompt))
    return chats


def chitchat_to_messages(conversation: dict, system_prompt: str | None = None) -> Messages | None:
    """One chitchat-dataset conversation -> messages. The first speaker is the user.

    Consecutive utterances of one speaker are joined; a trailing user turn is dropped so the chat
    ends with the assistant. Returns None when no assistant turn is left.
    """
    turns: list[tuple[str, list[str]]] = []
    for message in conversation.get("messages", []):
        for utt in message:  # each message is a list of utterances {text, sender, timestamp}
            text, sender = (utt.get("text") or "").strip(), utt.get("sender")
            if not text:
                continue
            if turns and turns[-1][0] == sender:
                turns[-1][1].append(text)
            else:
                turns.append((sender, [text]))
    if not turns:
        return None
    first = turns[0][0]
    msgs = [{"role": "user" if s == first else "assistant", "content": "\n".join(t)} for s, t in turns]
    if msgs[-1]["role"] == "user":
        msgs.pop()
    if not any(m["role"] == "assistant" for m in msgs):
        return None
    return with_system(msgs, system_prompt)


def load_chitchat(limit: int | None = None, system_prompt: str | None = None) -> list[Messages]:
    """Conversations of the `chitchat-dataset` package as chats (no network)."""
    try:
        import chitchat_dataset  # noqa: F401
    except ImportError:
        raise DataError("the chitchat data needs the package: pip install chitchat-dataset") from None
    data = json.loads((resources.files("chitchat_dataset") / "dataset.json").read_text(encoding="utf-8"))
    chats = []
    for key in sorted(data):
        msgs = chitchat_to_messages(data[key], system_prompt)
        if msgs:
            chats.append(msgs)
        if limit and len(chats) >= limit:
            break
    return chats
