"""One opened data source: a memory-mapped Arrow table and how its rows decode (sources.py opens
them, shards.py joins several files into one)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator


@dataclass
class Source:
    """One opened source. `ds` is memory-mapped; rows come out as (row number, dict)."""

    name: str          # what messages print: the path, or hf:org/name
    kind: str          # jsonl, json, parquet, csv, arrow, disk, hf
    ds: object         # datasets.Dataset
    fingerprint: str   # changes when the content changes (a content hash for files)

    @property
    def is_json(self) -> bool:
        return self.kind in ("jsonl", "json")

    def __len__(self) -> int:
        return len(self.ds)

    def columns(self) -> list[str]:
        """Column names; for JSON text, the keys of the first row."""
        if self.is_json:
            return list(self.row(0)[1]) if len(self) else []
        return list(self.ds.column_names)

    def row(self, i: int) -> tuple[int, dict]:
        return next(self.rows(i, i + 1))

    def rows(self, start: int = 0, stop: int | None = None, batch: int = 1000) -> Iterator[tuple[int, dict]]:
        """(row number, row) for rows start..stop; JSON rows are parsed here, one at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        for s in range(start, stop, batch):
            cols = self.ds[s:min(s + batch, stop)]
            yield from decode_batch(cols, s, self.is_json)


def decode_batch(cols: dict, offset: int, is_json: bool) -> Iterator[tuple[int, dict]]:
    """A columnar batch (as `Dataset.__getitem__(slice)` or `map(batched=True)` give it) -> rows."""
    if is_json:
        yield from zip(cols["_line"], map(json.loads, cols["_json"]))
        return
    names = list(cols)
    n = len(cols[names[0]]) if names else 0
    for i in range(n):
        yield offset + i + 1, {k: _drop_nulls(cols[k][i]) for k in names}


def _drop_nulls(value):
    """Arrow gives every struct all the fields of any row, null where a row had none: drop those
    inside lists and dicts, so a message reads as it was written."""
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value
