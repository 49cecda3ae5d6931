"""slimtune DPO vs TRL DPOTrainer: same model, pairs, LoRA, batch, steps, lr schedule and seed.

    python bench/preference.py                       # embedded SmolLM2, 5 steps, 2 rounds
    python bench/preference.py --steps 8 --rounds 3

Each run is its own process (peak RSS per run, see common.py). Runs are interleaved TRL,
slimtune, slimtune, TRL, ... so a slow minute on the shared cores hits both. Both read the same
token ids: the shipped preference set rendered once by slimtune (`data.preference.render_pair`),
handed to TRL's own collator. Both use the base (the adapter switched off) as the reference.
Reported: scored tokens/s (chosen + rejected completion tokens), s/step, peak RSS, the DPO loss
at step 1 (the same adapter and first batch would give the same number) and at step N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 8          # pairs per step: 16 sequences
LR = 5e-4
BETA = 0.1


def make_pairs(workdir: Path) -> dict:
    """The shipped pairs rendered with SmolLM2's template: pairs.json (token ids) for TRL,
    pairs.jsonl (the text rows) for slimtune, which renders them itself to the same ids."""
    from slimtune.data.reader import read_rows
    from slimtune.data.preference import load_preferences
    from slimtune.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    rows, _ = load_preferences("builtin:preferences", tok, max_length=common.MAX_LENGTH)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "pairs.json").write_text(json.dumps(rows))
    text = [r for _, r in read_rows("builtin:preferences")]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    return {"ids": str(workdir / "pairs.json"), "text": str(workdir / "pairs.jsonl"), "pairs": len(rows),
            "scored_tokens": tokens}


def run_slimtune(spec: dict) -> dict:
    import slimtune.train.loop as st
    from slimtune.config import build_config

    common.same_start_adapters()  # the same starting adapter as the TRL runs
    run_dir = str(Path(spec["tmp"]) / "run")
    cfg = build_config({
        "model": {"name": spec["model_dir"]},
        "data": {"train": spec["data"]["text"], "val_fraction": 0.0, "max_length": common.MAX_LENGTH,
                 "general_prompts": None},
        "method": {"name": "lora", "r": common.LORA["r"], "alpha": common.LORA["alpha"], "targets": "attn"},
        "loss": {"objective": "dpo", "beta": BETA},
        "train": {"output_dir": run_dir, "max_steps": spec["steps"], "lr": LR, "batch_size": BATCH,
                  "seed": common.SEED, "progress": False},
        "eval": {"kl": False}}, spec.get("overrides", []))
    summary = st.train(cfg, log=lambda *a: None)
    peak = common.peak_rss_mb()
    rows = [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "lr" in r]
    return {"tokens": summary["time"]["trained_tokens"], "train_s": rows[-1]["elapsed_s"],
            "peak_rss_mb": round(peak, 1), "losses": [r["loss"] for r in rows],
            "step_s": common.diffs([r["elapsed_s"] for r in rows])}


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from slimtune.methods import target_modules
    from slimtune.models import load_tokenizer

    pairs = json.loads(Path(spec["data"]["ids"]).read_text())
    ids = [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]
    torch.manual_seed(common.SEED)
    tok = load_tokenizer(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(output_dir=str(Path(spec["tmp"]) / "trl"), max_steps=spec["steps"],
                     per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
                     lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     seed=common.SEED, bf16=False, fp16=False, logging_steps=1, report_to="none",
                     save_strategy="no", disable_tqdm=True, beta=BETA, max_length=common.MAX_LENGTH,
                     remove_unused_columns=False, **spec.get("trl", {}))
    lora = LoraConfig(r=common.LORA["r"], lora_alpha=common.LORA["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=target_modules(model, "attn"), task_type="CAUSAL_LM")
    # TRL tokenises text rows itself; it is given slimtune's token ids instead, so both score the
    # same tokens (TRL's own rendering would add the newline after <|im_end|>).
    stub = [{"prompt": "x", "chosen": "y", "rejected": "z"}]
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(stub), processing_class=tok,
                         peft_config=lora)
    trainer.train_dataset = Dataset.from_list(ids)
    common.reinit_lora(trainer.model)
    return common.train_trl_timed(trainer, spec["steps"], lambda batch: batch["completion_mask"].sum())


def run(spec: dict) -> dict:
    return run_trl(spec) if spec["framework"] == "trl" else run_slimtune(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="preference")
    args = ap.parse_args()
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="slimbench-pref-"))
    data = make_pairs(work)
    model_dir = common.model_path("smollm2")
    script = Path(__file__).resolve()
    results: dict[str, list[dict]] = {"trl": [], "slimtune": []}
    for r in range(args.rounds):
        order = ["trl", "slimtune"] if r % 2 == 0 else ["slimtune", "trl"]
        for fw in order:
            spec = {"framework": fw, "model_dir": model_dir, "data": data, "steps": args.steps}
            t0 = time.perf_counter()
            res = common.run_worker(script, spec, threads=args.threads)
            print(f"round {r + 1} {fw}: " + (res.get("error", "") + res.get("log_tail", "")[-1500:] if "error" in res
                  else f"{res['tokens'] / res['train_s']:.1f} scored tok/s, {res['train_s']:.1f} s, "
                       f"peak {res['peak_rss_mb']:,.0f} MiB, loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}")
                  + f"  ({time.perf_counter() - t0:.0f} s wall)", file=sys.stderr, flush=True)
            results[fw].append(res)
    table, nums = common.vs_trl_summary(results, args.steps, "scored")
    ratio_t, ratio_m = nums["ratio_tokens_per_s"], nums["ratio_peak_rss"]
    md = (f"# slimtune DPO vs TRL DPOTrainer ({common.MODELS['smollm2'][0]})\n\n"
          f"{data['pairs']} shipped pairs, {BATCH} pairs/step, {args.steps} steps, LoRA r16 attn, lr {LR}, "
          f"beta {BETA}, fp32, {args.threads} threads, {args.rounds} rounds interleaved; medians (min-max).\n\n"
          f"{table}\n\nslimtune / TRL: **{ratio_t:.2f}x** scored tokens/s (target >= 2x), "
          f"**{ratio_m:.2f}x** peak RSS (target <= 0.6x).\n")
    print(md)
    common.save_results(args.name, {"machine": common.machine(), "args": vars(args), "data": data,
                                    "results": results, **nums}, md)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
