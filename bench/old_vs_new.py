"""The same CLI job on two checkouts of slimtune, interleaved (old, new, new, old, ...), each run
in a fresh process with fp32 weights and no autocast: did a refactor change speed or numbers?

    python bench/old_vs_new.py --old /path/to/old/checkout --job sft --steps 12 --rounds 2
    python bench/old_vs_new.py --old /path/to/old/checkout --job dpo --steps 5 --rounds 2

sft is configs/quickstart.yaml, dpo configs/dpo.yaml (each checkout's own file). Reported per run:
trained tokens/s of the training steps, s/step, and the held-out loss after. Writes
bench/results/NAME.json; run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from precision import cpu, versions  # noqa: E402

CONFIGS = {"sft": "configs/quickstart.yaml", "dpo": "configs/dpo.yaml"}


def run(tree: Path, job: str, steps: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, "-m", "slimtune.cli", "train", str(tree / CONFIGS[job]), f"train.max_steps={steps}",
           "train.mixed_precision=no", f"train.output_dir={out}", "train.max_minutes=60", "train.progress=false",
           "train.save_every=0"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tree)
    s = json.loads((out / "summary.json").read_text())
    t = s["time"]
    return {"tokens_per_s": t["trained_tokens_per_s"], "s_per_step": t["train_s"] / max(s["steps"], 1),
            "eval_loss": s["after"]["eval_loss"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path)
    ap.add_argument("--new", default=ROOT, type=Path)
    ap.add_argument("--job", choices=sorted(CONFIGS), default="sft")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                tree = a.old if which == "old" else a.new
                rows.append({"tree": which, **run(tree.resolve(), a.job, a.steps, Path(tmp) / f"{which}-{r}")})
                print(rows[-1], flush=True)
    med = {w: {k: statistics.median(x[k] for x in rows if x["tree"] == w) for k in ("tokens_per_s", "s_per_step",
                                                                                 "eval_loss")}
           for w in ("old", "new")}
    commits = {w: subprocess.run(["git", "-C", str(t), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() for w, t in (("old", a.old), ("new", a.new))}
    res = {"job": a.job, "steps": a.steps, "cpu": cpu(), "versions": versions(), "commits": commits,
           "load_before": os.getloadavg()[0], "runs": rows, "median": med,
           "speed_new_over_old": med["new"]["tokens_per_s"] / med["old"]["tokens_per_s"]}
    (ROOT / "bench/results").mkdir(exist_ok=True)
    (ROOT / f"bench/results/{a.name or 'old_vs_new_' + a.job}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("commits", "median", "speed_new_over_old")}, indent=2))


if __name__ == "__main__":
    main()
