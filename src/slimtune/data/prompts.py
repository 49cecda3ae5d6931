"""Prompts to answer (eval, compare, report, merge checks): a file or `builtin:NAME` -> chats
ending with a user turn."""

from __future__ import annotations

from ..errors import DataError
from .formats import resolve_path, with_system
from .reader import read_rows

Messages = list[dict[str, str]]


def load_prompts(spec: str, limit: int | None = None, system_prompt: str | None = None) -> list[Messages]:
    """Chats to answer, each ending with a user turn, from a file or `builtin:eval_prompts`.

    Rows: {"prompt": str}, {"messages": [...]} (a trailing assistant turn is dropped), alpaca /
    dolly {"instruction", "input"/"context"}; a .txt file is one prompt per line.
    system_prompt is added to chats without a system turn (as data.system_prompt is in training).
    """
    path = resolve_path(spec)
    if path.suffix == ".txt":
        rows = [(i, {"prompt": line}) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    else:
        rows = read_rows(path)
    chats = []
    for line, row in rows:
        if isinstance(row.get("prompt"), str):
            msgs = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("messages"), list):
            msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
        elif isinstance(row.get("instruction"), str):
            extra = row.get("input") or row.get("context") or ""
            msgs = [{"role": "user", "content": f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]}]
        else:
            raise DataError("expected a 'prompt' string, 'messages', or 'instruction'", path=str(path), line=line)
        if not msgs or msgs[-1]["role"] != "user":
            raise DataError("the chat must end with a user turn to be answered", path=str(path), line=line)
        chats.append(with_system(msgs, system_prompt))
        if limit and len(chats) >= limit:
            break
    return chats


def last_user(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")
