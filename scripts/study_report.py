"""The study's results folder and table, from the runs of `slimtune sweep configs/sweeps/study.yaml`.

    python scripts/study_report.py [--runs runs/study] [--sweep configs/sweeps/study.yaml] [--out docs/study]

Writes OUT/results.csv and OUT/results.json (one row per finished run: the factor it changes,
held-out loss before / after, KL to base on held-out and general prompts, trainable parameters,
adapter size, s/step, trained tokens/s, peak memory, the generation metrics of `slimtune eval`,
the chosen layers of auto:K) and OUT/results.png, and puts the table into docs/study.md between
its `<!-- table -->` markers. Runs on other data have another held-out set: their loss is not
comparable with the rest, so they are marked and kept off the Pareto fronts; KL on the general
prompts (the same 24 prompts for every run) compares across all of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimtune.sweep import load_sweep, pareto, plot_fronts, result_row, run_name, sweep_runs  # noqa: E402

GEN = ("list_share", "loop_share", "mean_tokens", "distinct_2", "ended_share", "hit_limit_share")


def rows_of(runs: Path, sweep: Path) -> list[dict]:
    _, grid, _ = load_sweep(sweep)
    combos, _ = sweep_runs(grid)
    rows = []
    for combo in combos:
        name = run_name(combo)
        folder = runs / name
        if not (folder / "summary.json").exists():
            continue
        row = result_row(folder, name, combo)
        factor, value = next(iter(combo.items())) if combo else ("base", "")
        row.update(factor=factor, value=json.dumps(value) if isinstance(value, list) else value,
                   same_heldout=factor != "data.train")
        ev = folder / "eval.json"
        if ev.exists():
            g = json.loads(ev.read_text())["generation"]
            for side in ("base", "tuned"):
                row.update({f"{side}_{k}": g[side].get(k) for k in GEN})
        lc = folder / "layer_choice.json"
        if lc.exists():
            row["layers"] = json.loads(lc.read_text()).get("chosen")
        rows.append(row)
    comparable = [r for r in rows if r["same_heldout"]]
    fronts = {"kl": pareto(comparable, "general_kl"), "params": pareto(comparable, "trainable")}
    for r in rows:
        r["pareto"] = "+".join(k for k, names in fronts.items() if r["run"] in names)
    return rows


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["factor"] == "base"), None)
    head = ("| run | changes | held-out loss | vs base | KL held-out | KL general | trainable | adapter MB "
            "| s/step | tokens/s | peak RSS MB | lists | loops | mean tokens | Pareto |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (not r["same_heldout"], r["eval_loss"])):
        delta = f"{r['eval_loss'] - base['eval_loss']:+.4f}" if base and r["same_heldout"] else "other data"
        change = "(the quickstart)" if r["factor"] == "base" else f"{r['factor']}={r['value']}"
        lines.append(
            f"| {r['run']} | {change} | {r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f} "
            f"| {delta} | {r['eval_kl']:.4f} | {r['general_kl']:.4f} | {r['trainable']:,} | {r['adapter_mb']:.2f} "
            f"| {r['s_per_step']:.2f} | {r['trained_tokens_per_s']:.0f} | {r['peak_rss_mb']:,.0f} "
            f"| {_pct(r.get('tuned_list_share'))} | {_pct(r.get('tuned_loop_share'))} "
            f"| {_num(r.get('tuned_mean_tokens'))} | {r['pareto'] or ''} |")
    return "\n".join(lines)


def _pct(v):
    return "-" if v is None else f"{v:.0%}"


def _num(v):
    return "-" if v is None else f"{v:.1f}"


def plot(rows: list[dict], path: Path) -> None:
    """Loss against general-prompt KL and against trainable parameters, runs on the base data only."""
    plot_fronts([r for r in rows if r["same_heldout"]], path,
                (("general_kl", "KL(base || tuned) on the general prompts", "quality vs drift from the base"),
                 ("trainable", "trainable parameters", "quality vs trainable parameters")),
                ylabel="held-out loss (instructions split)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "study"))
    ap.add_argument("--sweep", default=str(ROOT / "configs" / "sweeps" / "study.yaml"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "study"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "study.md"))
    args = ap.parse_args()
    rows = rows_of(Path(args.runs), Path(args.sweep))
    if not rows:
        sys.exit(f"no finished run in {args.runs}: run `slimtune sweep {args.sweep}` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import csv

    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    import torch

    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "python": platform.python_version(),
            "torch": torch.__version__, "sweep": str(Path(args.sweep).relative_to(ROOT))}
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1, default=str) + "\n")
    plot(rows, out / "results.png")
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    doc = Path(args.doc)
    if doc.exists():
        d = doc.read_text()
        a, b = d.find("<!-- table -->"), d.find("<!-- /table -->")
        if a >= 0 and b > a:
            doc.write_text(d[:a] + "<!-- table -->\n" + text + "\n" + d[b:])
    print(text)
    print(f"\n{len(rows)} runs -> {out}/results.csv, results.json, results.png" + (f"; table in {doc}" if doc.exists() else ""))


if __name__ == "__main__":
    main()
