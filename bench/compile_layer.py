"""torch.compile of the decoder layers, on and off, for the quickstart's SFT step (issue 27).

    PYTHONPATH=src python bench/compile_layer.py --steps 10 --rounds 2
    PYTHONPATH=src python bench/compile_layer.py --precision no      # fp32

Each run is `slimtune train configs/quickstart.yaml` for --steps steps in its own process; with
`compile`, every decoder layer of the PEFT model is `layer.compile(dynamic=True)`'d after setup
(transformers' layers, the LoRA layers inside them; one graph serves every layer since torch
inlines nn.Modules). Interleaved off / on / on / off. Reported: the first step's seconds (the
compile lands there), trained tokens/s over the steps after the first two, the training loss
of the last step, peak RSS. Writes bench/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(spec: dict) -> dict:
    import slimtune.train.loop as st
    from slimtune.config import load_config
    from slimtune.train.forward import decoder_of

    real = st.setup

    def setup(*a, **kw):
        s = real(*a, **kw)
        if spec["compile"]:
            for layer in decoder_of(s.model).layers:
                layer.compile(dynamic=True)
        return s

    st.setup = setup
    out = Path(spec["tmp"]) / "run"
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"),
                      [f"train.max_steps={spec['steps']}", f"train.output_dir={out}", "train.progress=false",
                       f"train.mixed_precision={spec['precision']}", "train.save_every=0", "eval.every=0",
                       "train.max_minutes=60"])
    st.train(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "lr" in r]
    first = rows[0]["elapsed_s"]
    steady = rows[2:] or rows
    t0 = rows[1]["elapsed_s"] if len(rows) > 2 else 0.0
    tokens = steady[-1]["tokens"] - (rows[1]["tokens"] if len(rows) > 2 else 0)
    return {"first_step_s": round(first, 2), "tokens_per_s": round(tokens / (steady[-1]["elapsed_s"] - t0), 1),
            "loss_last": rows[-1]["loss"], "peak_rss_mb": round(common.peak_rss_mb(), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", choices=["no", "bf16"], default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="compile_layer")
    args = ap.parse_args()
    script = Path(__file__).resolve()
    runs = []
    for r in range(args.rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            spec = {"compile": on, "steps": args.steps, "precision": args.precision, "tmp": tempfile.mkdtemp()}
            res = common.run_worker(script, spec, threads=args.threads)
            runs.append({"compile": on, "load": Path("/proc/loadavg").read_text().split()[0], **res})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    med = {on: {k: statistics.median(x[k] for x in runs if x["compile"] == on and k in x)
                for k in ("first_step_s", "tokens_per_s", "peak_rss_mb")} for on in (False, True)}
    rows = [[("on" if on else "off"), f"{m['first_step_s']:.1f}", f"{m['tokens_per_s']:.1f}", f"{m['peak_rss_mb']:,.0f}"]
            for on, m in med.items()]
    md = (f"# torch.compile of the decoder layers: quickstart SFT step ({args.precision}, {args.threads} threads)\n\n"
          f"`python bench/compile_layer.py --steps {args.steps} --rounds {args.rounds} --precision {args.precision}`; "
          f"medians of {args.rounds} runs each, interleaved.\n\n"
          + common.markdown_table(["compile", "first step s", "trained tok/s (steps 3+)", "peak RSS MiB"], rows)
          + f"\n\ncompiled / eager: **{med[True]['tokens_per_s'] / med[False]['tokens_per_s']:.2f}x** trained tokens/s\n")
    print(md)
    common.save_results(args.name, {"machine": common.machine(), "args": vars(args), "runs": runs, "medians": med}, md)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
