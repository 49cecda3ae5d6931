"""Sweeps: a grid of overrides over one base config -> one run each -> one results table + plot.

    # sweep.yaml
    base: configs/quickstart.yaml        # or an inline config under `config:`
    output_dir: runs/sweep
    grid:
      train.lr: [5.0e-4, 1.0e-3]
      method.r: [8, 16]
      loss.kl_lambda: [0.0, 0.05]

or, one factor at a time around the base config (the base run, then each value of each key alone):

    vary:
      train.optimizer: [adafactor, lion]
      method.r: [4, 32]

`set:` (key: value) applies to every run, on top of the base config. `runs:` adds runs named by
their overrides, after the grid or the one-factor runs, e.g. the base and a factor again with other
seeds, to measure the noise a difference must beat:

    runs:
      - {train.seed: 1}
      - {train.optimizer: lion, train.seed: 1}

`eval_prompts:` is the prompts file each run's evaluation answers (default: builtin:eval_prompts).
`slimtune sweep FILE --shard 1/2` trains every second run (and 2/2 the others), so two processes
can share a machine's cores; each writes the results of the runs finished so far.

Every combination runs in turn (a finished run is skipped, so a killed sweep resumes), is
evaluated with `slimtune eval` (`evaluate: false` skips it; an existing eval.json is reused), and
`results.csv` / `results.md` rank the runs by held-out loss, with KL to base (both from the run's
own final evaluation, summary.json), the evaluation's
generation metrics and efficiency (trainable parameters, adapter size, s/step, tokens/s, peak
memory) beside it. A run on the Pareto front of (loss, KL) or (loss, trainable parameters) is
marked; results.png draws both fronts.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import yaml

from .config import build_config, load_config
from .errors import ConfigError
from .evaluate.suite import evaluate_run
from .train.loop import train
from .utils import atomic_write_text

COLUMNS = ["run", "eval_loss_before", "eval_loss", "eval_ppl", "eval_kl", "general_kl", "trainable",
           "adapter_mb", "s_per_step", "trained_tokens_per_s", "peak_rss_mb", "train_s", "steps", "pareto"]
GEN_COLUMNS = ["list_share", "heading_share", "stray_tag_share", "ended_share", "mean_tokens", "loop_share",
               "distinct_2", "ifeval_pass_rate"]
"""Generation metrics of the tuned model taken from each run's eval.json, where present."""


def grid_runs(grid: dict[str, list]) -> list[dict[str, object]]:
    """Every combination of the grid's values, as {key: value} override dicts (a stable order)."""
    for key, values in grid.items():
        if "." not in key or not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid entry '{key}' must be section.key: [value, ...]")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def one_at_a_time(vary: dict[str, list]) -> list[dict[str, object]]:
    """The base ({}), then one run per (key, value): the study design of a one-factor sweep."""
    grid_runs(vary)  # the same checks
    return [{}] + [{k: v} for k, values in vary.items() for v in values]


def run_name(overrides: dict) -> str:
    value = lambda v: "+".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    text = "_".join(f"{k.split('.')[-1]}-{value(v)}" for k, v in overrides.items())
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text) or "base"


def _override_strings(overrides: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]


def load_sweep(path: str | Path) -> tuple[dict, dict, Path]:
    spec = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(spec) - KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; use base, config, grid or vary, "
                          "runs, set, output_dir, evaluate, eval_prompts")
    if spec.get("grid") and spec.get("vary"):
        raise ConfigError(f"{path}: give grid (every combination) or vary (one factor at a time), not both")
    base = load_config(spec["base"]).to_dict() if spec.get("base") else (spec.get("config") or {})
    if spec.get("set"):  # every run's overrides, checked like any override
        base = build_config(base, _override_strings(spec["set"])).to_dict()
    extra = spec.get("runs") or []
    if not isinstance(extra, list) or not all(isinstance(r, dict) and r and all("." in k for k in r) for r in extra):
        raise ConfigError(f"{path}: runs must be a list of {{section.key: value, ...}} overrides, one per run")
    grid = {"__vary__": spec["vary"]} if spec.get("vary") else dict(spec.get("grid") or {})
    if extra:
        grid["__runs__"] = extra
    return base, grid, Path(spec.get("output_dir", "runs/sweep"))


KEYS = {"base", "config", "grid", "vary", "runs", "set", "output_dir", "evaluate", "eval_prompts"}


