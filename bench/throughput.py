"""slimtune vs TRL SFTTrainer: same model, data, LoRA, lengths, batch, steps, lr schedule and seed.

    python bench/throughput.py                       # both models, 12 steps, 2 rounds
    python bench/throughput.py --models random --steps 12 --rounds 3
    python bench/throughput.py --levers --models random   # slimtune settings one by one

Each run is its own process (peak RSS per run). Runs are interleaved TRL, slimtune, TRL, ...
and every other round goes in reverse order, so a slow minute on the shared cores hits both.
Reported: trained tokens/s (tokens that carry loss: label != -100 after the shift), s/step,
peak RSS, training loss at step N, and the held-out loss after N steps (16 fixed chats, scored
by the same code for every run), then the medians, spreads, ratios and the targets of issue 6.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# ---------------------------------------------------------------------------------------------
# configurations. TRL: SFTConfig fields on top of the shared ones; slimtune: key=value overrides.

TRL = {
    # TRL's defaults (padded batches, its random sampler, gradient checkpointing on: SFTConfig's
    # default) except what every run shares (fp32: this CPU has no native bf16).
    "trl_default": {},
    "trl_packing": {"packing": True, "gradient_checkpointing": False},          # bfd packing, padding-free
    "trl_padding_free": {"padding_free": True, "max_length": None, "gradient_checkpointing": False},
    # TRL's loop with its fused loss + metrics replaced by the model's own loss (full logits).
    "trl_plain_loss": {"gradient_checkpointing": False, "_plain_loss": True},
    # Correctness pair for slimtune's default: TRL fed slimtune's exact batches (same order).
    "trl_same_batches": {"gradient_checkpointing": False, "_same_batches": True},
}
SLIM = {  # "slimtune fastest" in the targets = the fastest of these (median tokens/s), per model
    "slim_default": [],
    "slim_packing": ["data.packing=true"],
    "slim_gc": ["train.gradient_checkpointing=true"],   # the memory-lean setting (TRL's default has it on)
    "slim_whole": ["train.micro_batch_tokens=0"],       # whole 8-row batches: the default before the split
}
LEVERS = {  # --levers: one setting at a time against slimtune's default
    "slim_default": [],
    "no_split": ["train.micro_batch_tokens=0"],
    "split_2048": ["train.micro_batch_tokens=2048"],
    "no_grouping": ["data.group_by_length=false"],
    "packing": ["data.packing=true"],
    "chunk_256": ["loss.chunk_size=256"],
    "chunk_4096": ["loss.chunk_size=4096"],
    "packing+chunk_4096": ["data.packing=true", "loss.chunk_size=4096"],
    "eager_attn": ["model.attn_implementation=eager"],
    "threads_2": ["train.num_threads=2"],
    # prototypes of source changes (monkeypatched in the worker, see PROTOS)
    "proto_no_pad_mask": ["proto=no_pad_mask"],
    # opt-in only (--configs): this CPU has no native bf16, its bf16 matmuls run at ~1 GFLOP/s
    "bf16": ["model.dtype=bfloat16"],
}
DEFAULT_LEVERS = [k for k in LEVERS if k != "bf16"]
ROUND = ["trl_default", "slim_default", "trl_packing", "slim_packing",
         "trl_padding_free", "slim_gc", "trl_plain_loss", "slim_default", "slim_whole"]


def slim_raw(spec: dict, run_dir: str) -> dict:
    return {
        "model": {"name": spec["model_dir"]},
        "data": {"train": spec["data"]["train_chats"], "val_fraction": 0.0, "max_length": common.MAX_LENGTH,
                 "general_prompts": None},
        "method": {"name": "lora", "r": common.LORA["r"], "alpha": common.LORA["alpha"], "targets": "attn"},
        "train": {"output_dir": run_dir, "max_steps": spec["steps"], "lr": common.LR, "batch_size": common.BATCH,
                  "seed": common.SEED, "progress": False},
        "eval": {"kl": False},
    }


# ---------------------------------------------------------------------------------------------
# workers (run in a fresh process)


def proto_no_pad_mask() -> None:
    """Prototype for forward.hidden_states: do not hand the model the attention mask of a
    right-padded batch. Causal attention already keeps every real token from seeing the padding
    after it (and positions are 0..T-1 either way), so real positions get the same hidden states,
    while sdpa takes its is_causal path instead of a (B, 1, T, T) masked one. The mask stays in
    the batch for kl_positions."""
    import slimtune.train.forward as fw

    original = fw.hidden_states

    def hidden_states(model, batch):
        return original(model, {k: v for k, v in batch.items() if k != "attention_mask"})

    fw.hidden_states = hidden_states


PROTOS = {"no_pad_mask": proto_no_pad_mask}


def run_slimtune(spec: dict) -> dict:
    import slimtune.train.loop as st
    from slimtune.config import build_config

    overrides = [o for o in spec["overrides"] if not o.startswith("proto=")]
    for o in spec["overrides"]:
        if o.startswith("proto="):
            PROTOS[o.split("=", 1)[1]]()
    common.same_start_adapters()  # the same starting adapter as the TRL runs
    run_dir = str(Path(spec["tmp"]) / "run")
    cfg = build_config(slim_raw(spec, run_dir), overrides)
    summary = st.train(cfg, log=lambda *a: None)
    peak = common.peak_rss_mb()
    rows = [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    t = summary["time"]
    return {"tokens": t["trained_tokens"], "train_s": rows[-1]["elapsed_s"], "peak_rss_mb": round(peak, 1),
            "losses": [r["loss"] for r in rows], "step_tokens": common.diffs([r["tokens"] for r in rows]),
            "step_s": common.diffs([r["elapsed_s"] for r in rows]),
            "heldout": common.heldout_loss(spec["model_dir"], run_dir, spec["data"]["eval"])}


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from slimtune.methods import target_modules
    from slimtune.models import load_tokenizer

    opts = dict(spec["trl"])
    plain, same = opts.pop("_plain_loss", False), opts.pop("_same_batches", False)
    examples = json.loads(Path(spec["data"]["train"]).read_text())
    if same:  # slimtune's epoch-0 batches, in order, read by a sequential sampler
        examples = [examples[i] for b in spec["slim_batches"] for i in b]
        opts["train_sampling_strategy"] = "sequential"
    torch.manual_seed(common.SEED)
    tok = load_tokenizer(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    args = SFTConfig(output_dir=str(Path(spec["tmp"]) / "trl"), max_steps=spec["steps"],
                     per_device_train_batch_size=common.BATCH, gradient_accumulation_steps=1,
                     learning_rate=common.LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, seed=common.SEED, bf16=False, fp16=False, logging_steps=1,
                     report_to="none", save_strategy="no", disable_tqdm=True,
                     **{"max_length": common.MAX_LENGTH, **opts})
    lora = LoraConfig(r=common.LORA["r"], lora_alpha=common.LORA["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=target_modules(model, "attn"), task_type="CAUSAL_LM")
    cls = _plain_loss_trainer() if plain else SFTTrainer
    # The labels are slimtune's rendering (assistant turns + <|im_end|>): TRL cannot build an assistant
    # mask for SmolLM2's template (no {% generation %} markers, no patch for it in TRL 1.16).
    trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tok,
                  peft_config=lora)
    common.reinit_lora(trainer.model)
    out = common.train_trl_timed(trainer, spec["steps"], lambda batch: (batch["labels"][:, 1:] != -100).sum())
    adapter = str(Path(spec["tmp"]) / "adapter")
    trainer.model.save_pretrained(adapter)
    return {**out, "heldout": common.heldout_loss(spec["model_dir"], adapter, spec["data"]["eval"])}


def _plain_loss_trainer():
    from trl import SFTTrainer

    class PlainLoss(SFTTrainer):
        """SFTTrainer with its loss step (fused head + entropy/accuracy metrics) replaced by the
        model's own loss: full logits, mean CE over labels != -100."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            kw = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
            out = model(**inputs, use_cache=False, **kw)
            return (out.loss, out) if return_outputs else out.loss

    return PlainLoss


