"""Rows of a source -> chats (or raw text), through the user's column names.

Besides the chat formats of formats.py (messages, alpaca, dolly, sharegpt) two more:
- prompt_completion: {"prompt": str | messages, "completion": str | [one assistant message]};
  rendered with the chat template, prompt as the user turn(s), completion as the assistant turn,
  and only the completion is trained;
- text: {"text": str}: raw text for continued pre-training, no chat template, every token trained.

Column mapping (`data.columns`, `--columns`) says which of the file's columns holds each of our
fields: {instruction: question, output: answer} or {messages: conversation}. Errors name the
row and the file's own column.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import parse_columns
from ..errors import DataError
from .formats import ROLES, SIGNATURES, Messages, detect_format, row_to_messages
from .source import Source
from .sources import open_source


class Reader:
    """Resolves a source's format and column mapping once, then converts rows one at a time."""

    def __init__(self, source: Source, fmt: str = "auto", columns: dict | str | None = None,
                 system_prompt: str | None = None):
        self.name, self.system_prompt = source.name, system_prompt
        self.mapping = parse_columns(columns)
        self.back = {theirs: ours for ours, theirs in self.mapping.items()}
        self.per_row = source.is_json and fmt == "auto"  # JSON rows may differ: detect each, as before
        if len(source) == 0:
            raise DataError("the source holds no rows", path=self.name)
        line, first = source.row(0)
        missing = [t for t in self.mapping.values() if t not in first]
        if missing:
            ours = self.back[missing[0]]
            raise DataError(f"data.columns maps '{ours}' to column '{missing[0]}', which this source does not have; "
                            f"its columns are: {', '.join(map(str, first))}", path=self.name, line=line)
        self.format = fmt if fmt != "auto" else self.detect(self.rename(first), line)

    def rename(self, row: dict) -> dict:
        """The row under our field names (a mapped column replaces any column of our name)."""
        if not self.mapping:
            return row
        out = {k: v for k, v in row.items() if k not in self.mapping or k in self.back}
        for ours, theirs in self.mapping.items():
            if theirs in row:
                out[ours] = row[theirs]
        return out

    def detect(self, row: dict, line: int) -> str:
        keys = set(row)
        if "text" in keys and any(sig <= keys for n, sig in SIGNATURES.items() if n != "text"):
            keys.discard("text")  # a chat with a spare 'text' column is a chat
        try:
            return detect_format({k: row[k] for k in keys}, self.name, line)
        except DataError as e:
            hint = " (map your columns with data.columns / --columns, e.g. instruction=question,output=answer)"
            raise DataError(e.message + hint, path=self.name, line=line) from None

    def their(self, field: str | None) -> str | None:
        """Our field path ('messages[2].content') in the file's column names ('conversation[2].content')."""
        if not field:
            return field
        root = re.match(r"[^\[.]+", field).group(0)
        return self.mapping.get(root, root) + field[len(root):]

    def record(self, line: int, row: dict) -> tuple[str, object]:
        """('chat', (messages, train_on or None)) or ('text', str) for one row."""
        row = self.rename(row)
        fmt = self.format
        if self.per_row:
            fmt = self.detect(row, line)
            if fmt != self.format:
                raise DataError(f"this row looks like '{fmt}' but the file starts as '{self.format}'; "
                                "one file holds one format (convert with `slimtune data convert`)",
                                path=self.name, line=line)
        missing = sorted(k for k in SIGNATURES[fmt] if row.get(k) is None)
        try:
            if missing:
                raise DataError(f"missing for format '{fmt}'", path=self.name, line=line, field=missing[0])
            if fmt == "text":
                return "text", text_of(row, self.name, line)
            if fmt == "prompt_completion":
                return "chat", (prompt_completion(row, self.name, line, self.system_prompt), "last")
            return "chat", (row_to_messages(row, fmt, self.name, line, self.system_prompt), None)
        except DataError as e:
            if e.field is None or not self.mapping:
                raise
            raise DataError(e.message, path=e.path, line=e.line, field=self.their(e.field)) from None

    def chat(self, line: int, row: dict) -> Messages:
        kind, value = self.record(line, row)
        if kind != "chat":
            raise DataError("raw text rows hold no chat; this command needs a chat format", path=self.name, line=line)
        return value[0]


def text_of(row: dict, path: str, line: int) -> str:
    text = row.get("text")
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {type(text).__name__}", path=path, line=line, field="text")
    if not text.strip():
        raise DataError("empty text: nothing to train on", path=path, line=line, field="text")
    return text


def _turns(value, key: str, path: str, line: int) -> Messages:
    if isinstance(value, str):
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError("must be a string or a non-empty list of {role, content}", path=path, line=line, field=key)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(f"each turn needs a role ({', '.join(ROLES)}) and a string content",
                            path=path, line=line, field=f"{key}[{i}]")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_completion(row: dict, path: str, line: int, system_prompt: str | None = None) -> Messages:
    """Prompt turn(s) + one assistant turn; the caller trains the last turn only."""
    prompt = _turns(row["prompt"], "prompt", path, line)
    completion = _turns(row["completion"], "completion", path, line)
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise DataError("the completion must be one assistant turn (a string, or a list of one assistant message)",
                        path=path, line=line, field="completion")
    if not completion[0]["content"].strip():
        raise DataError("empty completion: nothing to train on", path=path, line=line, field="completion")
    if prompt[-1]["role"] == "assistant":
        raise DataError("the prompt must end with a user turn", path=path, line=line, field=f"prompt[{len(prompt) - 1}]")
    msgs = prompt + completion
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a source (see sources.py): JSONL line numbers, else row
    numbers. Small files only: large ones are read row by row through `sources.open_source`."""
    return list(open_source(str(path)).rows())


def load_chats(path: str | Path, fmt: str = "auto", system_prompt: str | None = None,
               columns: dict | str | None = None, split: str | None = None,
               subset: str | None = None) -> list[Messages]:
    """Read a source of one chat format into a list of chats; mixed formats in one file are an error.

    columns: {our field: the file's column}; split/subset: which part of a folder or hf: dataset.
    """

    source = open_source(str(path), split, subset)
    reader = Reader(source, fmt, columns, system_prompt)
    return [reader.chat(line, row) for line, row in source.rows()]
