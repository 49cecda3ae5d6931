"""Read chat data files and turn every row into a list of messages `[{role, content}, ...]`.

Formats (detected per file from the first row's keys, or named):
- messages: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
            "tools": [...] (optional)}; assistant turns may carry `reasoning_content` (or
            `thinking`) and `tool_calls` (content may then be empty or null); `tool` turns may
            carry `tool_call_id` and `name` (OpenAI shape). These survive into the chat (see Chat).
- alpaca:   {"instruction", "input" (optional), "output"}
- dolly:    {"instruction", "context" (optional), "response"}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
- prompt_completion and text (raw text): see reader.py, which also maps a file's own column names.

Files are opened by sources.py: JSON/JSONL (also .gz/.zst), parquet, CSV, Arrow, save_to_disk
folders and hf:org/name.

Every error is a DataError naming the file, the line (JSONL; the row number for a JSON list)
and the field.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import DataError

Messages = list[dict[str, str]]


class Chat(list):
    """A chat: the list of message dicts, plus the row's chat-level `tools` (OpenAI function
    specs) when it has them. Code that takes `list[dict]` takes it unchanged; render_chat reads
    `.tools`. Slicing or `+` gives a plain list (the tools stay with the whole chat)."""

    def __init__(self, messages=(), tools: list | None = None):
        super().__init__(messages)
        self.tools = tools or None


# Keys of a `messages` turn kept besides role and content, and the roles that may carry them.
EXTRA_KEYS = {"reasoning_content": "assistant", "thinking": "assistant", "tool_calls": "assistant",
              "tool_call_id": "tool", "name": None}
"""Extra turn fields kept for the template, and the role that may carry them (None: any role;
OpenAI's `name` is a tool's name on tool turns and a participant's name elsewhere)."""
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
    "prompt_completion": {"prompt", "completion"},
    "text": {"text"},
}
# Formats that hold a list of turns: (list key, role key, text key, role names -> ours, hint).
TURN_LISTS = {
    "messages": ("messages", "role", "content", {r: r for r in ROLES + ("tool",)}, ", ".join(ROLES + ("tool",))),
    "sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES, "human, gpt, system"),
}
BUILTIN = {"instructions", "general_prompts", "eval_prompts", "eval_prompts_48", "ifeval_prompts", "preferences", "grpo_prompts"}


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
    path = builtin_path(spec.split(":", 1)[1]) if spec.startswith("builtin:") else Path(spec).expanduser()
    if not path.exists():
        raise DataError("file not found; check the path (or use builtin:instructions)", path=str(path))
    return path


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
            calls = fmt == "messages" and isinstance(m, dict) and m.get("tool_calls")
            if not isinstance(m, dict) or role_key not in m or (text_key not in m and not calls):
                raise DataError(f"each turn needs '{role_key}' and '{text_key}'", path=path, line=line, field=where)
            role = roles.get(str(m[role_key]).lower())
            if role is None:
                raise DataError(f"unknown role {m[role_key]!r}; use one of {hint}",
                                path=path, line=line, field=f"{where}.{role_key}")
            text = m.get(text_key)
            if text is None and calls:
                text = ""  # an OpenAI tool-call turn has content null
            if not isinstance(text, str):
                raise DataError(f"{text_key} must be a string", path=path, line=line, field=f"{where}.{text_key}")
            msg = {"role": role, "content": text}
            if fmt == "messages":
                msg.update(_extras(m, role, path, line, where))
            msgs.append(msg)
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
    msgs = with_system(msgs, system_prompt)
    return Chat(msgs, _tools(row, path, line)) if fmt == "messages" else msgs


def _extras(m: dict, role: str, path, line, where) -> dict:
    """The reasoning / tool-call fields of one `messages` turn, validated."""
    out = {}
    for key, owner in EXTRA_KEYS.items():
        val = m.get(key)
        if val is None or val == "" or val == []:
            continue
        if owner is not None and role != owner:
            raise DataError(f"only {owner} turns may carry '{key}'", path=path, line=line, field=f"{where}.{key}")
        if key == "tool_calls":
            _check_calls(val, path, line, f"{where}.{key}")
        elif not isinstance(val, str):
            raise DataError("must be a string", path=path, line=line, field=f"{where}.{key}")
        out[key] = val
    return out


def _check_calls(calls, path, line, field) -> None:
    """tool_calls: [{"type": "function", "function": {"name": str, "arguments": dict | str}}, ...]"""
    if not isinstance(calls, list):
        raise DataError("must be a list of {type, function: {name, arguments}}", path=path, line=line, field=field)
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError("each tool call needs function.name (OpenAI shape: "
                            '{"type": "function", "function": {"name": ..., "arguments": {...}}})',
                            path=path, line=line, field=f"{field}[{j}]")
        if not isinstance(fn.get("arguments", {}), (dict, str)):
            raise DataError("arguments must be an object or a JSON string", path=path, line=line,
                            field=f"{field}[{j}].function.arguments")


def _tools(row: dict, path, line) -> list | None:
    """The row's `tools` list (OpenAI function specs), validated; None when absent."""
    tools = row.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError('must be a list of tool specs ({"type": "function", "function": {"name", ...}})',
                        path=path, line=line, field="tools")
    return tools


def _validate(msgs: Messages, path, line, field_of) -> None:
    """A chat alternates user/assistant after an optional system turn and ends with an assistant;
    `tool` results follow an assistant turn with tool_calls."""
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise DataError("a system message may only come first", path=path, line=line, field=field_of(i))
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise DataError("empty assistant turn: nothing to train on; remove the row or fill it in",
                            path=path, line=line, field=field_of(i))
        if m["role"] == "tool" and not (i and (msgs[i - 1]["role"] == "tool" or msgs[i - 1].get("tool_calls"))):
            raise DataError("a tool result must follow an assistant turn with tool_calls (or another tool result)",
                            path=path, line=line, field=field_of(i))
    turns = [m for m in msgs if m["role"] != "system"]
    if not any(m["role"] == "assistant" for m in turns):
        raise DataError("no assistant turn: nothing to train on", path=path, line=line, field=field_of(len(msgs) - 1))
    if turns[-1]["role"] != "assistant":
        raise DataError("the chat must end with an assistant turn (drop the trailing user turn)",
                        path=path, line=line, field=field_of(len(msgs) - 1))


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
