"""The same CLI job on two checkouts of slimtune, interleaved (old, new, new, old, ...), each run
in a fresh process with fp32 weights and no autocast: did a refactor change speed or numbers?

    python bench/old_vs_new.py --old /path/to/old/checkout --job sft --steps 12 --rounds 2
    python bench/old_vs_new.py --old /path/to/old/checkout --job dpo --steps 5 --rounds 2
    python bench/old_vs_new.py --old /path/to/old/checkout --job eval --run runs/quickstart --rounds 2

sft is configs/quickstart.yaml, dpo configs/dpo.yaml (each checkout's own file). Reported per run:
trained tokens/s of the training steps, s/step, and the held-out loss after. eval: `slimtune eval
RUN --no-cache` (base and tuned answered again, the run's own precision; --ifeval adds the 66
IFEval prompts): wall seconds, the answering seconds, and whether every answer equals the old
tree's. Writes bench/results/NAME.json; run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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


def run_eval(tree: Path, run_dir: Path, out: Path, ifeval: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, "-m", "slimtune.cli", "eval", str(run_dir), "--no-cache", "--out", str(out)]
    cmd += ["--ifeval"] if ifeval else []
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tree)
    wall = time.perf_counter() - t0
    res = json.loads(out.read_text())
    return {"wall_s": round(wall, 1), "answers_s": res["timing"]["answers_s"], "answers": res["timing"]["answers"],
            "samples": res["samples"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path)
    ap.add_argument("--new", default=ROOT, type=Path)
    ap.add_argument("--job", choices=sorted(CONFIGS) + ["eval"], default="sft")
    ap.add_argument("--run", type=Path, help="eval: the run folder both trees evaluate")
    ap.add_argument("--ifeval", action="store_true", help="eval: also the IFEval prompts")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                tree = a.old if which == "old" else a.new
                out = Path(tmp) / f"{which}-{r}"
                rows.append({"tree": which, **(run_eval(tree.resolve(), a.run.resolve(), out.with_suffix(".json"), a.ifeval)
                                               if a.job == "eval" else run(tree.resolve(), a.job, a.steps, out))})
                print({k: v for k, v in rows[-1].items() if k != "samples"}, flush=True)
    keys = ("wall_s", "answers_s") if a.job == "eval" else ("tokens_per_s", "s_per_step", "eval_loss")
    med = {w: {k: statistics.median(x[k] for x in rows if x["tree"] == w) for k in keys} for w in ("old", "new")}
    commits = {w: subprocess.run(["git", "-C", str(t), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() for w, t in (("old", a.old), ("new", a.new))}
    res = {"job": a.job, "steps": a.steps, "cpu": cpu(), "versions": versions(), "commits": commits,
           "load_before": os.getloadavg()[0], "runs": rows, "median": med}
    if a.job == "eval":
        first = next(x["samples"] for x in rows if x["tree"] == "old")
        res["speed_new_over_old"] = med["old"]["answers_s"] / med["new"]["answers_s"]
        res["same_answers"] = {x["tree"] + str(i): sum(p == q for p, q in zip(x["samples"], first))
                               for i, x in enumerate(rows)}
        res["n_samples"] = len(first)
        for x in rows:
            x.pop("samples")
    else:
        res["speed_new_over_old"] = med["new"]["tokens_per_s"] / med["old"]["tokens_per_s"]
    (ROOT / "bench/results").mkdir(exist_ok=True)
    (ROOT / f"bench/results/{a.name or 'old_vs_new_' + a.job}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("commits", "median", "speed_new_over_old", "same_answers") if k in res},
                     indent=2))


if __name__ == "__main__":
    main()
