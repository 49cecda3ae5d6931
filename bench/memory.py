"""Where a training step's memory goes, and what bounds it (SmolLM2-135M, LoRA r16 on q/k/v/o).

    python bench/memory.py                       # accounting + every variant, 2 steps each
    python bench/memory.py --variants whole,split_1024 --steps 3

1. Accounting: every tensor autograd saves for backward during one forward (unique storages,
   parameters excluded), summed by the module that saved it, per token. That is the activation
   memory a batch costs, before the allocator's own overhead.
2. Variants, each in its own process (so ru_maxrss is its own): the same worst-case batch of
   8 full-length rows x 512 tokens through slimtune's `accumulate_grads`, whole or split by
   `split_by_tokens` (train.micro_batch_tokens), with and without gradient checkpointing; peak
   RSS after each step (the second step shows whether the allocator grows) and seconds per step.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

B, T, PROMPT = 8, 512, 150  # rows, tokens per row, untrained prompt tokens per row
VARIANTS = {  # name: (micro_batch_tokens, gradient checkpointing)
    "whole": (0, False),
    "split_2048": (2048, False),
    "split_1024": (1024, False),
    "split_512": (512, False),
    "gc": (0, True),
    "gc+split_1024": (1024, True),
}


def setup(gc: bool):
    import torch

    from slimtune.config import MethodCfg
    from slimtune.methods import apply_method
    from slimtune.models import load_model, resolve_model

    path = resolve_model("smollm2-135m")
    model = load_model(path)  # fp32, sdpa: what training uses
    model = apply_method(model, MethodCfg(name="lora", r=common.LORA["r"], alpha=common.LORA["alpha"],
                                          targets="attn"), path, gc)
    model.train()
    g = torch.Generator().manual_seed(common.SEED)
    rows = []
    for _ in range(B):
        ids = torch.randint(0, 49000, (T,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * PROMPT + ids[PROMPT:]})
    return model, rows


def account(spec: dict) -> dict:
    """Bytes autograd saves for backward, by saving module, for one forward of 2 x 512 tokens."""
    import torch

    from slimtune.data.batching import collate
    from slimtune.train.forward import batch_loss

    model, rows = setup(False)
    batch = collate(rows[:2], 0)
    stack: list[str] = []
    for name, mod in model.named_modules():
        mod.register_forward_pre_hook(lambda m, a, name=name: stack.append(name))
        mod.register_forward_hook(lambda m, a, o: stack.pop() and None)  # a hook's return would replace o
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, tuple, int]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (stack[-1] if stack else "(loss)", tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch_loss(model, batch)
    n_tok = batch["input_ids"].numel()
    by = collections.Counter()
    for where, shape, nbytes in seen.values():
        key = ".".join(p for p in where.split(".") if not p.isdigit()).replace("base_model.model.model.", "")
        by[f"{key} {list(shape[-1:])}"] += nbytes
    total = sum(by.values())
    return {"tokens": n_tok, "kib_per_token": total / n_tok / 1024,
            "by_module": [(k, v / n_tok / 1024) for k, v in by.most_common(12)]}


def variant(spec: dict) -> dict:
    from slimtune.data.batching import count_trained, split_by_tokens
    from slimtune.config import build_config
    from slimtune.train.loop import accumulate_grads
    from slimtune.train.objectives.sft import SFT

    budget, gc = VARIANTS[spec["variant"]]
    model, rows = setup(gc)
    loaded = common.peak_rss_mb()
    pieces = split_by_tokens(rows, budget)
    n = count_trained(rows)
    out = {"loaded_rss_mb": round(loaded), "pieces": len(pieces), "step_s": [], "rss_mb": []}
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        ce = accumulate_grads(model, pieces, n, 0, SFT(build_config()))["ce"]
        model.zero_grad(set_to_none=True)
        out["step_s"].append(round(time.perf_counter() - t0, 2))
        out["rss_mb"].append(round(common.peak_rss_mb()))
    out["ce"] = ce / n
    return out


def run(spec: dict) -> dict:
    return account(spec) if spec["variant"] == "account" else variant(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list, or 'none'")
    ap.add_argument("--no-account", action="store_true", help="skip the saved-tensor accounting")
    ap.add_argument("--name", default="memory", help="results file name")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    a = ap.parse_args()
    script = Path(__file__).resolve()
    lines = [f"# memory\n\n`python bench/memory.py {' '.join(sys.argv[1:])}`\n",
             f"SmolLM2-135M, LoRA r{common.LORA['r']} on q/k/v/o, fp32, {B} rows x {T} tokens "
             f"({B * (T - PROMPT - 1)} trained), threads: {a.threads or 'torch default'}\n"]
    acct = {} if a.no_account else common.run_worker(script, {"variant": "account"}, threads=a.threads or None)
    results = {"account": acct}
    if not acct:
        pass
    elif "error" not in acct:
        lines.append(f"Saved for backward: {acct['kib_per_token']:.0f} KiB per token "
                     f"({acct['kib_per_token'] * B * T / 1024:,.0f} MiB for {B} x {T}). By module (KiB/token):\n")
        lines.append(common.markdown_table(["module [last dim]", "KiB/token"],
                                           [[k, f"{v:.1f}"] for k, v in acct["by_module"]]))
    else:
        lines.append(f"accounting failed: {acct['error']}\n```\n{acct['log_tail'][-800:]}\n```")
    rows = []
    for v in [] if a.variants == "none" else a.variants.split(","):
        r = common.run_worker(script, {"variant": v, "steps": a.steps}, threads=a.threads or None)
        results[v] = r
        if "error" in r:
            rows.append([v, "error", r["error"], "", "", ""])
            print(v, r["error"], r["log_tail"][-1500:], flush=True)
            continue
        budget, gc = VARIANTS[v]
        rows.append([v, f"{budget or 'whole'} / {'on' if gc else 'off'}", r["pieces"],
                     " / ".join(f"{s:.1f}" for s in r["step_s"]), " / ".join(f"{m:,}" for m in r["rss_mb"]),
                     f"{r['loaded_rss_mb']:,}"])
        print(v, r, flush=True)
    lines.append("\n" + common.markdown_table(
        ["variant", "micro_batch_tokens / checkpointing", "pieces", "s per step (1st / 2nd ...)",
         "peak RSS MiB after each step", "RSS after load"], rows))
    text = "\n".join(lines)
    print(text)
    common.save_results(a.name, {"meta": {"machine": common.machine(), "argv": sys.argv}, "runs": results}, text)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
