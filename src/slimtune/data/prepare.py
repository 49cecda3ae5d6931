"""Config -> rendered train / held-out / general-prompt examples, with their statistics.

    data.train --open_data--> Source --render_source (num_proc, cached)--> rendered table
               --seeded split by source row--> train / val examples {input_ids, labels}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from datasets import Dataset

from ..config import DataCfg
from ..errors import DataError
from .formats import Messages
from .preprocess import Rendered, render_source
from .reader import Reader, load_chats
from .source import Source
from .sources import open_source
from .tools import RenderStats, mix, render_all, split


@dataclass
class Prepared:
    train: list[dict]
    val: list[dict]
    general: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _is_mix(spec: str) -> bool:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return spec.startswith("chitchat") or len(parts) > 1 or parts[0].rpartition(":")[2].replace(".", "").isdigit()


def read_chats(spec: str, fmt: str = "auto", system_prompt: str | None = None, seed: int = 0,
               columns: dict | None = None, split: str | None = None, subset: str | None = None) -> list[Messages]:
    """One source (file, folder, hf:org/name, 'builtin:NAME'), 'chitchat[:N]', or a weighted list
    'a.jsonl:3,b.jsonl:1'."""
    if not _is_mix(spec):
        return load_chats(spec.strip(), fmt, system_prompt, columns, split, subset)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return mix(parts, seed=seed, fmt=fmt, system_prompt=system_prompt, log=lambda *_: None)


def read_records(spec: str, cfg: DataCfg, seed: int = 0) -> list[dict]:
    """Every row of a source in its canonical form: {"messages"} for chat formats,
    {"prompt", "completion"} (as message lists) for prompt_completion, {"text"} for raw text."""
    if _is_mix(spec):
        return [{"messages": c} for c in read_chats(spec, cfg.format, cfg.system_prompt, seed)]
    source = open_source(spec.strip(), cfg.split, cfg.subset)
    reader = Reader(source, cfg.format, cfg.columns, cfg.system_prompt)
    out = []
    for line, row in source.rows():
        kind, value = reader.record(line, row)
        if kind == "text":
            out.append({"text": value})
        elif value[1] is not None:  # prompt_completion: keep which part is trained
            out.append({"prompt": value[0][:-1], "completion": value[0][-1:]})
        else:
            out.append({"messages": value[0]})
    return out


def chats_source(chats: list[Messages], name: str) -> Source:
    """An in-memory Source of ChatML rows (for mixes and chitchat), fingerprinted by content."""
    texts = [json.dumps({"messages": c}, ensure_ascii=False) for c in chats]
    fp = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:24]
    ds = Dataset.from_dict({"_line": list(range(1, len(texts) + 1)), "_json": texts})
    return Source(name, "jsonl", ds, fp)


def open_data(spec: str, cfg: DataCfg, seed: int = 0) -> Source:
    """data.train / data.val / --data as a Source; mixes and chitchat are read into memory first."""
    if _is_mix(spec):
        return chats_source(read_chats(spec, cfg.format, cfg.system_prompt, seed), spec)
    return open_source(spec.strip(), cfg.split, cfg.subset)


def render(spec: str, cfg: DataCfg, tokenizer, seed: int = 0, log=None) -> Rendered:
    """One data spec rendered with the config's settings (cached; see preprocess.py)."""
    source = open_data(spec, cfg, seed)
    fmt = "messages" if _is_mix(spec) else cfg.format
    return render_source(source, tokenizer, fmt, None if _is_mix(spec) else cfg.columns, cfg.system_prompt,
                         cfg.train_on, cfg.max_length, cfg.num_proc, cfg.cache, log, cfg.train_reasoning)


def examples(rendered: Rendered, rows: set[int] | None = None, drop_untrained: bool = True,
             source: str = "data", max_examples: int | None = None) -> tuple[list[dict], RenderStats]:
    """The rendered examples of these source rows (all when None) as {input_ids, labels} lists."""
    t = rendered.ds.data
    row, line, n_trained, truncated = (t.column(c).to_pylist() for c in ("row", "line", "n_trained", "truncated"))
    keep = [i for i in range(len(row)) if rows is None or row[i] in rows]
    st = RenderStats()
    chosen = []
    for i in keep:
        st.truncated += bool(truncated[i])  # dropped ones too, as render_all counts them
        if n_trained[i] == 0:
            if not drop_untrained:
                raise DataError("no trained tokens left after truncation; raise data.max_length or set "
                                "data.drop_untrained=true", path=source, line=line[i])
            st.dropped += 1
            continue
        chosen.append(i)
    chosen = chosen[:max_examples] if max_examples else chosen
    ids_col, lab_col = t.column("input_ids"), t.column("labels")
    out = [{"input_ids": ids_col[i].as_py(), "labels": lab_col[i].as_py()} for i in chosen]
    for i, ex in zip(chosen, out):
        st.examples += 1
        st.tokens += len(ex["input_ids"])
        st.trained_tokens += n_trained[i]
        st.lengths.append(len(ex["input_ids"]))
    return out, st


def prepare(cfg: DataCfg, tokenizer, seed: int = 0, log=None) -> Prepared:
    if not cfg.train:
        raise DataError("no training data: set data.train (a data file or folder, hf:org/name, or builtin:instructions)")
    train_r = render(cfg.train, cfg, tokenizer, seed, log)
    n_rows = train_r.n_rows
    if cfg.val:
        val_r, train_rows, val_rows = render(cfg.val, cfg, tokenizer, seed, log), None, None
    else:
        tr, va = split(list(range(n_rows)), cfg.val_fraction, seed)
        val_r, train_rows, val_rows = train_r, set(tr), set(va)
    train, st = examples(train_r, train_rows, cfg.drop_untrained, cfg.train, cfg.max_examples)
    val, vst = examples(val_r, val_rows, True, cfg.val or "held-out split")
    if not train:
        raise DataError(f"{cfg.train}: no example has trained tokens left (max_length={cfg.max_length})")
    general: list[dict] = []
    if cfg.general_prompts:
        kw = dict(train_on=cfg.train_on, max_length=cfg.max_length)
        general, _ = render_all(load_chats(cfg.general_prompts), tokenizer, source=cfg.general_prompts, **kw)
    stats = {"format": train_r.format, "columns": train_r.columns, "cached": train_r.cached,
             "train": st.summary(), "val": vst.summary()}
    return Prepared(train, val, general, stats)


__all__ = ["Prepared", "prepare", "RenderStats", "render", "examples", "open_data"]
