"""Prompts to answer (eval, compare, report, merge checks) and RL prompts (GRPO): a source or
`builtin:NAME` -> chats ending with a user turn."""

from __future__ import annotations

from ..errors import DataError
from .formats import ROLES, resolve_path, with_system
from .reader import read_rows
from .render import render_prompt
from .sources import open_source

Messages = list[dict[str, str]]

PROMPT_KEYS = ("prompt", "messages", "instruction", "input", "context")
"""The fields a prompt row's chat is made of; every other column of an RL prompt goes to the rewards."""


def load_prompts(spec: str, limit: int | None = None, system_prompt: str | None = None) -> list[Messages]:
    """Chats to answer, each ending with a user turn, from a file or `builtin:eval_prompts`.

    Rows: as `prompt_chat`; a .txt file is one prompt per line.
    system_prompt is added to chats without a system turn (as data.system_prompt is in training).
    """
    path = resolve_path(spec)
    if path.suffix == ".txt":
        rows = [(i, {"prompt": line}) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    else:
        rows = read_rows(path)
    chats = []
    for line, row in rows:
        chats.append(with_system(prompt_chat(row, str(path), line), system_prompt))
        if limit and len(chats) >= limit:
            break
    return chats


def prompt_chat(row: dict, path: str, line: int) -> Messages:
    """One row -> the chat to answer: {"prompt": text | [turns]}, {"messages": [...]} (trailing
    assistant turns dropped), alpaca / dolly {"instruction", "input"/"context"}."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) or isinstance(row.get("messages"), list):
        key = "prompt" if isinstance(prompt, list) else "messages"
        msgs = []
        for i, m in enumerate(row[key]):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"expected {{role: {'|'.join(ROLES)}, content: text}}, got {m!r}", path=path,
                                line=line, field=f"{key}[{i}]")
            msgs.append({"role": m["role"], "content": m["content"]})
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
    elif isinstance(row.get("instruction"), str):
        extra = row.get("input") or row.get("context") or ""
        msgs = [{"role": "user", "content": f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]}]
    else:
        raise DataError(f"expected a 'prompt' (text or turns), 'messages', or 'instruction'; got keys {sorted(row)}",
                        path=path, line=line)
    if not msgs or msgs[-1]["role"] != "user":
        raise DataError("the chat must end with a user turn to be answered", path=path, line=line)
    return msgs


def prompt_rows(spec: str, tokenizer, *, system_prompt: str | None = None, columns: dict | None = None,
                split: str | None = None, subset: str | None = None, max_prompt_tokens: int | None = None,
                drop_long: bool = True) -> tuple[list[dict], list[str]]:
    """RL prompts from any source the data layer opens (file, folder, hf:org/name, builtin:NAME).

    Returns (rows, dropped). rows: {"messages", "prompt_ids" (rendered with the generation prompt,
    as `generate` renders it), "columns" {every other field: gold answers, constraints...},
    "where" "file:line"}; dropped: file:line of prompts longer than `max_prompt_tokens` (an error
    when not drop_long). columns: {our field: the file's column}, e.g. {prompt: question}.
    """

    source = open_source(str(resolve_path(spec)) if spec.startswith("builtin:") else spec, split, subset)
    mapped = {ours: theirs for ours, theirs in (columns or {}).items()}
    rows, dropped = [], []
    for line, row in source.rows():
        row = {**{k: v for k, v in row.items() if k not in mapped.values()},
               **{ours: row[theirs] for ours, theirs in mapped.items() if theirs in row}}
        chat = with_system(prompt_chat(row, spec, line), system_prompt)
        ids = render_prompt(chat, tokenizer)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            if not drop_long:
                raise DataError(f"the prompt renders to {len(ids)} tokens, more than the {max_prompt_tokens} "
                                "that data.max_length leaves after grpo.max_new_tokens", path=spec, line=line)
            dropped.append(f"{spec}:{line}")
            continue
        extra = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
        rows.append({"messages": chat, "prompt_ids": ids, "columns": extra, "where": f"{spec}:{line}"})
    if not rows:
        raise DataError("no prompt left" + (f" ({len(dropped)} longer than {max_prompt_tokens} tokens)"
                                            if dropped else ""), path=spec)
    return rows, dropped


def last_user(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")
