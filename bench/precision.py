"""train.mixed_precision on this CPU: the quickstart's first N steps in float32 and in bf16 autocast,
interleaved (fp32, bf16, bf16, fp32, ... per round), each in a fresh process; trained tokens/s of
the training steps (loading and evaluations excluded) and the held-out loss after.

    python bench/precision.py --steps 12 --rounds 1 --name precision

Prints the CPU (model name, AVX512-BF16 / AMX flags) and the library versions beside the table, and
writes bench/results/NAME.json. Run on a quiet machine: nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402


def cpu() -> dict:
    """The CPU and whether it computes bf16 natively (from common.machine)."""
    m = common.machine()
    return {"model": m.get("cpu"), "avx512_bf16": "avx512_bf16" in m.get("flags", ()),
            "amx_bf16": "amx_bf16" in m.get("flags", ())}


def versions() -> dict:
    m = common.machine()
    return {k: m[k] for k in ("python", "torch", "transformers", "peft")}


def run(mode: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "slimtune.cli", "train", str(ROOT / "configs/quickstart.yaml"),
           f"train.max_steps={steps}", f"train.mixed_precision={mode}", f"train.output_dir={out}",
           "train.max_minutes=60", "train.progress=false", "train.save_every=0"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text())
    return {"mode": mode, "tokens_per_s": s["time"]["trained_tokens_per_s"],
            "eval_loss": s["after"]["eval_loss"], "train_s": s["time"]["train_s"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--name", default="precision")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for mode in (("no", "bf16") if r % 2 == 0 else ("bf16", "no")):
                rows.append(run(mode, a.steps, Path(tmp) / f"{mode}-{r}"))
                print(rows[-1], flush=True)
    med = {m: {k: statistics.median(x[k] for x in rows if x["mode"] == m) for k in ("tokens_per_s", "eval_loss")}
           for m in ("no", "bf16")}
    res = {"cpu": cpu(), "versions": versions(), "steps": a.steps, "runs": rows, "median": med,
           "speedup": med["bf16"]["tokens_per_s"] / med["no"]["tokens_per_s"],
           "eval_loss_rel_diff": med["bf16"]["eval_loss"] / med["no"]["eval_loss"] - 1}
    (ROOT / "bench/results").mkdir(exist_ok=True)
    (ROOT / f"bench/results/{a.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("cpu", "median", "speedup", "eval_loss_rel_diff")}, indent=2))


if __name__ == "__main__":
    main()