def run(spec: dict) -> dict:
    return run_trl(spec) if spec["framework"] == "trl" else run_slimtune(spec)


# ---------------------------------------------------------------------------------------------
# the parent: data, rounds, table, targets


def slim_batches(data: dict, steps: int, model_dir: str = "smollm2-135m") -> list[list[int]]:
    """slimtune's epoch-0 micro-batches (indices into train.json) at its defaults, after checking
    that slimtune's own rendering of train.jsonl with this model's tokenizer is exactly train.json
    (what the TRL runs get)."""
    from slimtune.config import build_config
    from slimtune.data.prepare import prepare
    from slimtune.models import load_tokenizer
    from slimtune.train.loop import epoch_rows

    cfg = build_config(slim_raw({"model_dir": model_dir, "data": data, "steps": steps}, "/tmp/unused"))
    prepared = prepare(cfg.data, load_tokenizer(model_dir), cfg.train.seed)
    mine = json.loads(Path(data["train"]).read_text())
    assert [e["input_ids"] for e in prepared.train] == [e["input_ids"] for e in mine], "renderings differ"
    assert [e["labels"] for e in prepared.train] == [e["labels"] for e in mine], "labels differ"
    return epoch_rows(prepared.train, cfg, 0)[1][:steps]


def trl_mask_check(data: dict) -> str:
    """Can TRL 1.16 make the assistant mask itself for SmolLM2's template? If not, does its mask
    with a hand-marked template ({% generation %} around content + <|im_end|>) equal ours?"""
    from trl.chat_template_utils import get_training_chat_template

    from slimtune.data.reader import load_chats
    from slimtune.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    try:
        get_training_chat_template(tok)
        own = "TRL patched the template itself"
    except ValueError as e:
        own = f"TRL 1.16 assistant_only_loss on SmolLM2's template: ValueError ({str(e)[:60]}...)"
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    marked_turn = ("{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
                   "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                   "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}")
    if turn not in tok.chat_template:
        return f"{own}; SmolLM2's template changed, hand-marked check skipped"
    marked = tok.chat_template.replace(turn, marked_turn)
    ours = json.loads(Path(data["train"]).read_text())
    same = 0
    for chat, ex in zip(load_chats(data["train_chats"]), ours):
        out = tok.apply_chat_template(chat, chat_template=marked, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = out["input_ids"][:common.MAX_LENGTH], out["assistant_masks"][:common.MAX_LENGTH]
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        same += ids == ex["input_ids"] and labels == ex["labels"]
    return f"{own}; with a hand-marked template, TRL's own mask equals slimtune's labels on {same}/{len(ours)} chats"


def summarise(runs: list[dict]) -> dict:
    """Per (model, config): medians and spreads over the repeats."""
    out = {}
    for r in runs:
        if "error" in r:
            continue
        d = out.setdefault((r["model"], r["config"]), {"tok_s": [], "s_step": [], "rss": [], "loss": [],
                                                      "heldout": [], "tokens": []})
        d["tok_s"].append(r["tokens"] / r["train_s"])
        d["s_step"].append(r["train_s"] / len(r["losses"]))
        d["rss"].append(r["peak_rss_mb"])
        d["loss"].append(r["losses"][-1])
        d["heldout"].append(r["heldout"])
        d["tokens"].append(r["tokens"])
    return out


def med(s: dict, key, stat="tok_s") -> float | None:
    return common.median_spread(s[key][stat])[0] if key in s else None


def targets(s: dict, model: str) -> list[tuple[str, bool | None, str]]:
    """The Must-show lines of issue 6 for one model: (text, passed, numbers)."""
    g = lambda cfg, stat="tok_s": med(s, (model, cfg), stat)  # noqa: E731
    res = []
    measured = [c for c in SLIM if (model, c) in s]
    fast = max(measured, key=g) if measured else "slim_default"
    res.append((f"slimtune fastest setting measured: {fast} ({', '.join(SLIM.get(fast, [])) or 'the defaults'})",
                None, f"{g(fast) or 0:.0f} tok/s"))

    def check(text, a, b, factor, higher=True):
        if a is None or b is None:
            res.append((text, None, "missing run"))
            return
        ratio = a / b
        res.append((text, ratio >= factor if higher else ratio <= factor, f"{ratio:.2f}x"))

    check("slimtune default >= 3x TRL default tokens/s", g("slim_default"), g("trl_default"), 3.0)
    trl_best = max([x for x in (g(c) for c in ("trl_default", "trl_packing", "trl_padding_free")) if x] or [0]) or None
    check("slimtune fastest >= 2x TRL fastest unpatched tokens/s", g(fast), trl_best, 2.0)
    check("slimtune fastest >= 1.3x TRL with plain loss tokens/s", g(fast), g("trl_plain_loss"), 1.3)
    check("slimtune default peak RSS <= 0.75x TRL default", g("slim_default", "rss"), g("trl_default", "rss"),
          0.75, higher=False)
    check(f"slimtune fastest ({fast}) peak RSS <= 0.75x TRL default", g(fast, "rss"), g("trl_default", "rss"),
          0.75, higher=False)
    if (model, "slim_gc") in s:
        check("slimtune with gradient checkpointing (as TRL's default) peak RSS <= 0.75x TRL default",
              g("slim_gc", "rss"), g("trl_default", "rss"), 0.75, higher=False)
    a, b = g("slim_default", "heldout"), g("trl_default", "heldout")
    if a and b:
        res.append(("held-out loss after N steps within 2% of TRL default's", abs(a / b - 1) <= 0.02,
                    f"{a:.4f} vs {b:.4f} ({100 * (a / b - 1):+.2f}%)"))
    a, b = g("slim_default", "loss"), g("trl_same_batches", "loss")
    if a and b:
        res.append(("training loss at step N within 2% of TRL on the same batches", abs(a / b - 1) <= 0.02,
                    f"{a:.4f} vs {b:.4f} ({100 * (a / b - 1):+.2f}%)"))
    return res


def report(runs: list[dict], models: list[str], meta: dict, configs: list[str]) -> str:
    s = summarise(runs)
    lines = []
    for m in models:
        lines.append(f"\n### {common.MODELS[m][0]}  ({meta['steps']} steps, batch {common.BATCH}, max length "
                     f"{common.MAX_LENGTH}, LoRA r{common.LORA['r']} on q/k/v/o, fp32, threads: {meta['threads']})\n")
        base = med(s, (m, "trl_default"))
        rows = []
        for c in configs:
            if (m, c) not in s:
                continue
            d = s[(m, c)]
            tok = med(s, (m, c))
            rows.append([c, len(d["tok_s"]), common.fmt_ms(d["tok_s"]), common.fmt_ms(d["s_step"], 2),
                         common.fmt_ms(d["rss"]), common.fmt_ms(d["loss"], 4), common.fmt_ms(d["heldout"], 4),
                         f"{tok / base:.2f}x" if base else "n/a",
                         f"{med(s, (m, c), 'rss') / med(s, (m, 'trl_default'), 'rss'):.2f}x" if base else "n/a"])
        lines.append(common.markdown_table(
            ["config", "runs", "trained tok/s", "s/step", "peak RSS MiB", f"loss @ step {meta['steps']}",
             "held-out loss", "tok/s vs TRL default", "RSS vs TRL default"], rows))
        errors = [r for r in runs if r["model"] == m and "error" in r]
        for r in errors:
            lines.append(f"\nFAILED RUN {r['config']}: {r['error']}\n```\n{r['log_tail'][-800:]}\n```")
        if not meta.get("levers"):
            lines.append("\nTargets (issue 6):\n")
            for text, ok, nums in targets(s, m):
                lines.append(f"- {'PASS' if ok else 'FAIL' if ok is False else 'INFO'}  {text}: {nums}")
    lines.append("\nCells: median (min-max) over the runs. trained tok/s = tokens with a label after the "
                 "shift / wall time of the N steps.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random,smollm2", help="comma list of: random, smollm2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2, help="repeats of the interleaved round")
    ap.add_argument("--configs", default=None, help="comma list to run instead of the full round")
    ap.add_argument("--levers", action="store_true", help="slimtune settings one at a time")
    ap.add_argument("--same-batches", type=int, default=1, help="runs of trl_same_batches per model")
    ap.add_argument("--name", default=None, help="results file name (default: throughput or levers)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP/MKL threads for every run, TRL and slimtune alike (0: torch's default, one per "
                         "core). Default 1: on these shared cores a second thread stalls at every parallel op "
                         "while another process holds the other core (see BENCHMARKS.md)")
    ap.add_argument("--combine", nargs="+", metavar="FILE[:MODELS]",
                    help="no runs: rebuild the report from result files, keeping the listed models of each "
                         "(e.g. results/a.json:smollm2 results/b.json:random)")
    a = ap.parse_args()
    if a.combine:
        return combine(a.combine, a.name or "throughput")
    models = a.models.split(",")
    name = a.name or ("levers" if a.levers else "throughput")
    work = Path("/tmp/slimtune-bench-data")
    data = common.make_data(work, a.steps * common.BATCH)
    meta = {"steps": a.steps, "rounds": a.rounds, "threads": a.threads or "torch default", "levers": a.levers, "machine": common.machine(),
            "data": data["stats"], "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.levers:
        order = DEFAULT_LEVERS if not a.configs else a.configs.split(",")
    else:
        order = a.configs.split(",") if a.configs else ROUND
        meta["trl_mask"] = trl_mask_check(data)
        print(meta["trl_mask"], flush=True)
    batches = {m: slim_batches(data, a.steps, common.model_path(m)) for m in models}
    runs: list[dict] = []
    script = Path(__file__).resolve()
    plan = []
    for m in models:
        for rnd in range(a.rounds):
            plan += [(m, c, rnd) for c in (order if rnd % 2 == 0 else order[::-1])]
        if not a.levers and not a.configs:
            plan += [(m, "trl_same_batches", 0)] * a.same_batches
    for i, (m, c, rnd) in enumerate(plan):
        spec = {"model": m, "config": c, "model_dir": common.model_path(m), "data": data, "steps": a.steps,
                "slim_batches": batches[m]}
        if c in TRL:
            spec.update(framework="trl", trl=TRL[c])
        else:
            spec.update(framework="slimtune", overrides=(LEVERS if a.levers else SLIM)[c])
        t0 = time.time()
        r = common.run_worker(script, spec, threads=a.threads or None)
        r.update(model=m, config=c, round=rnd)
        runs.append(r)
        msg = (f"{r['error']}" if "error" in r else
               f"{r['tokens'] / r['train_s']:8.1f} tok/s  {r['train_s'] / a.steps:6.2f} s/step  "
               f"rss {r['peak_rss_mb']:7.0f} MiB  loss {r['losses'][-1]:.4f}  held-out {r['heldout']:.4f}")
        print(f"[{i + 1}/{len(plan)} {time.strftime('%H:%M:%S')} +{time.time() - t0:4.0f}s] {m:8s} {c:18s} {msg}",
              flush=True)
        if "error" in r:
            print(r["log_tail"][-1500:], flush=True)
        common.save_results(name, {"meta": meta, "runs": runs}, report(runs, models, meta, _configs(order)))
    text = report(runs, models, meta, _configs(order))
    print(text)
    common.save_results(name, {"meta": meta, "runs": runs}, f"# {name}\n\n`{meta['command']}`\n\n"
                        f"{meta['machine']}\n\n{meta.get('trl_mask', '')}\n{text}")


def combine(files: list[str], name: str) -> None:
    runs, metas, models = [], [], []
    for spec in files:
        path, _, keep = spec.partition(":")
        d = json.loads(Path(path).read_text())
        wanted = keep.split(",") if keep else sorted({r["model"] for r in d["runs"]})
        runs += [r for r in d["runs"] if r["model"] in wanted]
        models += [m for m in wanted if m not in models]
        metas.append(dict(d["meta"], file=path, models=wanted))
    meta = dict(metas[0], combined=metas)
    text = report(runs, models, meta, _configs(ROUND))
    print(text)
    common.save_results(name, {"meta": meta, "runs": runs},
                        f"# {name}\n\n" + "\n".join(f"`{m['command']}` ({m['started']}): {', '.join(m['models'])}"
                                                    for m in metas)
                        + f"\n\n{meta['machine']}\n\n{meta.get('trl_mask', '')}\n{text}")


def _configs(order: list[str]) -> list[str]:
    seen = []
    for c in order + ["trl_same_batches"]:
        if c not in seen:
            seen.append(c)
    return seen


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
