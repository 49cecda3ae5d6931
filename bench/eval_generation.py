"""`slimtune eval`'s generation part before and after issue 27, interleaved in one process.

    PYTHONPATH=src python bench/eval_generation.py RUN --before REF [--rounds 2] [--threads 1]

The eval's own call (BaseVsTuned.answer_both: base rows and tuned rows in the same batches, no
answer cache, the run's settings: eval.max_new_tokens, eval.gen_batch_size, its precision) on
the shipped eval prompts, once with src/slimtune/generate.py as it was at git REF and once as it
is now; prints seconds, tokens/s and whether every answer text is identical. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))


def generate_at(ref: str):
    """slimtune.generate as it was at git `ref`, loaded as slimtune._generate_at (its relative imports
    resolve in the current package)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:src/slimtune/generate.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "generate_at.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("slimtune._generate_at", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--before", default="3109e90", help="git ref of the generate.py to compare against")
    ap.add_argument("--prompts", type=int, default=None, help="first N eval prompts (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "eval_generation.json"))
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from generation import cpu_info, loadavg, versions

    import slimtune.evaluate.base_vs_tuned as bvt
    from slimtune.data.prompts import load_prompts
    from slimtune.generate import settings_for

    old = generate_at(args.before)
    new_many = bvt.generate_many
    pair = bvt.BaseVsTuned(args.run)
    cfg = pair.cfg
    chats = load_prompts("builtin:eval_prompts", args.prompts, cfg.data.system_prompt)
    s = settings_for(cfg, max_new_tokens=args.max_new_tokens or cfg.eval.max_new_tokens)
    gb = cfg.eval.gen_batch_size
    rows, texts = [], {}
    for r in range(args.rounds):
        for side in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
            bvt.generate_many = old.generate_many if side == "before" else new_many
            t = time.perf_counter()
            base, tuned = pair.answer_both(chats, s, gb, use_cache=False)
            sec = time.perf_counter() - t
            bvt.generate_many = new_many
            answers = [a["text"] for a in base + tuned]
            texts.setdefault(side, answers)
            n = sum(a["n_tokens"] for a in base + tuned)
            row = {"round": r, "code": side, "answers": len(answers), "tokens": n, "seconds": round(sec, 1),
                   "tok_s": round(n / sec, 1), "loadavg": loadavg()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    same = [a == b for a, b in zip(texts["before"], texts["after"])]
    med = {side: sorted(x["seconds"] for x in rows if x["code"] == side) for side in ("before", "after")}
    summary = {side: {"median_s": v[len(v) // 2] if len(v) % 2 else sum(v[len(v) // 2 - 1:len(v) // 2 + 1]) / 2}
               for side, v in med.items()}
    summary["speedup"] = round(summary["before"]["median_s"] / summary["after"]["median_s"], 2)
    summary["identical_answers"] = f"{sum(same)}/{len(same)}"
    print(json.dumps(summary), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/eval_generation.py " + " ".join(argv or sys.argv[1:]),
                               "run": args.run, **cpu_info(), "versions": versions(), "settings": s.to_dict(),
                               "gen_batch_size": gb, "prompts": len(chats), "summary": summary, "rows": rows,
                               "differ_at": [i for i, ok in enumerate(same) if not ok]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
