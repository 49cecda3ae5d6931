"""Open any data source as a memory-mapped `datasets.Dataset`, with row numbers for error messages.

    data.jsonl, data.json       JSON lines, or a JSON list of objects (also .gz / .zst compressed)
    data.parquet, data.csv      tabular files (CSV: the header names the columns)
    data.arrow                  an Arrow stream (as `datasets` writes) or an Arrow IPC / Feather file
    FOLDER                      written by `Dataset.save_to_disk` (or a DatasetDict: pick data.split)
    FOLDER, data/*.parquet      several data files read as one (shards.py: Hub snapshots, globs)
    hf:org/name                 a Hugging Face Hub dataset (network), with data.split and data.subset
    builtin:NAME                a file shipped with slimtune

JSON text is checked line by line as it is read (errors name file:line) and stored as one string
per row (`_json`, with its line number `_line`), so rows keep exactly their own keys: Arrow would
unify the keys of all rows and fill the gaps with nulls. The Arrow copy lives under
<cache>/data/sources/<content hash>.arrow and is memory-mapped, so a second read costs nothing.
Rows of tabular sources are numbered from 1 (CSV: the data rows, header not counted).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import zstandard
from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets.arrow_writer import ArrowWriter
from datasets.table import InMemoryTable
from datasets.utils.logging import disable_progress_bar, set_verbosity

from ..errors import DataError
from ..utils import atomic_file, cache_dir
from .formats import resolve_path
from .shards import folder_files, glob_files, is_glob, open_files
from .source import Source

BOM = b"\xef\xbb\xbf"
SUFFIXES = (".jsonl, .json, .parquet, .csv, .arrow (JSON also as .gz or .zst), a folder of them or a pattern "
            "(data/*.parquet), a save_to_disk folder, or hf:org/name")
OFFLINE_HINT = ("download it where there is network and save a local copy "
                "(python -c \"import datasets; datasets.load_dataset('{name}'{sub}, split='{split}')"
                ".save_to_disk('DIR')\", or .to_parquet('data.parquet')), then point at that path")


def data_cache() -> Path:
    """Where sources and rendered examples are cached: $SLIMTUNE_DATA_CACHE, else <cache>/data."""
    return Path(os.environ.get("SLIMTUNE_DATA_CACHE") or cache_dir() / "data").expanduser()


def open_source(spec: str, split: str | None = None, subset: str | None = None) -> Source:
    """Open `spec` (see module doc). Raises DataError, one line, for anything it cannot read."""

    disable_progress_bar()  # one line per error, and no bars from reading a 3-row CSV
    set_verbosity(50)  # datasets logs its own copy of a read error; ours names the file and says what to do
    spec = str(spec)
    if spec.startswith("hf:"):
        return _open_hub(spec[3:], split or "train", subset)
    if is_glob(spec) and not spec.startswith("builtin:") and not Path(spec).expanduser().exists():  # data[1].jsonl
        return open_files(spec, glob_files(spec), open_source)
    path = resolve_path(spec)
    if path.is_dir():
        if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            files = folder_files(path, split, subset)  # a folder of data files (shards, a Hub snapshot)
            if files:
                return open_files(spec, files, open_source)
        return _open_folder(path, split)
    name = path.name.lower()
    base = name.removesuffix(".gz").removesuffix(".zst")
    try:
        if base.endswith((".jsonl", ".json", ".ndjson")) or name.endswith((".gz", ".zst")):
            return _open_json(path)
        if name.endswith(".parquet"):
            return _tabular(path, "parquet")
        if name.endswith((".csv", ".tsv")):
            return _tabular(path, "csv")
        if name.endswith((".arrow", ".feather")):
            return _open_arrow(path)
    except DataError:
        raise
    except Exception as e:  # pyarrow / pandas errors: a damaged or mislabelled file
        raise DataError(f"cannot read it as {base.rsplit('.', 1)[-1]}: {_first_line(e)}", path=str(path)) from None
    raise DataError(f"cannot read '{path.suffix or path.name}' files; give {SUFFIXES}", path=str(path))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------- JSON text


def _open_bytes(path: Path):
    """A binary file object, decompressing .gz and .zst on the fly."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


@lru_cache(maxsize=64)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def file_hash(path: Path) -> str:
    """Content hash of a file (remembered per path, size and mtime within a process)."""
    st = path.stat()
    return _hash_file(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    if lineno == 1:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError("the file is UTF-16 encoded (it starts with a UTF-16 byte-order mark); "
                            "save it as UTF-8", path=str(path), line=1)
        raw = raw.removeprefix(BOM)  # Windows tools write a UTF-8 byte-order mark: harmless
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        enc = _guess_encoding(raw)
        raise DataError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); it looks like {enc}: "
                        f"convert the file, e.g. iconv -f {enc} -t UTF-8 IN > OUT", path=str(path), line=lineno) from None


def _guess_encoding(raw: bytes) -> str:
    try:
        from charset_normalizer import from_bytes
        best = from_bytes(raw).best()
        if best is not None and best.encoding not in ("utf_8", "ascii"):
            return best.encoding.replace("_", "-").upper()
    except ImportError:
        pass
    return "CP1252"  # the usual culprit: a Windows "ANSI" export


