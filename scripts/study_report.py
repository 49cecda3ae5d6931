"""docs/study.md's tables, findings and presets, computed from the study's runs.

    python scripts/study_report.py [--runs runs/study] [--sweep configs/sweeps/study.yaml]

1. Each finished run of `slimtune sweep configs/sweeps/study.yaml` in --runs is kept as one small
   JSON in docs/study/runs/ (its overrides, summary, generation metrics, chosen layers): the
   committed runs. Without --runs folder, the committed runs alone are read.
2. From those: docs/study/results.csv / results.json (one row per run), results.png, the noise
   table (the base's seeds), the per-configuration table (mean and sd over seeds), the findings
   graded against the noise (slimtune/grading.py: beyond 2 sd of a difference of means), seed
   004's claims with the grades that answer them, and the presets chosen by rules on the same
   numbers. Each goes between its <!-- name --> markers in docs/study.md; the presets'
   files (configs/presets/*.yaml) are rewritten from configs/quickstart.yaml with their header.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimtune.grading import grade, group_by_config, threshold  # noqa: E402
from slimtune.sweep import load_sweep, pareto, plot_fronts, result_row, run_name, sweep_runs  # noqa: E402

GEN = ("list_share", "loop_share", "mean_tokens", "distinct_2", "ended_share", "hit_limit_share")
METRICS = ["eval_loss", "eval_kl", "general_kl"] + [f"tuned_{k}" for k in GEN] + [
    "trainable", "adapter_mb", "s_per_step", "train_s", "steps"]
LABEL = {"eval_loss": "held-out loss", "eval_kl": "KL held-out", "general_kl": "KL general",
         "tuned_list_share": "lists", "tuned_loop_share": "loops", "tuned_mean_tokens": "mean tokens",
         "tuned_distinct_2": "distinct-2", "tuned_ended_share": "ended", "tuned_hit_limit_share": "hit limit"}
PCT = {"tuned_list_share", "tuned_loop_share", "tuned_ended_share", "tuned_hit_limit_share"}


# ------------------------------------------------------------------ runs -> committed records
def record_of(folder: Path, combo: dict) -> dict:
    """What the page needs of one run folder, small enough to commit."""
    s = json.loads((folder / "summary.json").read_text())
    rec = {"run": folder.name, "overrides": combo, "row": result_row(folder, folder.name, combo),
           "stopped": s.get("stopped"), "precision": (s.get("final_eval") or {}).get("mixed_precision")}
    ev = folder / "eval.json"
    done = ev if ev.exists() else folder / "summary.json"  # the run's wall-clock span: config.yaml is its first file
    rec["started"], rec["finished"] = (folder / "config.yaml").stat().st_mtime, done.stat().st_mtime
    if ev.exists():
        g = json.loads(ev.read_text())["generation"]
        rec["generation"] = {side: {k: g[side].get(k) for k in GEN} for side in ("base", "tuned")}
        rec["n_prompts"] = g.get("n_prompts")
    lc = folder / "layer_choice.json"
    if lc.exists():
        rec["layer_choice"] = json.loads(lc.read_text())
    return rec


def collect(runs: Path | None, sweep: Path, store: Path) -> tuple[list[dict], dict]:
    """Refresh store/ from the run folders (when given), then read every committed record of the
    sweep's runs: (rows, run name -> overrides)."""
    _, grid, _ = load_sweep(sweep)
    combos = {run_name(c): c for c in sweep_runs(grid)[0]}
    store.mkdir(parents=True, exist_ok=True)
    if runs and runs.exists():
        for name, combo in combos.items():
            if (runs / name / "summary.json").exists():
                rec = record_of(runs / name, combo)
                (store / f"{name}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
    rows = []
    for name, combo in combos.items():
        f = store / f"{name}.json"
        if not f.exists():
            continue
        rec = json.loads(f.read_text())
        row = dict(rec["row"], run=name, same_heldout="data.train" not in combo)
        for side, metrics in (rec.get("generation") or {}).items():
            row.update({f"{side}_{k}": v for k, v in metrics.items()})
        if rec.get("layer_choice"):
            row["layers"] = rec["layer_choice"].get("chosen")
        row.update(stopped=rec.get("stopped"), started=rec.get("started"), finished=rec.get("finished"))
        rows.append(row)
    return rows, combos


# ------------------------------------------------------------------ the claims and their grades
# (finding, group a, claim, group b, metric): "a <claim> b" on metric, claim <, > or = (no difference)
CHECKS = [
    ("data", "train-chitchat-600", "<", "base", "tuned_mean_tokens"),
    ("data", "train-chitchat-600", "<", "base", "tuned_list_share"),
    ("data", "train-chitchat-600", ">", "base", "general_kl"),
    ("kl", "kl_lambda-0.1", "<", "base", "general_kl"),
    ("kl", "kl_lambda-0.1", "=", "base", "eval_loss"),
    ("kl", "kl_lambda-0.5", "<", "base", "general_kl"),
    ("kl", "kl_lambda-0.5", ">", "base", "eval_loss"),
    ("kl", "kl_lambda-0.5", "<", "lr-0.0003", "eval_loss"),
    ("kl", "kl_lambda-0.5", "<", "lr-0.0003", "general_kl"),
    ("lr", "lr-0.003", "<", "base", "eval_loss"),
    ("lr", "lr-0.003", ">", "base", "general_kl"),
    ("lr", "lr-0.0003", ">", "base", "eval_loss"),
    ("rank", "r-2", "=", "base", "eval_loss"),
    ("rank", "r-2", "=", "base", "general_kl"),
    ("rank", "r-8", "=", "base", "eval_loss"),
    ("rank", "r-32", "=", "base", "eval_loss"),
    ("places", "layers-auto-10", "<", "layers-10-19", "eval_loss"),
    ("places", "layers-auto-10", ">", "layers-10-19", "general_kl"),
    ("places", "layers-auto-10", ">", "base", "eval_loss"),
    ("places", "targets-attn", ">", "base", "eval_loss"),
    ("places", "targets-attn", "<", "base", "general_kl"),
    ("places", "targets-o_proj", ">", "base", "eval_loss"),
    ("places", "targets-o_proj", "<", "base", "general_kl"),
    ("places", "layers-10-19", "<", "base", "general_kl"),
    ("places", "r-2", "<", "targets-o_proj", "eval_loss"),
    ("optimizer", "optimizer-adafactor", "<", "base", "eval_loss"),
    ("optimizer", "optimizer-adafactor", "<", "base", "general_kl"),
    ("optimizer", "optimizer-lion", ">", "base", "general_kl"),
    ("optimizer", "optimizer-schedulefree", ">", "base", "general_kl"),
    ("optimizer", "optimizer-lion", "=", "base", "eval_loss"),
    ("optimizer", "optimizer-schedulefree", "=", "base", "eval_loss"),
    ("optimizer", "optimizer-schedulefree", "<", "base", "tuned_mean_tokens"),
    ("optimizer", "optimizer-schedulefree", ">", "optimizer-lion", "general_kl"),
    ("optimizer", "optimizer-adafactor_lr-0.003", "<", "lr-0.003", "eval_loss"),   # each at its better lr
    ("optimizer", "optimizer-adafactor_lr-0.003", "<", "lr-0.003", "general_kl"),
    ("steps", "max_steps-20", ">", "base", "eval_loss"),
    ("steps", "max_steps-80", "=", "base", "eval_loss"),
    ("steps", "max_steps-80", ">", "base", "general_kl"),
    ("steps", "max_steps-80", "<", "base", "tuned_loop_share"),
    ("steps", "max_steps-80_every-10_early_stop_patience-2", "<", "max_steps-80", "general_kl"),
    ("steps", "max_steps-80_every-10_early_stop_patience-2", "=", "max_steps-80", "eval_loss"),
]
FINDINGS = {
    "data": "The data decides the behaviour: chat data makes short, list-free answers",
    "kl": "The KL anchor keeps the model close to the base for less loss than a lower learning rate",
    "lr": "The learning rate: 3e-3 against the quickstart's 1e-3 learns more and drifts more; 3e-4 learns less",
    "rank": "Rank hardly matters in 40 steps",
    "places": "Fewer places to adapt: less drift, more loss; measured layer choice against a fixed band",
    "optimizer": "Optimizers: at AdamW's learning rate, and Adafactor against AdamW each at 3e-3 (see the grid below)",
    "steps": "Past ~1 epoch more steps add drift, and early stopping is the remedy",
}


def fmt(metric: str, v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    if metric in PCT:
        return f"{v * 100:+.1f} pts" if signed else f"{v:.0%}"
    if metric == "tuned_mean_tokens":
        return f"{v:+.1f}" if signed else f"{v:.1f}"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def graded(groups, noise) -> list[dict]:
    out = []
    for finding, a, claim, b, metric in CHECKS:
        if a not in groups or b not in groups or noise.get(metric) is None:
            out.append({"finding": finding, "a": a, "claim": claim, "b": b, "metric": metric, "grade": "not run"})
            continue
        g, diff, bar = grade(groups[a], groups[b], metric, claim, noise[metric])
        out.append({"finding": finding, "a": a, "claim": claim, "b": b, "metric": metric, "grade": g,
                    "mean_a": groups[a].mean(metric), "mean_b": groups[b].mean(metric), "n_a": groups[a].n,
                    "n_b": groups[b].n, "diff": diff, "bar": bar})
    return out


WORD = {"<": "lower than", ">": "higher than", "=": "no different from"}


def findings_md(checks: list[dict]) -> str:
    lines = []
    for i, (key, title) in enumerate(FINDINGS.items(), 1):
        mine = [c for c in checks if c["finding"] == key]
        tally = {g: sum(c["grade"] == g for c in mine) for g in ("holds", "within noise", "contradicted", "not run")}
        lines += [f"**{i}. {title}** ({', '.join(f'{v} {k}' for k, v in tally.items() if v)})", "",
                  "| claim | a (seeds) | b (seeds) | a - b | 2-sd bar | grade |", "|---|---|---|---|---|---|"]
        for c in mine:
            m = c["metric"]
            if c["grade"] == "not run":
                lines.append(f"| {c['a']} {WORD[c['claim']]} {c['b']} on {LABEL.get(m, m)} | - | - | - | - | not run |")
                continue
            lines.append(f"| {c['a']} {WORD[c['claim']]} {c['b']} on {LABEL.get(m, m)} "
                         f"| {fmt(m, c['mean_a'])} ({c['n_a']}) | {fmt(m, c['mean_b'])} ({c['n_b']}) "
                         f"| {fmt(m, c['diff'], True)} | {fmt(m, c['bar'], True).lstrip('+')} | **{c['grade']}** |")
        lines.append("")
    return "\n".join(lines).rstrip()


# seed 004's claims -> the checks that answer them, each (a, claim, b, metric) with whether its
# holding supports the seed's claim (True) or speaks against it (False)
SEED = [
    ("Multi-turn concise format is king (loss 1.25 vs 6.07 for Alpaca)",
     [(("train-chitchat-600", "<", "base", "tuned_mean_tokens"), True),
      (("train-chitchat-600", "<", "base", "tuned_list_share"), True)],
     "Loss across data sets is not comparable (each has its own held-out set), so the loss claim cannot be tested; "
     "what the data does to answers is graded instead"),
    ("Dataset quality beats hyperparameters 5x",
     [(("train-chitchat-600", "<", "base", "tuned_mean_tokens"), True), (("r-2", "=", "base", "eval_loss"), True),
      (("r-32", "=", "base", "eval_loss"), True)],
     "A ratio of losses across data sets is not a measure; graded: the data moves answers, rank does not move loss"),
    ("Adafactor beats AdamW on loss and memory; Lion drifts most",
     [(("optimizer-adafactor", "<", "base", "eval_loss"), True),
      (("optimizer-adafactor_lr-0.003", "<", "lr-0.003", "eval_loss"), True),
      (("optimizer-adafactor", "<", "base", "general_kl"), True), (("optimizer-lion", ">", "base", "general_kl"), True),
      (("optimizer-schedulefree", ">", "optimizer-lion", "general_kl"), False)],
     "The seed's own numbers disagree with its claim (Adafactor 1.267 against AdamW 1.252: AdamW lower). Memory: "
     "AdamW's two moments for 4.9M trainable parameters are 37 MiB of a ~4 GiB peak (activations), so the optimizer "
     "is not where memory goes at this size. Schedule-free drifting more than AdamW speaks against Lion drifting most"),
    ("Rank 8 is the sweet spot, diminishing returns beyond",
     [(("r-2", "=", "base", "eval_loss"), False), (("r-8", "=", "base", "eval_loss"), False),
      (("r-32", "=", "base", "eval_loss"), False)],
     "A sweet spot needs rank to matter; a tie from r2 to r32 means the cheapest rank wins"),
    ("Hub-targeted LoRA (few layers, o_proj) is 3.5x more parameter-efficient and more surgical",
     [(("targets-o_proj", "<", "base", "general_kl"), True), (("layers-10-19", "<", "base", "general_kl"), True),
      (("r-2", "<", "targets-o_proj", "eval_loss"), False), (("layers-auto-10", "<", "layers-10-19", "eval_loss"), True)],
     "The seed's hub layers come from its own atlas of LFM2; here `auto:10` (largest adapter gradient norms) "
     "stands in for measured layers, and rank 2 on every layer is the same-size alternative"),
    ("Hub structure preserved across all experiments", [],
     "Not tested: it needs the seed's atlas of LFM2's internal hubs; slimtune measures drift as KL to the base"),
]


def verdict(graded_: list[tuple[dict, bool]]) -> str:
    """The seed's claim on this model, from its checks: contradicted when a check against it holds
    (or one for it is contradicted), holds when every check for it holds, else partly / within noise."""
    if not graded_:
        return "not tested"
    against = any((g["grade"] == "holds") != sup and g["grade"] != "within noise" for g, sup in graded_)
    if against:
        return "contradicted here"
    held = [g["grade"] == "holds" for g, sup in graded_ if sup]
    return "holds here" if held and all(held) else ("partly (the rest within noise)" if any(held) else "within noise")


def seed_md(checks: list[dict]) -> str:
    by = {(c["a"], c["claim"], c["b"], c["metric"]): c for c in checks}
    lines = ["| # | seed 004 says | on this model | the comparisons that answer it (for / against the seed's claim) | note |",
             "|---|---|---|---|---|"]
    for i, (says, keys, note) in enumerate(SEED, 1):
        parts = []
        for k, sup in keys:
            c = by[k]
            parts.append(f"{'for' if sup else 'against'}: {c['a']} {WORD[c['claim']]} {c['b']} on "
                         f"{LABEL.get(c['metric'], c['metric'])} **{c['grade']}**"
                         + (f" ({fmt(c['metric'], c['diff'], True)})" if "diff" in c else ""))
        lines.append(f"| {i} | {says} | **{verdict([(by[k], sup) for k, sup in keys])}** | {'; '.join(parts) or '-'} | {note} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ tables
def noise_md(base) -> str:
    lines = [f"The base configuration (the quickstart) with {base.n} seeds ({', '.join(base.runs)}):", "",
             "| metric | mean | sd | min | max | 2-sd bar, 1 run vs 1 run | 2-sd bar, 3 seeds vs 5 |",
             "|---|---|---|---|---|---|---|"]
    for m in METRICS[:3 + len(GEN)]:
        v = base.values.get(m)
        if not v or base.sd(m) is None:
            continue
        sd = base.sd(m)
        lines.append(f"| {LABEL.get(m, m)} | {fmt(m, base.mean(m))} | {fmt(m, sd)} | {fmt(m, min(v))} | {fmt(m, max(v))} "
                     f"| {fmt(m, threshold(sd, 1, 1))} | {fmt(m, threshold(sd, 3, 5))} |")
    return "\n".join(lines)


def groups_md(groups) -> str:
    head = ("| configuration | seeds | held-out loss | KL held-out | KL general | lists | loops | mean tokens "
            "| trainable | adapter MB | s/step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ms(g, m):
        mean, sd = g.mean(m), g.sd(m)
        if mean is None:
            return "-"
        return fmt(m, mean) + ("" if sd is None else f" ± {fmt(m, sd)}")

    order = sorted(groups.values(), key=lambda g: ("data.train" in g.overrides, g.mean("eval_loss") or 9))
    for g in order:
        loss = ms(g, "eval_loss") + (" (other data)" if "data.train" in g.overrides else "")
        lines.append(f"| {g.name} | {g.n} | {loss} | {ms(g, 'eval_kl')} | {ms(g, 'general_kl')} "
                     f"| {ms(g, 'tuned_list_share')} | {ms(g, 'tuned_loop_share')} | {ms(g, 'tuned_mean_tokens')} "
                     f"| {int(g.mean('trainable')):,} | {g.mean('adapter_mb'):.2f} | {g.mean('s_per_step'):.2f} |")
    return "\n".join(lines)


def lr_grid_md(groups, noise) -> str:
    """Each optimizer at 1e-3 and at one other learning rate: its better one, graded."""
    pairs = [("adamw", "base", "lr-0.003"), ("adafactor", "optimizer-adafactor", "optimizer-adafactor_lr-0.003"),
             ("lion", "optimizer-lion", "optimizer-lion_lr-0.0003"),
             ("schedulefree", "optimizer-schedulefree", "optimizer-schedulefree_lr-0.003")]
    lines = ["| optimizer | lr 1e-3 (seeds) | other lr (seeds) | other - 1e-3 | 2-sd bar | its better lr |",
             "|---|---|---|---|---|---|"]
    best = {}
    for opt, at1, other in pairs:
        if at1 not in groups or other not in groups:
            continue
        a, b = groups[other], groups[at1]
        g, diff, bar = grade(a, b, "eval_loss", "<", noise["eval_loss"])
        lr = other.split("lr-")[-1]
        best[opt] = other if g == "holds" else at1
        verdict = f"{lr} (beyond the noise)" if g == "holds" else (
            "1e-3 (beyond the noise)" if g == "contradicted" else "1e-3 (a tie: the default kept)")
        lines.append(f"| {opt} | {b.mean('eval_loss'):.4f} ({b.n}) | {lr}: {a.mean('eval_loss'):.4f} ({a.n}) "
                     f"| {diff:+.4f} | {bar:.4f} | {verdict} |")
    if "adamw" in best:
        ref = groups[best["adamw"]]
        lines += ["", f"Each optimizer at its better rate against AdamW at its better rate ({ref.name}, {ref.n} seed(s)):",
                  "", "| optimizer at its rate | seeds | held-out loss, a - AdamW | 2-sd bar | grade | KL general, a - AdamW "
                  "| 2-sd bar | grade |", "|---|---|---|---|---|---|---|---|"]
        for opt, name in best.items():
            if opt == "adamw":
                continue
            g = groups[name]
            gl, dl, bl = grade(g, ref, "eval_loss", "=", noise["eval_loss"])
            gk, dk, bk = grade(g, ref, "general_kl", "=", noise["general_kl"])
            word = lambda x, d: "no different" if x == "holds" else ("lower" if d < 0 else "higher")  # noqa: E731
            lines.append(f"| {name} | {g.n} | {dl:+.4f} | {bl:.4f} | {word(gl, dl)} | {dk:+.4f} | {bk:.4f} | {word(gk, dk)} |")
    return "\n".join(lines)


def layers_md(store: Path, combos: dict) -> str:
    """The layers each auto:K run chose, and the layers every seed chose."""
    chosen = {}
    for name, combo in combos.items():
        f = store / f"{name}.json"
        if f.exists() and str(combo.get("method.layers", "")).startswith("auto:"):
            lc = json.loads(f.read_text()).get("layer_choice") or {}
            if lc.get("chosen"):
                top = sorted(lc["scores"].items(), key=lambda kv: -kv[1])[:3]
                chosen[name] = lc["chosen"]
                chosen[name + "_top"] = ", ".join(f"{k} ({v:.3g})" for k, v in top)
    runs = [k for k in chosen if not k.endswith("_top")]
    if not runs:
        return "(no auto:K run yet)"
    lines = [f"- {k} chose layers {chosen[k]}; the largest adapter gradient-norm scores: {chosen[k + '_top']}"
             for k in runs]
    common = set.intersection(*(set(chosen[k]) for k in runs))
    lines.append(f"- chosen by every seed: {sorted(common)} ({len(common)} of {len(chosen[runs[0]])}); scores of "
                 "every layer are in docs/study/runs/<run>.json")
    return "\n".join(lines)


# ------------------------------------------------------------------ presets
PRESET_FILES = ("best_quality", "best_efficiency", "most_surgical")


def choose_presets(groups, noise) -> dict[str, dict]:
    base = groups["base"]
    same = [g for g in groups.values() if "data.train" not in g.overrides and g.mean("eval_loss") is not None
            and "eval.every" not in g.overrides]
    out = {}
    # best quality: the lowest mean held-out loss; beyond the noise against the quickstart, or a tie
    q = min(same, key=lambda g: g.mean("eval_loss"))
    g, diff, bar = grade(q, base, "eval_loss", "<", noise["eval_loss"])
    out["best_quality"] = {"group": q, "why": (
        f"the lowest mean held-out loss of the study, {diff:+.4f} against the quickstart ({q.n} vs {base.n} seeds; "
        f"2-sd bar {bar:.4f}): " + ("beyond the noise" if g == "holds" else
                                    "**a tie** within the noise; tie-break: the lower mean"))}
    # best efficiency: the fewest trainable parameters whose loss is not worse beyond the noise
    ok = [x for x in same if grade(x, base, "eval_loss", ">", noise["eval_loss"])[0] != "holds"]
    e = min(ok, key=lambda x: (x.mean("trainable"), x.mean("eval_loss")))
    ge, de, be = grade(e, base, "eval_loss", "=", noise["eval_loss"])
    out["best_efficiency"] = {"group": e, "why": (
        f"the fewest trainable parameters ({int(e.mean('trainable')):,} vs {int(base.mean('trainable')):,}) of the "
        f"runs whose held-out loss is not worse than the quickstart's beyond the noise ({de:+.4f}, bar {be:.4f})")}
    # most surgical: the least drift (general KL) among runs keeping >= 75% of the quickstart's loss drop
    start = base.mean("eval_loss_before")  # the base model's loss: every run starts from it
    floor = start - 0.75 * (start - base.mean("eval_loss"))
    keep = [x for x in same if x.mean("eval_loss") <= floor]
    s = min(keep, key=lambda x: x.mean("general_kl"))
    gs, ds, bs = grade(s, base, "general_kl", "<", noise["general_kl"])
    rest = sorted(keep, key=lambda x: x.mean("general_kl"))
    runner = rest[1] if len(rest) > 1 else None
    tie = ""
    if runner is not None:
        gr, dr, br = grade(s, runner, "general_kl", "<", noise["general_kl"])
        tie = (f"; against the next ({runner.name}, {runner.mean('general_kl'):.4f}): "
               + ("beyond the noise" if gr == "holds" else f"**a tie** ({dr:+.4f}, bar {br:.4f}); tie-break: the lower mean"))
    out["most_surgical"] = {"group": s, "why": (
        f"the least drift on the general prompts (KL {s.mean('general_kl'):.4f}, {ds:+.4f} against the quickstart, "
        f"{gs}) among the runs that keep >= 75% of the quickstart's held-out loss drop (loss <= {floor:.4f}){tie}")}
    return out


def preset_yaml(name: str, choice: dict, base) -> str:
    """configs/quickstart.yaml with the chosen overrides and a header that says what it reached."""
    g = choice["group"]
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n"
    overrides = dict(g.overrides, **{"train.output_dir": f"runs/{name}"})
    if overrides.get("loss.kl_lambda") or overrides.get("train.max_steps", 40) > 40:
        overrides.setdefault("train.max_minutes", 12)
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        value = json.dumps(value) if isinstance(value, (list, str)) and not re.fullmatch(r"[\w./:-]+", str(value)) else value
        pat = re.compile(rf"(^{section}:\n(?:  .*\n)*?)  {field}: [^\n#]*?( *#[^\n]*)?\n", re.M)
        if pat.search(body):
            body = pat.sub(lambda m: f"{m.group(1)}  {field}: {value}\n", body, count=1)
        else:
            body = re.sub(rf"^{section}:\n", f"{section}:\n  {field}: {value}\n", body, count=1, flags=re.M)
    m = lambda k: g.mean(k)  # noqa: E731
    head = [f"# {name.replace('_', ' ').capitalize()} (docs/study.md, computed by scripts/study_report.py):",
            f"# the quickstart with {', '.join(f'{k}={v}' for k, v in g.overrides.items()) or 'no change'} "
            f"(run {g.name}, {g.n} seed{'s' * (g.n > 1)}).",
            f"# Chosen as {choice['why']}."[:2000],
            f"# Reached on SmolLM2-135M-Instruct (mean of {g.n} seed{'s' * (g.n > 1)}): held-out loss "
            f"{m('eval_loss_before'):.4f} -> {m('eval_loss'):.4f} (quickstart: {base.mean('eval_loss'):.4f}),",
            f"# KL to base {m('eval_kl'):.4f} held-out / {m('general_kl'):.4f} general prompts; "
            f"{int(m('trainable')):,} trainable parameters, {m('adapter_mb'):.1f} MB adapter.",
            f"#   slimtune train configs/presets/{name}.yaml"]
    wrapped = []
    for line in head:
        while len(line) > 110:
            cut = line.rfind(" ", 0, 108)
            wrapped.append(line[:cut])
            line = "# " + line[cut + 1:]
        wrapped.append(line)
    return "\n".join(wrapped) + "\n" + body


def presets_md(presets) -> str:
    lines = ["| preset | changes | seeds | held-out loss | KL held-out / general | trainable | why |",
             "|---|---|---|---|---|---|---|"]
    for name, c in presets.items():
        g = c["group"]
        lines.append(f"| `configs/presets/{name}.yaml` | {', '.join(f'`{k}: {v}`' for k, v in g.overrides.items())} "
                     f"| {g.n} | {g.mean('eval_loss'):.4f} | {g.mean('eval_kl'):.4f} / {g.mean('general_kl'):.4f} "
                     f"| {int(g.mean('trainable')):,} | {c['why']} |")
    return "\n".join(lines)


def machine() -> dict:
    """Where the report was made (the runs record their own settings, not the CPU)."""
    import platform

    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    return {"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


# ------------------------------------------------------------------ page
def put(doc: str, marker: str, text: str) -> str:
    a, b = doc.find(f"<!-- {marker} -->"), doc.find(f"<!-- /{marker} -->")
    if a < 0 or b < a:
        raise SystemExit(f"docs/study.md has no <!-- {marker} --> ... <!-- /{marker} --> markers")
    return doc[:a] + f"<!-- {marker} -->\n" + text + "\n" + doc[b:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "study"), help="run folders (skipped when absent)")
    ap.add_argument("--sweep", default=str(ROOT / "configs" / "sweeps" / "study.yaml"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "study"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "study.md"))
    ap.add_argument("--no-presets", action="store_true", help="leave configs/presets/ as they are")
    args = ap.parse_args()
    out = Path(args.out)
    rows, combos = collect(Path(args.runs), Path(args.sweep), out / "runs")
    if not rows:
        sys.exit(f"no finished run in {args.runs} or {out / 'runs'}: run `slimtune sweep {args.sweep}` first")
    groups = group_by_config(rows, combos, METRICS + ["eval_loss_before"])
    base = groups["base"]
    noise = {m: base.sd(m) for m in METRICS}
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    checks = graded(groups, noise)
    lr_text = lr_grid_md(groups, noise)
    presets = choose_presets(groups, noise)
    wall = sum(r["train_s"] for r in rows)
    spans = [(r["started"], r["finished"]) for r in rows if r.get("started")]
    elapsed = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else None
    busy = sum(b - a for a, b in spans)
    meta = machine()
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "noise_sd": noise, "checks": checks, "runs": rows, "train_s_total": wall,
         "groups": {k: {"runs": g.runs, "mean": {m: g.mean(m) for m in METRICS}, "sd": {m: g.sd(m) for m in METRICS}}
                    for k, g in groups.items()}}, indent=1, default=str) + "\n")
    comparable = [r for r in rows if r["same_heldout"]]
    for r in rows:
        r["pareto"] = "+".join(k for k, names in {"kl": pareto(comparable, "general_kl"),
                                                   "params": pareto(comparable, "trainable")}.items() if r["run"] in names)
    plot_fronts(comparable, out / "results.png",
                (("general_kl", "KL(base || tuned) on the general prompts", "quality vs drift from the base"),
                 ("trainable", "trainable parameters", "quality vs trainable parameters")),
                ylabel="held-out loss (instructions split)")
    doc = Path(args.doc)
    d = doc.read_text()
    d = put(d, "noise", noise_md(base))
    d = put(d, "table", groups_md(groups))
    stopped = [f"- {r['run']} stopped at step {r['steps']}: {r['stopped']}; the weights it kept (and was "
               "evaluated with) are its last step's, not its best evaluation's" for r in rows
               if r.get("stopped") and r["stopped"] != "completed"]
    d = put(d, "findings", findings_md(checks) + ("\n\nRuns that stopped before their last step:\n\n"
                                                  + "\n".join(stopped) if stopped else ""))
    d = put(d, "lrgrid", lr_text)
    d = put(d, "seed", seed_md(checks))
    d = put(d, "layers", layers_md(out / "runs", combos))
    d = put(d, "presets", presets_md(presets))
    d = put(d, "runs", f"{len(rows)} runs took {elapsed / 60:.0f} minutes from the first run's start to the last "
                       f"one's evaluation ({busy / 60:.0f} minutes of runs, two at a time; {wall / 60:.0f} minutes of "
                       "it training, the rest evaluation and loading)" if elapsed else f"{len(rows)} runs")
    doc.write_text(d)
    readme = ROOT / "README.md"
    tally = {g: sum(c["grade"] == g for c in checks) for g in ("holds", "within noise", "contradicted", "not run")}
    short = "\n".join(f"| `configs/presets/{name}.yaml` | {', '.join(f'`{k}: {v}`' for k, v in c['group'].overrides.items())} "
                      f"| {c['group'].mean('eval_loss_before'):.4f} -> {c['group'].mean('eval_loss'):.4f} "
                      f"| {c['group'].mean('general_kl'):.4f} | {int(c['group'].mean('trainable')):,} |"
                      for name, c in presets.items())
    readme.write_text(put(readme.read_text(), "presets", (
        "| preset | change from the quickstart | held-out loss | KL to base (general prompts) | trainable |\n"
        "|---|---|---|---|---|\n" + short + f"\n\nQuickstart (mean of {base.n} seeds): held-out loss "
        f"{base.mean('eval_loss'):.4f} ± {base.sd('eval_loss'):.4f}, KL {base.mean('general_kl'):.4f} ± "
        f"{base.sd('general_kl'):.4f}. Of the study's {len(checks)} graded claims, {tally['holds']} hold, "
        f"{tally['within noise']} are within the noise, {tally['contradicted']} contradicted "
        "([docs/study.md](docs/study.md) has each, with its runs).")))
    if not args.no_presets:
        for name, choice in presets.items():
            (ROOT / "configs" / "presets" / f"{name}.yaml").write_text(preset_yaml(name, choice, base))
    print(f"{len(rows)} runs in {len(groups)} configurations; checks: {tally}; page {doc}, results in {out}")


if __name__ == "__main__":
    main()
