"""What each change to slimtune's decoding gave: the old path (before issue 27, kept in
tests/test_generate_same.py) against the current one with each change switched off in turn,
interleaved in one process on the same prompts, greedy; token ids compared with the old path's.

    PYTHONPATH=src python bench/generation_steps.py --batches 1,32 --rounds 2 --stop eos

Variants: old; new (everything); no_prealloc (DynamicCache grown by torch.cat); cut_each (cut a row
the step it ends); no_cast_once (under bf16 autocast, weights cast at every call); compiled
(the model under torch.compile(dynamic=True): its first run includes the compilation). --autocast bf16 runs every variant under bf16 autocast, as eval does on a CPU
with native bf16. Writes bench/results/generation_steps.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from generation import bench_prompts, cpu_info, loadavg, versions  # noqa: E402


@contextmanager
def patched(**values):
    import slimtune.generate as g

    saved = {k: getattr(g, k) for k in values}
    for k, v in values.items():
        setattr(g, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(g, k, v)


def variants():
    from transformers import DynamicCache

    from slimtune import generate as g
    from test_generate_same import old_decode

    def new(model, prompts, s, stops, pad):
        return g._decode(model, prompts, s, [0] * len(prompts), stops, pad)

    def old(model, prompts, s, stops, pad):
        return old_decode(model, prompts, s, [0] * len(prompts), stops, pad)

    def with_patch(**kw):
        def run(model, prompts, s, stops, pad):
            with patched(**kw):
                return new(model, prompts, s, stops, pad)
        return run

    compiled = {}

    def compiled_run(model, prompts, s, stops, pad):  # prefill and steps through torch.compile (inductor)
        net = compiled.setdefault(id(model), torch.compile(model, dynamic=True))
        return g._decode(net, prompts, s, [0] * len(prompts), stops, pad)

    return {"old": old, "new": new, "compiled": compiled_run,
            "no_prealloc": with_patch(_Cache=lambda capacity, prefix=None: DynamicCache()),
            "cut_each": with_patch(CUT_SHARE=10**9),
            "no_cast_once": with_patch(_cast_once=lambda net: nullcontext())}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stop", choices=["none", "eos"], default="eos")
    ap.add_argument("--variants", default="old,new,no_prealloc,cut_each")
    ap.add_argument("--autocast", default="no", choices=["no", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(HERE / "results" / "generation_steps.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from slimtune.generate import GenSettings, stop_ids
    from slimtune.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    stops = stop_ids(tok, model) if args.stop == "eos" else []
    s = GenSettings(max_new_tokens=args.new_tokens, autocast=args.autocast)
    runs = variants()
    names = args.variants.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    prompts_all = bench_prompts(tok, max(batches))
    rows = []
    for r in range(args.rounds):
        for B in batches:
            k = r % len(names)
            for v in names[k:] + names[:k]:
                amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast == "bf16" else nullcontext()
                t = time.perf_counter()
                with amp:
                    ids = runs[v](model, prompts_all[:B], s, stops, 2)
                sec = time.perf_counter() - t
                n = sum(map(len, ids))
                row = {"round": r, "batch": B, "variant": v, "tokens": n, "seconds": round(sec, 3),
                       "tok_s": round(n / sec, 1), "loadavg": loadavg(), "_ids": ids}
                rows.append(row)
                print(json.dumps({k: x for k, x in row.items() if k != "_ids"}), flush=True)
    summary = []
    for B in batches:
        old_ids = next((x["_ids"] for x in rows if x["batch"] == B and x["variant"] == "old"), None)
        for v in names:
            mine = [x for x in rows if x["batch"] == B and x["variant"] == v]
            summary.append({"batch": B, "variant": v, "tok_s": statistics.median(x["tok_s"] for x in mine),
                            "seconds": statistics.median(x["seconds"] for x in mine), "tokens": mine[0]["tokens"],
                            "loadavg": [x["loadavg"] for x in mine],
                            "same_ids_as_old": None if old_ids is None else all(x["_ids"] == old_ids for x in mine)})
            print(json.dumps(summary[-1]))
    for x in rows:
        del x["_ids"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/generation_steps.py " + " ".join(argv or sys.argv[1:]),
                               **cpu_info(), "versions": versions(), "settings": vars(args),
                               "summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
