"""`slimtune compare RUN [RUN ...]`: the base and each tuned model answer the same prompts.

Every prompt is answered greedily and with seeded sampling (same seed per prompt for every
model, so differences come from the models), shown side by side in the terminal and written to
a Markdown file (plus the same content as JSON, which `slimtune report` shows).
"""

from __future__ import annotations

import gc
import shutil
import sys
import textwrap
from itertools import zip_longest
from pathlib import Path

from ..utils import atomic_write_json, atomic_write_text

MODES = ("greedy", "sampled")


def compare_runs(runs: list[str], prompts: str | None = None, max_prompts: int | None = 8,
                 max_new_tokens: int | None = None, temperature: float = 0.7, seed: int = 0,
                 out: str | None = None, dtype: str = "float32", log=None) -> dict:
    """Answers of the base (of the first run folder) and of each run; returns and writes them.

    Result: {prompts, temperature, seed, max_new_tokens, columns: [label, ...],
    rows: [{prompt, greedy: {label: text}, sampled: {label: text}}]}. Writes `out`
    (default RUN/compare.md of the first run) and the same stem with .json.
    """
    from .suite import PROMPTS
    from ..generate import last_user, load_prompts
    from ..runfolder import as_base, base_reference, load_run, run_kind

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    prompts = prompts or PROMPTS
    columns, answers, chats, base_name = [], {}, None, None
    for run, label in zip(runs, _labels(runs)):
        model, tok, cfg = load_run(run, dtype)
        if chats is None:
            chats = load_prompts(prompts, max_prompts, cfg.data.system_prompt)
            max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
        if run_kind(run) is not None and base_name is None:
            base_name, col = cfg.model.name, f"base ({Path(cfg.model.name).name})"
            log(f"answering {len(chats)} prompts: {col}")
            with as_base(model, base_reference(model, cfg, dtype)) as base:
                answers[col] = _answer(base, tok, chats, max_new_tokens, temperature, seed)
            columns.append(col)
        elif run_kind(run) is not None and cfg.model.name != base_name:
            log(f"note: {run} is tuned from {cfg.model.name}; the base column is {base_name}")
        log(f"answering {len(chats)} prompts: {label}")
        answers[label] = _answer(model, tok, chats, max_new_tokens, temperature, seed)
        columns.append(label)
        del model
        gc.collect()
    result = {"runs": list(runs), "prompts": prompts, "temperature": temperature, "seed": seed,
              "max_new_tokens": max_new_tokens, "columns": columns,
              "rows": [{"prompt": last_user(c), **{mode: {col: answers[col][i][mode] for col in columns}
                                                   for mode in MODES}}
                       for i, c in enumerate(chats)]}
    path = Path(out) if out else Path(runs[0]) / "compare.md"
    atomic_write_text(path, to_markdown(result))
    atomic_write_json(path.with_suffix(".json"), result)
    log(f"wrote {path} and {path.with_suffix('.json')}")
    return result


def _answer(model, tokenizer, chats, max_new_tokens, temperature, seed) -> list[dict]:
    """[{greedy: text, sampled: text}] per chat; prompt i samples with seed + i."""
    from ..generate import generate

    return [{mode: generate(model, tokenizer, c, max_new_tokens, temperature if mode == "sampled" else 0.0,
                            seed=seed + i)["text"] for mode in MODES} for i, c in enumerate(chats)]


def _labels(runs: list[str]) -> list[str]:
    """Column names: each run folder's name, its path where names repeat, then a number."""
    names = [Path(r).name or str(r) for r in runs]
    names = [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]
    return [n if names.count(n) == 1 else f"{n} #{names[:i].count(n) + 1}" for i, n in enumerate(names)]


def _mode_title(result: dict, mode: str) -> str:
    return "greedy" if mode == "greedy" else f"sampled (temperature {result['temperature']}, seed {result['seed']}+i)"


def to_markdown(result: dict) -> str:
    """One section per prompt; per mode a table with one column per model."""
    cols = result["columns"]
    cell = (lambda t: (t or "*(empty)*").replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")
            .replace("\n", "<br>"))
    lines = ["# slimtune compare", "",
             f"Prompts: {result['prompts']} ({len(result['rows'])}); at most {result['max_new_tokens']} new tokens; "
             f"models: {', '.join(cols)}.", ""]
    for i, row in enumerate(result["rows"], 1):
        lines += [f"## {i}. {row['prompt'].splitlines()[0] if row['prompt'].strip() else '(empty)'}", ""]
        if "\n" in row["prompt"].strip():
            lines += ["> " + row["prompt"].replace("\n", "\n> "), ""]
        for mode in MODES:
            lines += [f"**{_mode_title(result, mode)}**", "", "| " + " | ".join(cols) + " |",
                      "|" + "---|" * len(cols), "| " + " | ".join(cell(row[mode][c]) for c in cols) + " |", ""]
    return "\n".join(lines)


def to_terminal(result: dict, width: int | None = None) -> str:
    """Side-by-side columns, wrapped to the terminal width."""
    cols = result["columns"]
    width = width or shutil.get_terminal_size((120, 40)).columns
    gap = " | "
    w = max(20, (width - len(gap) * (len(cols) - 1)) // len(cols))

    def wrap(text: str) -> list[str]:
        text = "".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in text or "(empty)")
        out = []
        for line in text.splitlines() or [""]:
            out += textwrap.wrap(line, w, replace_whitespace=False, drop_whitespace=True) or [""]
        return out

    lines = []
    for i, row in enumerate(result["rows"], 1):
        lines += ["=" * min(width, w * len(cols) + len(gap) * (len(cols) - 1)), f"[{i}] {row['prompt']}"]
        for mode in MODES:
            lines += ["", f"-- {_mode_title(result, mode)}", gap.join(c[:w].ljust(w) for c in cols).rstrip(),
                      gap.join("-" * w for _ in cols)]
            blocks = [wrap(row[mode][c]) for c in cols]
            for parts in zip_longest(*blocks, fillvalue=""):
                lines.append(gap.join(p.ljust(w) for p in parts).rstrip())
        lines.append("")
    return "\n".join(lines)
