"""slimtune GRPO vs TRL GRPOTrainer: same model, prompts, G, max_new_tokens, LoRA, lr and loss.

    python bench/grpo.py                       # embedded SmolLM2, 3 steps, 2 rounds
    python bench/grpo.py --steps 4 --rounds 3 --prompts 2 --generations 4 --new-tokens 48

Each run is its own process (peak RSS per run, see common.py), interleaved TRL, slimtune,
slimtune, TRL, ... so a slow minute on the shared cores hits both. Both sample --generations
answers to each of --prompts prompts of builtin:grpo_prompts per step (temperature 1, up to
--new-tokens), reward them with the same instruction checks (rewards.r_ifeval on the prompt's
constraints), and take one DAPO step (beta 0, epsilon 0.2), fp32 on the CPU (`--precision bf16`: bf16 autocast
in both): TRL generates with
transformers' `generate` (use_cpu, no vLLM), slimtune with its batched KV-cached sampler and the
adapter merged. Measured: s/step (generation + update), generation's seconds and tokens (TRL:
`_generate_single_turn` timed, tokens from the completion ids its reward functions get;
slimtune: `generate_many` timed), peak RSS. The sampled answers differ (different samplers and
seeds), so per-token rates are the comparable numbers; s/step depends on the answers' lengths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LR = 1e-5


def make_prompts(workdir: Path, n: int) -> dict:
    """The first n rows of builtin:grpo_prompts: prompts.jsonl for slimtune, and the same rows with
    constraints as JSON text for TRL's dataset (Arrow would fill missing constraint keys with nulls)."""
    from slimtune.data.reader import read_rows

    rows = [r for _, r in read_rows("builtin:grpo_prompts")][:n]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "trl.json").write_text(json.dumps([{"prompt": r["messages"], "constraints": json.dumps(r["constraints"])}
                                                  for r in rows]))
    return {"slimtune": str(workdir / "prompts.jsonl"), "trl": str(workdir / "trl.json"), "prompts": len(rows)}


