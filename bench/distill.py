"""slimtune distill vs TRL GKDTrainer (trl.experimental.gkd): same student, teacher, data, LoRA,
batch, steps, lr schedule and seed; off-policy (GKD lmbda = 0), forward KL, tau 1, no CE.

    python bench/distill.py                       # 5 steps, 2 rounds
    python bench/distill.py --steps 8 --rounds 3

Student: a random Llama 384x6 with SmolLM2's tokenizer (common.random_model_dir); teacher: the
embedded SmolLM2-135M-Instruct (same vocabulary, 2.4x wider). Both fp32 (slimtune: no autocast and
distill.teacher_dtype=float32, as TRL here). Data: the shipped single-turn instructions; TRL's
ChatML collator trains the last assistant turn, so slimtune runs with data.train_on=last. Each run
is its own process (peak RSS per run, common.py), runs interleaved TRL, slimtune, slimtune, TRL...
Reported: trained tokens/s (each framework's own count of positions with a target), s/step, peak
RSS, the loss at step 1 and step N (TRL's generalized_jsd_loss "batchmean" = slimtune's KL per
trained token, as tests/losses/test_distill.py pins, up to the trailing newline TRL trains).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 8
LR = 5e-4
N_CHATS = 96


def make_chats(workdir: Path) -> dict:
    from slimtune.data.reader import load_chats
    from slimtune.data.tools import write_chats

    chats = [c for c in load_chats("builtin:instructions") if len(c) == 2][:N_CHATS]
    workdir.mkdir(parents=True, exist_ok=True)
    write_chats(chats, workdir / "chats.jsonl")
    return {"chats": str(workdir / "chats.jsonl"), "n": len(chats)}


def run_slimtune(spec: dict) -> dict:
    import slimtune.train.loop as st
    from slimtune.config import build_config

    common.same_start_adapters()  # the same starting adapter as the TRL runs
    run_dir = str(Path(spec["tmp"]) / "run")
    cfg = build_config({
        "model": {"name": spec["student"]},
        "data": {"train": spec["data"]["chats"], "val_fraction": 0.0, "max_length": common.MAX_LENGTH,
                 "general_prompts": None, "train_on": "last"},
        "method": {"name": "lora", "r": common.LORA["r"], "alpha": common.LORA["alpha"], "targets": "attn"},
        "loss": {"objective": "distill"},
        "distill": {"teacher": spec["teacher"], "alpha": 0.0, "direction": "forward", "temperature": 1.0,
                    "teacher_dtype": "float32"},
        "train": {"output_dir": run_dir, "max_steps": spec["steps"], "lr": LR, "batch_size": BATCH,
                  "seed": common.SEED, "progress": False, "mixed_precision": "no"},
        "eval": {"kl": False}}, spec.get("overrides", []))
    summary = st.train(cfg, log=lambda *a: None)
    peak = common.peak_rss_mb()
    rows = [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "lr" in r]
    return {"tokens": summary["time"]["trained_tokens"], "train_s": rows[-1]["elapsed_s"],
            "peak_rss_mb": round(peak, 1), "losses": [r["loss"] for r in rows],
            "step_s": common.diffs([r["elapsed_s"] for r in rows])}


def run_trl(spec: dict) -> dict:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from slimtune.data.reader import load_chats
    from slimtune.methods import target_modules
    from slimtune.models import load_tokenizer

    torch.manual_seed(common.SEED)
    tok = load_tokenizer(spec["student"])
    model = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32, attn_implementation="sdpa")
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32, attn_implementation="sdpa")
    args = GKDConfig(output_dir=str(Path(spec["tmp"]) / "trl"), max_steps=spec["steps"],
                     per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
                     lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     seed=common.SEED, bf16=False, fp16=False, logging_steps=1, report_to="none",
                     save_strategy="no", disable_tqdm=True, max_length=common.MAX_LENGTH,
                     lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False)
    lora = LoraConfig(r=common.LORA["r"], lora_alpha=common.LORA["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=target_modules(model, "attn"), task_type="CAUSAL_LM")
    chats = [{"messages": c} for c in load_chats(spec["data"]["chats"])]
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(chats),
                         processing_class=tok, peft_config=lora)
    common.reinit_lora(trainer.model)
    return common.train_trl_timed(trainer, spec["steps"], lambda batch: (batch["labels"][:, 1:] != -100).sum())


def run(spec: dict) -> dict:
    return run_trl(spec) if spec["framework"] == "trl" else run_slimtune(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="distill")
    args = ap.parse_args()
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="slimbench-distill-"))
    data = make_chats(work)
    student, teacher = common.model_path("random"), common.model_path("smollm2")
    script = Path(__file__).resolve()
    results: dict[str, list[dict]] = {"trl": [], "slimtune": []}
    loads = [Path("/proc/loadavg").read_text().split()[:3]]
    for r in range(args.rounds):
        order = ["trl", "slimtune"] if r % 2 == 0 else ["slimtune", "trl"]
        for fw in order:
            spec = {"framework": fw, "student": student, "teacher": teacher, "data": data, "steps": args.steps}
            t0 = time.perf_counter()
            res = common.run_worker(script, spec, threads=args.threads)
            loads.append(Path("/proc/loadavg").read_text().split()[:3])
            print(f"round {r + 1} {fw}: " + (res.get("error", "") + res.get("log_tail", "")[-1500:] if "error" in res
                  else f"{res['tokens'] / res['train_s']:.1f} trained tok/s, {res['train_s']:.1f} s, "
                       f"peak {res['peak_rss_mb']:,.0f} MiB, loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}")
                  + f"  ({time.perf_counter() - t0:.0f} s wall, load {' '.join(loads[-1])})", file=sys.stderr, flush=True)
            results[fw].append(res)
    table, nums = common.vs_trl_summary(results, args.steps, "trained")
    ratio_t, ratio_m = nums["ratio_tokens_per_s"], nums["ratio_peak_rss"]
    md = (f"# slimtune distill vs TRL GKDTrainer (student {common.MODELS['random'][0]}, teacher "
          f"{common.MODELS['smollm2'][0]})\n\n"
          f"{data['n']} shipped instructions, {BATCH} chats/step, {args.steps} steps, LoRA r16 attn, lr {LR}, "
          f"off-policy forward KL, tau 1, fp32, {args.threads} threads, {args.rounds} rounds interleaved; "
          f"medians (min-max). Load average before and after each run: {loads}.\n\n"
          f"{table}\n\nslimtune / TRL: **{ratio_t:.2f}x** trained tokens/s (target >= 2x), "
          f"**{ratio_m:.2f}x** peak RSS (target <= 0.5x).\n")
    print(md)
    common.save_results(args.name, {"machine": common.machine(), "args": vars(args), "data": data,
                                    "results": results, **nums, "loadavg": loads}, md)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
