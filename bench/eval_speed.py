"""Generation for `slimtune eval`: one prompt at a time with the adapter unmerged (before issue 16)
against generate_many (batched, merged, finished rows dropped), interleaved in one process.

    python bench/eval_speed.py runs/quickstart --prompts 24 --rounds 1

Per round and side (tuned, base): the old path, then the new one, on the same prompts; prints
seconds, generated tokens/s and whether every greedy answer is identical. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--out", default="bench/results/eval_speed.json")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--sides", default="tuned,base")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from slimtune.evaluate.base_vs_tuned import BaseVsTuned
    from slimtune.generate import generate_many, merged, settings_from
    from slimtune.data.prompts import load_prompts
    from slimtune.generate import generate

    t0 = time.perf_counter()
    pair = BaseVsTuned(args.run)
    load_s = time.perf_counter() - t0
    cfg = pair.cfg
    chats = load_prompts("builtin:eval_prompts", args.prompts, cfg.data.system_prompt)
    n_new = args.max_new_tokens or cfg.eval.max_new_tokens
    s = settings_from(cfg.eval, max_new_tokens=n_new)
    bs = args.batch_size or cfg.eval.gen_batch_size
    rows = []
    for r in range(args.rounds):
        for side in args.sides.split(","):
            ctx = pair.base() if side == "base" else merged(pair.model)
            t = time.perf_counter()
            if side == "base":
                with pair.base() as m:
                    old = [generate(m, pair.tok, c, n_new) for c in chats]
            else:
                old = [generate(pair.model, pair.tok, c, n_new) for c in chats]
            old_s = time.perf_counter() - t
            t = time.perf_counter()
            with ctx as m:
                new = generate_many(m, pair.tok, chats, s, bs)
            new_s = time.perf_counter() - t
            same = [a["text"] == b["text"] for a, b in zip(old, new)]
            tokens = sum(a["n_tokens"] for a in old)
            row = {"round": r, "side": side, "prompts": len(chats), "max_new_tokens": n_new, "batch_size": bs,
                   "tokens": tokens, "old_s": round(old_s, 1), "new_s": round(new_s, 1),
                   "old_tok_s": round(tokens / old_s, 1), "new_tok_s": round(sum(a["n_tokens"] for a in new) / new_s, 1),
                   "speedup": round(old_s / new_s, 2), "identical": sum(same),
                   "differ_at": [i for i, ok in enumerate(same) if not ok]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": args.run, "load_s": round(load_s, 1), "threads": args.threads, "rows": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
