"""Several data files as one source: a glob (`data/*.jsonl`) or a folder of data files (a Hub
snapshot's `data/train-00000-of-00004.parquet`, an exporter's `part-*.jsonl`).

    shards/*.parquet        every matching file, sorted by name (`**` searches sub-folders)
    FOLDER                  every data file under it; when file or folder names carry a split
                            (train / validation / test, as the Hub names them), the one data.split
                            picks (train by default); data.subset keeps one sub-folder (`en/`)

The files are read one by one as single sources (each with its own cache) and concatenated.
Rows are numbered 1..N over all files; `locate` turns that number back into (file, its own line)
and DataError calls it, so an error names the file and line the user can open.
"""

from __future__ import annotations

import glob
import hashlib
import re
from bisect import bisect_right
from pathlib import Path

from datasets import concatenate_datasets

from ..errors import DataError, register_locator
from .source import Source

DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv", ".tsv", ".arrow", ".feather")
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}
GLOB_CHARS = set("*?[")
# JSON files that sit beside data in dataset and model folders and are never rows
NOT_DATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json", "config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
            "adapter_config.json", "summary.json", "data_stats.json", "time_metrics.json"}


def is_glob(spec: str) -> bool:
    return bool(GLOB_CHARS & set(spec))


def data_kind(path: Path) -> str | None:
    """'json', 'parquet', 'csv' or 'arrow' for a data file name, else None (also for the metadata
    JSON of dataset and model folders)."""
    if path.name.lower() in NOT_DATA:
        return None
    name = path.name.lower().removesuffix(".gz").removesuffix(".zst")
    for suffix, kind in ((".jsonl", "json"), (".json", "json"), (".ndjson", "json"), (".parquet", "parquet"),
                         (".csv", "csv"), (".tsv", "csv"), (".arrow", "arrow"), (".feather", "arrow")):
        if name.endswith(suffix):
            return kind
    return None


def _split_of(path: Path, root: Path) -> str | None:
    """The split a file's name or folder names (below root) announce, as the Hub reads them."""
    words = re.split(r"[^a-z]+", str(path.relative_to(root)).lower())
    for split, names in SPLIT_WORDS.items():
        if any(w in names for w in words):
            return split
    return None


def glob_files(spec: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True))
    files = [p for p in files if p.is_file() and data_kind(p)]
    if not files:
        raise DataError(f"no data file matches this pattern (looked for {', '.join(DATA_SUFFIXES)}, "
                        "also .gz / .zst); check the path", path=spec)
    return files


def folder_files(folder: Path, split: str | None, subset: str | None = None) -> list[Path] | None:
    """The data files under a folder (hidden folders skipped), narrowed to the sub-folder named
    `subset` (a Hub snapshot's `en/`, `fr/`) and to one split when the names carry splits; None when
    it holds no data file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and data_kind(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        return None
    if subset:
        inside = [p for p in files if subset in p.relative_to(folder).parts[:-1]]
        if not inside:
            found = sorted({q for p in files for q in p.relative_to(folder).parts[:-1]})
            raise DataError(f"no sub-folder '{subset}' (data.subset) holds data files; its sub-folders: "
                            f"{', '.join(found) or 'none'}", path=str(folder))
        files = inside
    splits = {p: _split_of(p, folder) for p in files}
    if any(splits.values()):
        want = split or "train"
        chosen = [p for p in files if splits[p] == want]
        if not chosen:
            found = sorted({s for s in splits.values() if s})
            raise DataError(f"no '{want}' files here (data.split); the file names carry: {', '.join(found)}",
                            path=str(folder))
        files = chosen
    return files


class ShardedRows:
    """Global row number (1-based) -> (file, the row's line in that file)."""

    def __init__(self, parts: list):
        self.parts = parts  # single-file Sources
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))

    def __call__(self, row: int) -> tuple[str, int]:
        i = min(bisect_right(self.starts, row - 1) - 1, len(self.parts) - 1)
        part, local = self.parts[i], row - 1 - self.starts[i]
        line = part.ds[local]["_line"] if part.is_json else local + 1
        return part.name, int(line)


def open_files(name: str, files: list[Path], open_one) -> object:
    """Concatenate single-file sources (same kind, same columns) into one Source named `name`."""


    kinds = {data_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataError(f"mixes {' and '.join(sorted(kinds))} files; point at one kind with a pattern such as "
                        f"'{name.rstrip('/')}/*.parquet'", path=name)
    parts = [open_one(str(f)) for f in files]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if not first.is_json and p.ds.column_names != first.ds.column_names:
            raise DataError(f"its columns ({', '.join(p.ds.column_names)}) differ from {first.name}'s "
                            f"({', '.join(first.ds.column_names)}); give the files one by one or mix them",
                            path=p.name)
    ds = concatenate_datasets([p.ds for p in parts])
    if first.is_json:  # number rows over all files; `locate` gives each its file and line back
        ds = ds.remove_columns("_line").add_column("_line", list(range(1, len(ds) + 1)))
    kind = "jsonl" if first.is_json else first.kind
    fp = hashlib.sha256("|".join(p.fingerprint for p in parts).encode()).hexdigest()[:24]
    register_locator(name, ShardedRows(parts))
    return Source(name, kind, ds, fp)


__all__ = ["is_glob", "glob_files", "folder_files", "open_files", "data_kind", "ShardedRows"]