def sweep_runs(grid: dict) -> tuple[list[dict], list[str]]:
    """(the runs' overrides, the keys they vary) for a grid or a one-factor `vary`, then `runs:`."""
    grid = dict(grid)
    extra = grid.pop("__runs__", [])
    if "__vary__" in grid:
        combos, keys = one_at_a_time(grid["__vary__"]), list(grid["__vary__"])
    else:
        combos, keys = (grid_runs(grid) if grid else [{}]), list(grid)
    names = {run_name(c) for c in combos}
    for run in extra:
        if run_name(run) not in names:  # a run listed twice trains once
            names.add(run_name(run))
            combos.append(dict(run))
    return combos, list(dict.fromkeys(keys + [k for run in extra for k in run]))


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N): this process trains runs K, K+N, K+2N... (1-based); None -> (1, 1)."""
    if not text:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text}: give K/N, e.g. 1/2 and 2/2 for two processes") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {text}: K must be in 1..N")
    return k, n


def sweep(path: str | Path, log=print, extra: list[str] = (), evaluate: bool | None = None,
          shard: str | None = None) -> list[dict]:

    base, grid, out = load_sweep(path)
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if evaluate is None:
        evaluate = spec.get("evaluate", True)
    k, n = parse_shard(shard)
    combos, keys = sweep_runs(grid)
    for combo in combos:  # validate every combination before the first model loads
        build_config(base, list(extra) + _override_strings(combo))
    log(f"sweep: {len(combos)} runs into {out}" + (f" (shard {k}/{n}: every {n}th from run {k})" if n > 1 else ""))
    rows = []
    for i, combo in enumerate(combos, 1):
        name = run_name(combo)
        run_dir = out / name
        if (i - k) % n == 0:
            if not (run_dir / "summary.json").exists():
                log(f"[{i}/{len(combos)}] {name}")
                cfg = build_config(base, list(extra) + _override_strings(combo) + [f"train.output_dir={run_dir}"])
                train(cfg, log=log)
            if evaluate and not (run_dir / "eval.json").exists():
                evaluate_run(str(run_dir), log=log, with_heldout=False, prompts=spec.get("eval_prompts"))
        if (run_dir / "summary.json").exists():  # another shard's finished runs join the table
            rows.append(result_row(run_dir, name, combo))
    write_results(rows, out, keys)
    return rows


def result_row(run_dir: Path, name: str, combo: dict) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    row = {"run": name, **combo, "eval_loss_before": s["before"]["eval_loss"], "eval_loss": s["after"]["eval_loss"],
           "eval_ppl": s["after"]["eval_ppl"], "eval_kl": s["after"]["eval_kl"], "general_kl": s["after"]["general_kl"],
           "trained_tokens_per_s": s["time"]["trained_tokens_per_s"], "train_s": s["time"]["train_s"],
           "steps": s["steps"], "trainable": s["params"]["trainable"],
           "s_per_step": round(s["time"]["train_s"] / max(1, s["steps"]), 3), "peak_rss_mb": s["time"]["peak_rss_mb"],
           "adapter_mb": round(sum(f.stat().st_size for f in run_dir.glob("*.safetensors")) / 2**20, 3)}
    ev = run_dir / "eval.json"
    if ev.exists():
        result = json.loads(ev.read_text())
        tuned = {**result.get("generation", {}).get("tuned", {}),
                 "ifeval_pass_rate": ((result.get("ifeval") or {}).get("tuned") or {}).get("prompt_pass")}
        row.update({k: tuned[k] for k in GEN_COLUMNS if isinstance(tuned.get(k), (int, float))})
    return row


def pareto(rows: list[dict], x: str, y: str = "eval_loss") -> set[str]:
    """Names of the runs no other run beats on both x and y (lower is better for both)."""
    pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    return {r["run"] for r in pts
            if not any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in pts)}


def write_results(rows: list[dict], out: Path, grid_keys: list[str]) -> None:
    """results.csv and results.md (ranked by held-out loss), and results.png (loss vs KL)."""
    rows = sorted(rows, key=lambda r: (r["eval_loss"] is None, r["eval_loss"] or 0))
    fronts = {"kl": pareto(rows, "eval_kl"), "params": pareto(rows, "trainable")}
    for r in rows:
        r["pareto"] = "+".join(k for k, names in fronts.items() if r["run"] in names)
    gen = [c for c in GEN_COLUMNS if any(c in r for r in rows)]
    cols = ["run"] + grid_keys + COLUMNS[1:] + gen
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| rank | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {i} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for i, r in enumerate(rows, 1)]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot_fronts(rows, out / "results.png")


FRONTS = (("eval_kl", "KL(base || tuned) per held-out token", "loss vs drift from the base"),
          ("trainable", "trainable parameters", "loss vs trainable parameters"))


def plot_fronts(rows: list[dict], path: Path, fronts=FRONTS, ylabel: str = "held-out loss") -> None:
    """One panel per (x key, x label, title): each run's held-out loss against x, its Pareto front
    in red, runs named; a parameter-count axis is logarithmic. Nothing without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(fronts), figsize=(6.5 * len(fronts), 5), squeeze=False)
    for ax, (x, label, title) in zip(axes[0], fronts):
        pts = [r for r in rows if r.get("eval_loss") is not None and r.get(x) is not None]
        if not pts:
            continue
        ax.scatter([r[x] for r in pts], [r["eval_loss"] for r in pts], c="tab:blue")
        front = sorted((r for r in pts if r["run"] in pareto(pts, x)), key=lambda r: r[x])
        ax.plot([r[x] for r in front], [r["eval_loss"] for r in front], "o-", c="tab:red", label="Pareto front")
        for r in pts:
            ax.annotate(r["run"], (r[x], r["eval_loss"]), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        if x == "trainable":
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