def _json_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines, each checked to hold one JSON object."""
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, start=1):
            text = _decode(raw, path, lineno)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object",
                                path=str(path), line=lineno) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", path=str(path), line=lineno)
            yield lineno, text


def _json_list(path: Path, head: str) -> Iterator[tuple[int, str]] | None:
    """Rows of a JSON document holding a list; None when the file is JSON lines after all."""
    with _open_bytes(path) as f:
        raw = f.read()
    lines = raw.split(b"\n")
    text = "\n".join(_decode(r, path, i) for i, r in enumerate(lines, start=1))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and not head.startswith("["):
            return None  # '{...}\n{...}': JSON lines in a .json file
        raise DataError(f"not valid JSON ({e.msg}, column {e.colno}); fix the file or use JSONL",
                        path=str(path), line=e.lineno) from None
    if not isinstance(data, list):
        raise DataError("a .json data file must hold a list of objects", path=str(path), line=1)
    for i, row in enumerate(data, start=1):  # 'line' is the row number in a JSON list
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path=str(path), line=i)
    return ((i, json.dumps(row, ensure_ascii=False)) for i, row in enumerate(data, start=1))


def _open_json(path: Path) -> Source:

    key = file_hash(path)
    out = data_cache() / "sources" / f"{key}.arrow"
    kind = "jsonl"
    if not out.exists():
        with _open_bytes(path) as f:
            head = _decode(f.read(4096).split(b"\n")[0], path, 1).lstrip()
        base = path.name.lower().removesuffix(".gz").removesuffix(".zst")
        rows = _json_list(path, head) if head.startswith("[") or base.endswith(".json") else None
        kind = "jsonl" if rows is None else "json"
        rows = _json_lines(path) if rows is None else rows
        with atomic_file(out) as tmp:
            writer = ArrowWriter(features=Features({"_line": Value("int64"), "_json": Value("string")}), path=str(tmp))
            try:
                n = 0
                for lineno, text in rows:
                    writer.write({"_line": lineno, "_json": text})
                    n += 1
                writer.finalize()
            finally:
                writer.close()
            if n == 0:
                raise DataError("the file holds no rows", path=str(path))
    ds = Dataset.from_file(str(out))
    return Source(str(path), kind, ds, key)


# ------------------------------------------------------------------------------- tabular, folders, hub


def _tabular(path: Path, kind: str) -> Source:

    cache = str(data_cache() / "hf")
    if kind == "parquet":
        ds = Dataset.from_parquet(str(path), cache_dir=cache)
    else:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","

        with open(path, "rb") as f:
            header = _decode(f.readline(), path, 1)  # BOM and encoding checks with a line number
        names = next(csv.reader([header.removeprefix("\ufeff")], delimiter=sep), [])
        # CSV has no types: every cell is text ("4" stays "4"), an empty cell is "" not NaN
        ds = Dataset.from_csv(str(path), cache_dir=cache, sep=sep, encoding="utf-8-sig", keep_default_na=False,
                              features=Features({n: Value("string") for n in names}))
    if len(ds) == 0:
        raise DataError("the file holds no rows", path=str(path))
    return Source(str(path), kind, ds, file_hash(path))


def _open_arrow(path: Path) -> Source:

    try:
        ds = Dataset.from_file(str(path))  # the stream format `datasets` writes, memory-mapped
    except Exception:
        with pa.memory_map(str(path)) as mm:  # an Arrow IPC / Feather file: zero-copy over the map
            table = pa.ipc.open_file(mm).read_all()
        ds = Dataset(InMemoryTable(table))
    return Source(str(path), "arrow", ds, file_hash(path))


def _open_folder(path: Path, split: str | None) -> Source:

    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"not a dataset folder: no data file under it (.jsonl, .json, .parquet, .csv, .arrow) "
                        f"and no save_to_disk state.json; it holds {describe_folder(path)}: point at a data "
                        "file, or save the data with save_to_disk", path=str(path))
    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"cannot load the dataset folder: {_first_line(e)}", path=str(path)) from None
    if isinstance(ds, DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise DataError(f"no split '{split}' (data.split); it has: {', '.join(ds)}", path=str(path))
        ds = ds[split]
    return Source(str(path), "disk", ds, ds._fingerprint)


def describe_folder(path: Path, limit: int = 6) -> str:
    """'3 .txt files, 1 folder (notes)' - what a folder holds, for error messages."""
    entries = sorted(path.iterdir())
    if not entries:
        return "nothing (it is empty)"
    folders = [e.name for e in entries if e.is_dir()]
    kinds = Counter(e.suffix.lower() or "extension-less" for e in entries if not e.is_dir())
    parts = [f"{n} {ext} file{'s' if n > 1 else ''}" for ext, n in kinds.most_common(limit)]
    if folders:
        shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        parts.append(f"{len(folders)} folder{'s' if len(folders) > 1 else ''} ({shown})")
    return ", ".join(parts)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        from huggingface_hub import constants
        return flag or bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return flag


def _open_hub(name: str, split: str, subset: str | None) -> Source:
    spec = f"hf:{name}"
    hint = OFFLINE_HINT.format(name=name, sub=f", '{subset}'" if subset else "", split=split)
    if hub_offline():
        raise DataError(f"{spec} is a Hub dataset and HF_HUB_OFFLINE is set, so it cannot be downloaded: {hint}")

    try:
        ds = load_dataset(name, subset, split=split)
    except Exception as e:  # no network, no such dataset, a missing subset or split
        raise DataError(f"cannot load {spec} (split={split}, subset={subset}): {_first_line(e)}. "
                        f"Without network: {hint}") from None
    return Source(spec, "hf", ds, ds._fingerprint)
