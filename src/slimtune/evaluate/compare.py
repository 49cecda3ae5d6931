"""`slimtune compare RUN [RUN ...]`: the base and each tuned model answer the same prompts.

Every prompt is answered greedily and with seeded sampling (prompt i samples with seed + i for
every model, so differences come from the models), all prompts of a model in batches
(generate_many), shown side by side in the terminal and written to a Markdown file (plus the same
content as JSON, which `slimtune report` shows). The base's answers come from the cache that
`slimtune eval` fills (evaluate/base_vs_tuned.py) when the settings match.
"""

from __future__ import annotations

import gc
import shutil
import sys
import textwrap
from itertools import zip_longest
from pathlib import Path

from ..data.prompts import last_user, load_prompts
from ..generate import settings_for, settings_from
from ..utils import atomic_write_json, atomic_write_text
from .base_vs_tuned import BaseVsTuned
from .suite import PROMPTS

MODES = ("greedy", "sampled")


def compare_runs(runs: list[str], prompts: str | None = None, max_prompts: int | None = 8,
                 max_new_tokens: int | None = None, temperature: float = 0.7, seed: int = 0,
                 out: str | None = None, dtype: str = "float32", log=None, use_cache: bool = True,
                 **knobs) -> dict:
    """Answers of the base (of the first run folder) and of each run; returns and writes them.

    Result: {prompts, temperature, seed, max_new_tokens, columns: [label, ...],
    rows: [{prompt, greedy: {label: text}, sampled: {label: text}}]}. Writes `out`
    (default RUN/compare.md of the first run) and the same stem with .json. knobs: top_p, top_k,
    repetition_penalty, no_repeat_ngram_size (None: the first run's eval settings).
    """

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    prompts = prompts or PROMPTS
    columns, answers, chats, base_name, modes = [], {}, None, None, None
    for run, label in zip(runs, _labels(runs)):
        pair = BaseVsTuned(run, dtype)
        cfg = pair.cfg
        if chats is None:
            chats = load_prompts(prompts, max_prompts, cfg.data.system_prompt)
            greedy = settings_for(cfg, max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens,
                                   seed=seed, **knobs)
            modes = {"greedy": greedy, "sampled": settings_from(cfg.eval, **{**greedy.to_dict(),
                                                                              "temperature": temperature})}
        if pair.is_run and base_name is None:
            base_name, col = cfg.model.name, f"base ({Path(cfg.model.name).name})"
            log(f"answering {len(chats)} prompts: {col}")
            gb = cfg.eval.gen_batch_size
            answers[col] = {m: [a["text"] for a in pair.answer_base(chats, s, gb, use_cache)] for m, s in modes.items()}
            columns.append(col)
        elif pair.is_run and cfg.model.name != base_name:
            log(f"note: {run} is tuned from {cfg.model.name}; the base column is {base_name}")
        log(f"answering {len(chats)} prompts: {label}")
        answers[label] = {m: [a["text"] for a in pair.answer_tuned(chats, s, cfg.eval.gen_batch_size)]
                          for m, s in modes.items()}
        columns.append(label)
        del pair
        gc.collect()
    result = {"runs": list(runs), "prompts": prompts, "temperature": temperature, "seed": seed,
              "max_new_tokens": modes["greedy"].max_new_tokens, "settings": modes["sampled"].to_dict(),
              "columns": columns,
              "rows": [{"prompt": last_user(c), **{mode: {col: answers[col][mode][i] for col in columns}
                                                   for mode in MODES}}
                       for i, c in enumerate(chats)]}
    path = Path(out) if out else Path(runs[0]) / "compare.md"
    atomic_write_text(path, to_markdown(result))
    atomic_write_json(path.with_suffix(".json"), result)
    log(f"wrote {path} and {path.with_suffix('.json')}")
    return result


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
