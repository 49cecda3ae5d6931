"""Measure the context-distillation demo (configs/distill_context.yaml) on its held-out prompts.

    slimtune train configs/distill_context.yaml
    python scripts/distill_demo.py runs/distill_context

Three sides answer the run's held-out prompts (the seeded split of data.train that training held
out), greedily, in shared batches: the base without the prompt, the teacher (the base WITH
distill.teacher_system / teacher_prefix) and the student (the tuned run, without it). The
behaviour is the one the demo's system prompt asks for: at most two sentences, and the answer
finished (ended with end-of-turn, not cut by max_new_tokens). Also the held-out KL(teacher ||
model) of base and student (the distill objective's own evaluation). Writes RUN/distill_demo.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path


def sentences(text: str) -> int:
    """Sentences in an answer: pieces ending in . ! or ? followed by white space or the end."""
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()])


def short(answer: dict) -> bool:
    return answer["ended"] and sentences(answer["text"]) <= 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--max-prompts", type=int, help="default: eval.max_examples of the run")
    args = p.parse_args(argv)

    import torch

    from slimtune.data.context import with_context
    from slimtune.data.prepare import read_records
    from slimtune.data.tools import split
    from slimtune.generate import GenSettings, generate_many
    from slimtune.methods import adapters_disabled
    from slimtune.runfolder import load_run
    from slimtune.train.objectives import make_objective

    t0 = time.perf_counter()
    model, tok, cfg = load_run(args.run)
    dc, n_max = cfg.distill, args.max_prompts or cfg.eval.max_examples
    records = read_records(cfg.data.train, cfg.data, cfg.train.seed)
    _, val = split(list(range(len(records))), cfg.data.val_fraction, cfg.train.seed)  # prepare's split
    prompts = []
    for i in val[:n_max]:
        chat = records[i]["messages"]
        prompts.append(chat[:next(j for j, m in enumerate(chat) if m["role"] == "assistant")])
    n = len(prompts)
    chats = prompts + [with_context(c, dc.teacher_system, dc.teacher_prefix) for c in prompts] + prompts
    settings = GenSettings(max_new_tokens=cfg.eval.max_new_tokens)
    print(f"answering {n} held-out prompts x 3 (base, teacher, student) ...", file=sys.stderr, flush=True)
    answers = generate_many(model, tok, chats, settings, cfg.eval.gen_batch_size,
                            adapter_on=[False] * (2 * n) + [True] * n)
    t_gen = time.perf_counter() - t0

    obj = make_objective(cfg)
    rows = obj.prepare_data(tok, cfg.train.seed).val[:n_max]
    cache: dict = {}  # the teacher's states, computed on the student's pass and reused for the base
    student_ev = obj.evaluate(model, rows, tok.pad_token_id, cfg.eval.batch_size, ref_cache=cache)
    with torch.no_grad(), adapters_disabled(model):
        base_ev = obj.evaluate(model, rows, tok.pad_token_id, cfg.eval.batch_size, ref_cache=cache)

    result = {"run": args.run, "prompts": n, "teacher_system": dc.teacher_system, "teacher_prefix": dc.teacher_prefix,
              "behaviour": "at most two sentences, answer finished", "max_new_tokens": settings.max_new_tokens,
              "sides": {}, "seconds": {"generation": round(t_gen, 1), "total": None}}
    for k, side in enumerate(("base", "teacher", "student")):
        ans = answers[k * n:(k + 1) * n]
        result["sides"][side] = {
            "sees_prompt": side == "teacher", "behaviour_rate": sum(map(short, ans)) / n,
            "mean_sentences": statistics.mean(sentences(a["text"]) for a in ans),
            "mean_tokens": statistics.mean(a["n_tokens"] for a in ans),
            "ended": sum(a["ended"] for a in ans) / n}
    for side, ev in (("base", base_ev), ("student", student_ev)):
        result["sides"][side].update(kl_to_teacher=ev["eval_kl_teacher"], agreement=ev["eval_agreement"],
                                     heldout_loss=ev["eval_loss"])
    result["sides"]["teacher"]["heldout_loss"] = student_ev["eval_teacher_loss"]
    result["samples"] = [{"prompt": c[-1]["content"], **{s: answers[k * n + i]["text"] for k, s in
                                                         enumerate(("base", "teacher", "student"))}}
                         for i, c in enumerate(prompts)]
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (Path(args.run) / "distill_demo.json").write_text(json.dumps(result, indent=2))
    fmt = (lambda v, spec: "-" if v is None else spec.format(v))
    print(f"{'side':<10}{'prompt':>8}{'<=2 sentences':>15}{'sentences':>11}{'tokens':>8}{'KL to teacher':>15}{'agreement':>11}")
    for side, r in result["sides"].items():
        print(f"{side:<10}{'yes' if r['sees_prompt'] else 'no':>8}{r['behaviour_rate']:>15.0%}{r['mean_sentences']:>11.2f}"
              f"{r['mean_tokens']:>8.1f}{fmt(r.get('kl_to_teacher'), '{:.4f}'):>15}{fmt(r.get('agreement'), '{:.1%}'):>11}")
    print(f"{n} held-out prompts, greedy, <= {settings.max_new_tokens} new tokens; {result['seconds']['total']:.0f} s; "
          f"wrote {Path(args.run) / 'distill_demo.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
