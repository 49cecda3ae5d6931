"""Render a source into training examples, in `num_proc` processes, cached on disk.

    source rows --Reader.record--> chat | text --render_chat | text_examples--> rows of
    {row, line, input_ids, labels, n_trained, truncated, error}

`row` is the source row (0-based; raw text can give several examples per row), `line` its number
for messages. The table is written to <data cache>/rendered/<key>/ and memory-mapped; the key
hashes the source's content, the tokenizer (vocabulary, special tokens, chat template), the data
settings that change rendering and the rendering code itself, so a second run and `slimtune eval`
load it instead of rendering again, and any change renders afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset, concatenate_datasets
from datasets.utils.logging import disable_progress_bar

from ..errors import DataError
from .reader import Reader
from .render import IGNORE, render_chat
from .source import Source, decode_batch
from .sources import data_cache

VERSION = "1"  # bump when the rendered columns change meaning


@dataclass
class Rendered:
    ds: object       # datasets.Dataset with the columns above
    format: str      # the detected (or given) format
    columns: dict    # the column mapping used ({} when the file's names were ours)
    cached: bool     # True when loaded from the cache
    n_rows: int      # rows of the source


def text_examples(text: str, tokenizer, max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """Raw text -> examples for continued pre-training: tokens (+ eos), every one trained, cut into
    pieces of at most max_length tokens (a long document is not truncated away but split)."""
    ids = tokenizer(text)["input_ids"]  # the tokenizer's own bos, as in pre-training
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    step = max_length or len(ids)
    return [(ids[s:s + step], ids[s:s + step]) for s in range(0, len(ids), step) if len(ids[s:s + step]) > 1]


def _render_batch(batch: dict, indices: list[int], reader: Reader, is_json: bool, tokenizer, train_on: str,
                  max_length: int | None, train_reasoning: bool = True) -> dict:
    out = {k: [] for k in ("row", "line", "input_ids", "labels", "n_trained", "truncated", "error")}

    def add(row, line, ids, labels, truncated=False, error=""):
        out["row"].append(row)
        out["line"].append(line)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_trained"].append(sum(lab != IGNORE for lab in labels[1:]))  # position 0 is never a target
        out["truncated"].append(truncated)
        out["error"].append(error)

    for row_index, (line, row) in zip(indices, decode_batch(batch, indices[0] if indices else 0, is_json)):
        try:
            kind, value = reader.record(line, row)
            if kind == "text":
                pieces = text_examples(value, tokenizer, max_length)
                for ids, labels in pieces:
                    add(row_index, line, ids, labels, truncated=len(pieces) > 1)
                continue
            msgs, only = value
            try:
                ids, labels = render_chat(msgs, tokenizer, train_on if only is None or train_on == "all" else only,
                                          train_reasoning=train_reasoning)
            except DataError as e:
                raise DataError(str(e), path=reader.name, line=line) from None
            cut = max_length is not None and len(ids) > max_length
            add(row_index, line, ids[:max_length] if cut else ids, labels[:max_length] if cut else labels, cut)
        except DataError as e:
            add(row_index, line, [], [], error=str(e))
    return out


def tokenizer_key(tokenizer) -> str:
    """What in a tokenizer changes rendering: vocabulary and merges, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocab, str(tokenizer.chat_template),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def _code_key() -> str:
    here = Path(__file__).parent
    text = "".join((here / f).read_text() for f in ("render.py", "formats.py", "reader.py", "preprocess.py"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_key(source: Source, reader: Reader, tokenizer, train_on: str, max_length: int | None,
              train_reasoning: bool = True) -> str:
    settings = {"v": VERSION, "source": source.fingerprint, "format": reader.format, "columns": reader.mapping,
                "system_prompt": reader.system_prompt, "train_on": train_on, "max_length": max_length,
                "train_reasoning": train_reasoning,
                "tokenizer": tokenizer_key(tokenizer), "code": _code_key()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _load(folder: Path):
    parts = [Dataset.from_file(str(p)) for p in sorted(folder.glob("*.arrow"))]
    if not parts:
        raise FileNotFoundError(f"no .arrow files in {folder}")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def render_source(source: Source, tokenizer, fmt: str = "auto", columns: dict | None = None,
                  system_prompt: str | None = None, train_on: str = "assistant", max_length: int | None = None,
                  num_proc: int = 1, cache: bool = True, log=None, train_reasoning: bool = True) -> Rendered:
    """Render every row of `source` (see module doc); raises the first row's DataError, if any."""

    disable_progress_bar()
    reader = Reader(source, fmt, columns, system_prompt)
    key = cache_key(source, reader, tokenizer, train_on, max_length, train_reasoning)
    final = data_cache() / "rendered" / key
    if cache and (final / "done").exists():
        try:
            ds = _load(final)
        except Exception as e:  # a cache: a damaged copy costs one rendering, never the run
            print(f"note: the cached rendering {final} cannot be read ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:120]}); rendering again", file=sys.stderr)
            _set_aside(final)
        else:
            _raise_first_error(ds)
            return Rendered(ds, reader.format, reader.mapping, True, len(source))
    tmp = final.parent / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    nproc = max(1, min(num_proc, len(source)))
    if log and nproc > 1:
        log(f"rendering {len(source):,} rows of {source.name} in {nproc} processes")
    try:
        ds = source.ds.map(_render_batch, batched=True, batch_size=256, with_indices=True,
                           remove_columns=source.ds.column_names, num_proc=nproc if nproc > 1 else None,
                           cache_file_name=str(tmp / "rendered.arrow"), load_from_cache_file=False,
                           fn_kwargs=dict(reader=reader, is_json=source.is_json, tokenizer=tokenizer,
                                          train_on=train_on, max_length=max_length,
                                          train_reasoning=train_reasoning),
                           desc="rendering")
        _raise_first_error(ds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not cache:
        return Rendered(ds, reader.format, reader.mapping, False, len(source))
    (tmp / "done").write_text(json.dumps({"source": source.name, "rows": len(source), "examples": len(ds)}))
    del ds
    _publish(tmp, final)
    return Rendered(_load(final), reader.format, reader.mapping, False, len(source))


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished rendering into place with one rename. Other processes (the ranks of an
    `accelerate launch`, two runs on one file) may render the same key at the same time: the first
    rename wins and the others drop their copy, so no process ever reads a half-replaced folder."""
    for _ in range(5):
        try:
            os.rename(tmp, final)  # refuses a non-empty `final`
            return
        except OSError:
            if (final / "done").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return
            _set_aside(final)  # an unfinished folder from an older version or a killed process
    raise OSError(f"cannot move the rendering {tmp} to {final}; remove {final.parent} and run again")


def _set_aside(folder: Path) -> None:
    """Remove `folder` without a window in which it exists half-deleted."""
    aside = folder.parent / f".old-{folder.name}-{os.getpid()}"
    try:
        os.rename(folder, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _raise_first_error(ds) -> None:
    errors = ds.data.column("error")
    bad = pc.index(pc.not_equal(errors, ""), True).as_py()
    if bad is not None and bad >= 0:
        raise DataError(errors[bad].as_py())
