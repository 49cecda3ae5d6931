"""Issue 4's benchmark: memory and time of a KL-SFT step against a plain SFT step.

    python bench/kl_memory.py                   # embedded SmolLM2, 8 x 512 tokens, 2 rounds
    python bench/kl_memory.py --rounds 3 --steps 4

Configurations, each in its own process, interleaved and repeated:
  plain        slimtune `forward.batch_loss`, kl_lambda = 0 (chunked CE at trained positions)
  kl           the same with kl_lambda = 0.05: the reference is the model with its adapters off
               (no_grad), KL chunked at the trained positions (slimtune's default)
  kl_all       the same with KL at every real position (kl_positions=all): more rows
  kl_naive     a deepcopy'd base model as the reference and full logits: every position of the
               batch projected to the vocabulary for both models, `losses.reference_loss`
One step: forward, loss, backward, AdamW step on the LoRA r16 attention adapters, fp32.
Memory: the worker's peak RSS (ru_maxrss), and the step's part of it: peak minus the RSS after
loading model + adapters + optimizer + batch (a naive run's reference copy counts in its part).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = {"plain": {"kl_lambda": 0.0}, "kl": {"kl_lambda": 0.05}, "kl_all": {"kl_lambda": 0.05, "kl_positions": "all"},
           "kl_naive": {"kl_lambda": 0.05, "naive": True}}
ORDER = ["plain", "kl", "kl_naive", "kl_all"]


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def long_batch(n: int = common.BATCH) -> list[dict]:
    """n chitchat chats rendered and cut to exactly 512 tokens (no padding), with trained tokens."""
    from slimtune.data.formats import load_chitchat
    from slimtune.data.tools import render_all
    from slimtune.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    rows, _ = render_all(load_chitchat(200), tok, max_length=common.MAX_LENGTH)
    return [r for r in rows if len(r["input_ids"]) == common.MAX_LENGTH][:n]


def run(spec: dict) -> dict:
    import torch

    from slimtune.config import LossCfg, MethodCfg
    from slimtune.data.batching import collate, count_trained
    from slimtune.train.forward import KLTerm, batch_loss, hidden_states, kl_positions, output_layer
    from slimtune.losses.sft import reference_loss
    from slimtune.methods import apply_method
    from slimtune.models import load_model, load_tokenizer

    opts = dict(CONFIGS[spec["config"]])
    naive = opts.pop("naive", False)
    cfg = LossCfg(**opts)
    torch.manual_seed(0)
    tok = load_tokenizer(spec["model_dir"])
    base = load_model(spec["model_dir"])
    before_ref = current_rss_mb()
    ref = copy.deepcopy(base).eval().requires_grad_(False) if naive else None
    ref_mb = current_rss_mb() - before_ref
    model = apply_method(base, MethodCfg(name="lora", r=common.LORA["r"], alpha=common.LORA["alpha"]))
    common.reinit_lora(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=common.LR, foreach=True)
    rows = spec["rows"]
    batch = collate(rows, tok.pad_token_id)
    n = count_trained(rows)
    baseline = current_rss_mb() - ref_mb  # what every configuration holds before its first step

    def naive_loss():
        h = hidden_states(model, batch)[:, :-1]                     # (B, T-1, H)
        with torch.no_grad():
            ref_h = hidden_states(ref, batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = kl_positions(batch, targets, KLTerm.from_cfg(cfg, cfg.kl_lambda))
        head = output_layer(model)
        w, b, cap = head.weight, head.bias, head.softcap
        H = h.shape[-1]                                             # every position, full logits
        return reference_loss(h.reshape(-1, H), w, targets.reshape(-1), bias=b, normaliser=n,
                              ref_hidden=ref_h.reshape(-1, H), kl_mask=mask.reshape(-1),
                              kl_lambda=cfg.kl_lambda, logit_softcap=cap)

    times, losses = [], []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        out = naive_loss() if naive else batch_loss(model, batch, KLTerm.from_cfg(cfg, cfg.kl_lambda) if cfg.kl_lambda > 0 else None, n)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append([float(out.ce_sum) / n, float(out.kl_sum) / n])
    peak = common.peak_rss_mb()
    return {"step_s": times, "peak_rss_mb": round(peak, 1), "baseline_mb": round(baseline, 1),
            "step_mb": round(peak - baseline, 1), "ref_copy_mb": round(ref_mb, 1), "losses": losses,
            "tokens": sum(len(r["input_ids"]) for r in rows), "trained": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the first is a warm-up")
    ap.add_argument("--threads", type=int, default=1, help="worker threads (0: torch's default); see throughput.py")
    ap.add_argument("--configs", default=",".join(ORDER))
    a = ap.parse_args()
    rows = long_batch()
    order = a.configs.split(",")
    runs = []
    for rnd in range(a.rounds):
        for c in order if rnd % 2 == 0 else order[::-1]:
            spec = {"config": c, "model_dir": common.model_path("smollm2"), "rows": rows, "steps": a.steps}
            r = common.run_worker(Path(__file__).resolve(), spec, threads=a.threads or None)
            r.update(config=c, round=rnd)
            runs.append(r)
            if "error" in r:
                print(f"{c}: {r['error']}\n{r['log_tail']}", flush=True)
                continue
            t = sorted(r["step_s"][1:])[len(r["step_s"][1:]) // 2]
            print(f"{c:9s} round {rnd}: {t:6.2f} s/step  peak RSS {r['peak_rss_mb']:7.0f} MiB  step part "
                  f"{r['step_mb']:6.0f} MiB  ce {r['losses'][-1][0]:.4f} kl {r['losses'][-1][1]:.5f}", flush=True)
    text = report(runs, order, a)
    print(text)
    common.save_results("kl_memory", {"machine": common.machine(), "args": vars(a), "runs": runs}, text)


def report(runs: list[dict], order: list[str], a) -> str:
    by = {c: [r for r in runs if r["config"] == c and "error" not in r] for c in order}
    step = {c: [sorted(r["step_s"][1:])[len(r["step_s"][1:]) // 2] for r in rs] for c, rs in by.items()}
    med = lambda xs: common.median_spread(xs)[0]  # noqa: E731
    rows = []
    for c in order:
        if not by[c]:
            continue
        rs = by[c]
        rows.append([c, len(rs), common.fmt_ms(step[c], 2), f"{med(step[c]) / med(step['plain']):.2f}x",
                     common.fmt_ms([r["peak_rss_mb"] for r in rs]),
                     f"{med([r['peak_rss_mb'] for r in rs]) / med([r['peak_rss_mb'] for r in by['plain']]):.2f}x",
                     common.fmt_ms([r["step_mb"] for r in rs]),
                     f"{med([r['step_mb'] for r in rs]) / med([r['step_mb'] for r in by['plain']]):.2f}x"])
    r0 = by["plain"][0]
    lines = [f"# kl_memory\n\n`python bench/kl_memory.py --rounds {a.rounds} --steps {a.steps} --threads {a.threads}`\n",
             f"SmolLM2-135M-Instruct, LoRA r16 on q/k/v/o, fp32, batch {common.BATCH} x {common.MAX_LENGTH} tokens "
             f"({r0['tokens']:,} tokens, {r0['trained']:,} trained), kl_lambda 0.05, threads {a.threads or 'default'}; "
             f"s/step: median of steps 2-{a.steps} per run, then median (min-max) over runs\n",
             common.markdown_table(["config", "runs", "s/step", "time vs plain", "peak RSS MiB", "RSS vs plain",
                                    "step part MiB", "step part vs plain"], rows), ""]
    for name in ("kl",):
        if by.get(name) and by.get("plain"):
            tr = med(step[name]) / med(step["plain"])
            mr = med([r["peak_rss_mb"] for r in by[name]]) / med([r["peak_rss_mb"] for r in by["plain"]])
            sr = med([r["step_mb"] for r in by[name]]) / med([r["step_mb"] for r in by["plain"]])
            lines.append(f"- {'PASS' if mr <= 1.25 else 'FAIL'}  KL step peak RSS <= 1.25x plain: {mr:.2f}x "
                         f"(step part alone: {sr:.2f}x)")
            lines.append(f"- {'PASS' if tr <= 1.5 else 'FAIL'}  KL step time <= 1.5x plain: {tr:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