def run_slimtune(spec: dict) -> dict:
    import slimtune.train.loop as st
    import slimtune.train.objectives.grpo as grpo
    from slimtune.config import build_config

    common.same_start_adapters()  # the same starting adapter as the TRL runs
    gen_s, gen_tokens = [], []
    generate_many = grpo.generate_many

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = generate_many(*a, **kw)
        gen_s.append(time.perf_counter() - t0)
        gen_tokens.append(sum(x["n_tokens"] for x in out))
        return out

    grpo.generate_many = timed
    run_dir = str(Path(spec["tmp"]) / "run")
    cfg = build_config({
        "model": {"name": spec["model_dir"]},
        "data": {"train": spec["data"]["slimtune"], "val_fraction": 0.0, "general_prompts": None},
        "method": {"name": "lora", "r": common.LORA["r"], "alpha": common.LORA["alpha"], "targets": "attn"},
        "loss": {"objective": "grpo"},
        "grpo": {"num_generations": spec["G"], "max_new_tokens": spec["new_tokens"], "temperature": 1.0,
                 "loss_type": "dapo", "beta": 0.0, "rewards": [{"name": "ifeval"}], "samples_every": 0},
        "train": {"output_dir": run_dir, "max_steps": spec["steps"], "lr": LR, "batch_size": spec["prompts"],
                  "seed": common.SEED, "progress": False, "mixed_precision": spec.get("precision", "no")},
        "eval": {"kl": False}}, spec.get("overrides", []))
    st.train(cfg, log=lambda *a: None)
    peak = common.peak_rss_mb()
    rows = [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "lr" in r]
    return {"train_s": rows[-1]["elapsed_s"], "step_s": common.diffs([r["elapsed_s"] for r in rows]),
            "gen_s": gen_s, "gen_tokens": gen_tokens, "peak_rss_mb": round(peak, 1),
            "reward": [r["reward"] for r in rows], "completion_length": [r["completion_length"] for r in rows]}


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from slimtune.methods import target_modules
    from slimtune.models import load_tokenizer
    from slimtune.rewards import r_ifeval

    gen_s, gen_tokens = [], []

    def ifeval_reward(prompts, completions, completion_ids, constraints, **_):
        gen_tokens.append(sum(len(c) for c in completion_ids))
        return [r_ifeval(c[0]["content"], {"constraints": k}, True, None) for c, k in zip(completions, constraints)]

    torch.manual_seed(common.SEED)
    tok = load_tokenizer(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    n = spec["prompts"] * spec["G"]
    args = GRPOConfig(output_dir=str(Path(spec["tmp"]) / "trl"), max_steps=spec["steps"],
                      per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=spec["G"],
                      max_completion_length=spec["new_tokens"], temperature=1.0, beta=0.0, loss_type="dapo",
                      learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, seed=common.SEED, use_cpu=True, bf16=spec.get("precision") == "bf16", fp16=False,
                      logging_steps=1,
                      report_to="none", save_strategy="no", disable_tqdm=True, **spec.get("trl", {}))
    lora = LoraConfig(r=common.LORA["r"], lora_alpha=common.LORA["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=target_modules(model, "attn"), task_type="CAUSAL_LM")
    data = Dataset.from_list(json.loads(Path(spec["data"]["trl"]).read_text()))
    trainer = GRPOTrainer(model=model, reward_funcs=ifeval_reward, args=args, train_dataset=data,
                          processing_class=tok, peft_config=lora)
    common.reinit_lora(trainer.model)
    generate = trainer._generate_single_turn

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        gen_s.append(time.perf_counter() - t0)
        return out

    trainer._generate_single_turn = timed
    res = common.train_trl_timed(trainer, spec["steps"], lambda batch: 0)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"train_s": res["train_s"], "step_s": res["step_s"], "gen_s": gen_s[:spec["steps"]],
            "gen_tokens": gen_tokens[:spec["steps"]], "peak_rss_mb": res["peak_rss_mb"],
            "reward": [h["reward"] for h in logs], "completion_length": [h.get("completions/mean_length") for h in logs]}


def run(spec: dict) -> dict:
    return run_trl(spec) if spec["framework"] == "trl" else run_slimtune(spec)


def summarise(res: dict) -> dict:
    steps = len(res["step_s"])
    gen = sum(res["gen_s"][:steps])
    return {"steps_per_s": steps / res["train_s"], "gen_tokens_per_s": sum(res["gen_tokens"][:steps]) / max(gen, 1e-9),
            "gen_share": gen / res["train_s"], "peak_rss_mb": res["peak_rss_mb"],
            "tokens_per_step": sum(res["gen_tokens"][:steps]) / max(steps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="G: answers per prompt")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["no", "bf16"], default="no",
                    help="bf16: slimtune's train.mixed_precision=bf16 and TRL's bf16=True (autocast, both)")
    ap.add_argument("--trl-no-gc", action="store_true",
                    help="TRL without gradient checkpointing (GRPOConfig's default is on; slimtune's is off)")
    ap.add_argument("--name", default="grpo")
    args = ap.parse_args()
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="slimbench-grpo-"))
    data = make_prompts(work, args.prompts * args.steps)
    model_dir = common.model_path("smollm2")
    script = Path(__file__).resolve()
    results: dict[str, list[dict]] = {"trl": [], "slimtune": []}
    loads = []
    for r in range(args.rounds):
        for fw in (["trl", "slimtune"] if r % 2 == 0 else ["slimtune", "trl"]):
            spec = {"framework": fw, "model_dir": model_dir, "data": data, "steps": args.steps,
                    "prompts": args.prompts, "G": args.generations, "new_tokens": args.new_tokens,
                    "precision": args.precision, "trl": {"gradient_checkpointing": False} if args.trl_no_gc else {}}
            loads.append(Path("/proc/loadavg").read_text().split()[:3])
            t0 = time.perf_counter()
            res = common.run_worker(script, spec, threads=args.threads)
            if "error" not in res:
                res["summary"] = summarise(res)
            s = res.get("summary")
            print(f"round {r + 1} {fw}: " + (res.get("error", "") + res.get("log_tail", "")[-1500:] if s is None
                  else f"{s['steps_per_s']:.4f} steps/s, generation {s['gen_tokens_per_s']:.1f} tok/s "
                       f"({s['gen_share']:.0%} of the step), peak {s['peak_rss_mb']:,.0f} MiB")
                  + f"  ({time.perf_counter() - t0:.0f} s wall)", file=sys.stderr, flush=True)
            results[fw].append(res)
    ok = {fw: [x["summary"] for x in rs if "summary" in x] for fw, rs in results.items()}
    med = {fw: {k: common.median_spread([s[k] for s in ss])[0] for k in
                ("steps_per_s", "gen_tokens_per_s", "gen_share", "peak_rss_mb", "tokens_per_step")}
           for fw, ss in ok.items()}
    rows = [[fw, str(len(ok[fw])), common.fmt_ms([s["steps_per_s"] for s in ok[fw]], 4),
             common.fmt_ms([s["gen_tokens_per_s"] for s in ok[fw]], 1),
             common.fmt_ms([100 * s["gen_share"] for s in ok[fw]], 0),
             common.fmt_ms([s["tokens_per_step"] for s in ok[fw]], 0), common.fmt_ms([s["peak_rss_mb"] for s in ok[fw]])]
            for fw in ("trl", "slimtune")]
    table = common.markdown_table(["framework", "runs", "steps/s", "generation tokens/s", "generation % of step",
                                   "generated tokens/step", "peak RSS MiB"], rows)

    def ratio(k):
        return med["slimtune"][k] / med["trl"][k] if ok["trl"] and ok["slimtune"] and med["trl"][k] else float("nan")

    md = (f"# slimtune GRPO vs TRL GRPOTrainer ({common.MODELS['smollm2'][0]})\n\n"
          f"{args.prompts} prompts x G {args.generations} = {args.prompts * args.generations} completions/step, "
          f"<= {args.new_tokens} new tokens, temperature 1, {args.steps} steps, LoRA r16 attn, dapo, beta 0, "
          f"TRL gradient checkpointing {'off' if args.trl_no_gc else 'on (its default)'}, "
          f"{'bf16 autocast' if args.precision == 'bf16' else 'fp32'}, "
          f"{args.threads} threads, {args.rounds} rounds interleaved; medians (min-max). Load average before "
          f"each run: {', '.join('/'.join(x) for x in loads)}.\n\n{table}\n\n"
          f"slimtune / TRL: **{ratio('steps_per_s'):.2f}x** steps/s (target >= 3x), **{ratio('gen_tokens_per_s'):.2f}x** "
          f"generation tokens/s, **{ratio('peak_rss_mb'):.2f}x** peak RSS (target <= 0.6x).\n")
    print(md)
    common.save_results(args.name, {"machine": common.machine(), "args": vars(args), "data": data, "loadavg": loads,
                                    "results": results, "medians": med,
                                    "ratio_steps_per_s": ratio("steps_per_s"),
                                    "ratio_gen_tokens_per_s": ratio("gen_tokens_per_s"),
                                    "ratio_peak_rss": ratio("peak_rss_mb")}, md)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
