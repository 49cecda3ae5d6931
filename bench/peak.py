"""How close slimtune's LoRA step comes to this machine's matmul peak, and where a step's time goes.

    python bench/peak.py                      # both models
    python bench/peak.py --models random --steps 4

1. Peak: square fp32 / bf16 matmuls of a few sizes, best of several, plus the model's own shapes.
2. Achieved: slimtune's step (its own collate, `forward.batch_loss`, backward, clip, AdamW) on the
   benchmark's batches at its default settings, timed per step; useful FLOPs counted exactly from
   the batches (see `step_flops`), divided by the step time and by the peak.
3. Profile: one step under torch.profiler (CPU), time per stage and per op family.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def matmul_gflops(m: int, k: int, n: int, dtype, reps: int) -> float:
    """Best-of-`reps` GFLOP/s of (m, k) @ (k, n)."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def measure_peak(threads: int) -> dict:
    """Square fp32 matmuls with 1 thread and with one per core (on shared cores one thread can
    win: a second thread that waits for a busy core stalls every parallel op); bf16 and the
    model's own shapes with `threads`, the benchmarks' setting."""
    import torch

    cores = os.cpu_count() or 1
    out = {"fp32": {}, "bf16": {}, "shapes_fp32": {}, "fp32_1thread": {}, "cores": cores}
    for n in (512, 1024, 2048, 4096):
        for th, key in ((1, "fp32_1thread"), (cores, "fp32")):
            torch.set_num_threads(th)
            out[key][n] = round(max(matmul_gflops(n, n, n, torch.float32, 5) for _ in range(2)), 1)
    torch.set_num_threads(threads or cores)
    for n in (256, 512):  # no native bf16 on this CPU: seconds per call beyond this
        out["bf16"][n] = round(matmul_gflops(n, n, n, torch.bfloat16, 2), 2)
    shapes = {"x@W q/o (4096x576x576)": (4096, 576, 576), "x@W mlp (4096x576x1536)": (4096, 576, 1536),
              "head (1024x576x49152)": (1024, 576, 49152), "head grad (1024x49152x576)": (1024, 49152, 576),
              "lora A (4096x576x16)": (4096, 576, 16)}
    for name, (m, k, n) in shapes.items():
        out["shapes_fp32"][name] = round(matmul_gflops(m, k, n, torch.float32, 5), 1)
    out["peak_fp32"] = max(out["fp32"].values())
    out["peak_fp32_1thread"] = max(out["fp32_1thread"].values())
    out["peak_bf16"] = max(out["bf16"].values())
    return out


def param_counts(model) -> dict:
    """N_body: decoder Linear weights (what a token's forward multiplies: 2 FLOPs each);
    head: V x H; LoRA: r x (in + out) summed over adapted modules."""
    from torch import nn

    body = lora = 0
    for name, mod in model.named_modules():
        if "lora_" in name:
            continue
        if isinstance(mod, nn.Linear) and ".layers." in name:
            w = mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight
            body += w.numel()
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            lora += a.numel() + b.numel()
    cfg = model.config
    return {"body": body, "lora": lora, "head": cfg.vocab_size * cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "attn_width": cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)}


def step_flops(rows: list[dict], p: dict) -> dict:
    """Useful FLOPs of one LoRA step over `rows` (one micro-batch), counted from the real tokens.

    per real (non-pad) token: forward 2 N_body + 2 N_lora; backward 2 N_body (activation grads
      only: the base is frozen) + 4 N_lora (activation + adapter weight grads)
    per trained token (label after the shift): head forward 2 V H + backward 2 V H (hidden grads;
      the tied embedding is frozen)
    attention, per sequence of length T (or per packed example): QK^T and AV forward
      4 L d_attn T(T+1)/2 (causal), backward twice that
    """
    tokens = trained = attn = 0
    for r in rows:
        tokens += len(r["input_ids"])
        trained += sum(lab != -100 for lab in r["labels"][1:])
        pos = r.get("position_ids")
        lengths = [len(r["input_ids"])] if pos is None else _segments(pos)
        attn += sum(t * (t + 1) // 2 for t in lengths)
    body = tokens * (4 * p["body"] + 6 * p["lora"])
    head = trained * 4 * p["head"]
    att = 3 * 4 * p["layers"] * p["attn_width"] * attn
    return {"tokens": tokens, "trained": trained, "body": body, "head": head, "attn": att,
            "total": body + head + att, "per_trained_4N": trained * 4 * (p["body"] + p["head"])}


def _segments(pos: list[int]) -> list[int]:
    starts = [i for i, x in enumerate(pos) if x == 0] + [len(pos)]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


# op families for the profile summary
FAMILIES = [("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
            ("attention (sdpa)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
            ("softmax / exp / log", ("softmax", "aten::exp", "aten::log", "logsumexp")),
            ("optimizer (_foreach)", ("_foreach", "_fused_adam")),
            ("copies / casts / index", ("aten::copy_", "aten::to", "aten::index", "aten::cat", "aten::clone",
                                        "aten::contiguous", "aten::gather", "aten::scatter", "aten::masked")),
            ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow",
                             "aten::rsqrt", "aten::mean", "aten::neg", "aten::sum", "aten::fill", "aten::zero",
                             "aten::where", "aten::sigmoid", "aten::cos", "aten::sin"))]
STAGES = ["1 data/collate", "2 forward (model to hidden states)", "3 loss (chunked CE: head fwd+grad)",
          "4 backward", "5 clip + optimizer"]


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other ops"


def run(spec: dict) -> dict:
    """Worker: slimtune's LoRA step at its defaults on the benchmark batches; times + one profiled step."""
    from contextlib import nullcontext

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from slimtune.config import build_config
    from slimtune.data.batching import collate, count_trained, split_by_tokens
    from slimtune.data.prepare import prepare
    from slimtune.train.forward import hidden_states  # batch_loss = hidden_states + _loss_from_hidden
    from slimtune.methods import apply_method
    from slimtune.models import load_model, load_tokenizer
    from slimtune.train.optim import make_optimizer, make_scheduler
    from slimtune.train.loop import epoch_rows
    from throughput import slim_raw

    cfg = build_config(slim_raw(spec, "/tmp/unused"), spec.get("overrides", []))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(0)
    tok = load_tokenizer(spec["model_dir"])
    model = apply_method(load_model(spec["model_dir"]), cfg.method)
    common.reinit_lora(model)
    model.train()
    p = param_counts(model)
    data = prepare(cfg.data, tok, 0)
    rows, batches = epoch_rows(data.train, cfg, 0)
    opt = make_optimizer(model.parameters(), cfg.train, spec["steps"], 0)
    sched = make_scheduler(opt, cfg.train, spec["steps"], 0)
    pad = tok.pad_token_id

    budget = cfg.resolved("cpu").train.micro_batch_tokens

    def step(idx, rf=None):
        rf = rf or (lambda name: nullcontext())
        mb = [rows[i] for i in idx]
        n = count_trained(mb)
        for piece in split_by_tokens(mb, budget):  # the default token budget per forward/backward
            with rf(STAGES[0]):
                batch = collate(piece, pad)
            with rf(STAGES[1]):
                h = hidden_states(model, batch)
            with rf(STAGES[2]):
                out = _loss_from_hidden(model, batch, h, cfg.loss, n)
            with rf(STAGES[3]):
                out.loss.backward()
        with rf(STAGES[4]):
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return out

    times, flops = [], []
    for s in range(spec["steps"]):
        idx = batches[s % len(batches)]
        t = time.perf_counter()
        step(idx)
        times.append(time.perf_counter() - t)
        flops.append(step_flops([rows[i] for i in idx], p))
    idx = batches[spec["steps"] % len(batches)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step(idx, record_function)
        prof_wall = time.perf_counter() - t
    return {"params": p, "step_s": times, "flops": flops, "profile": summarise_profile(prof, prof_wall),
            "profiled_flops": step_flops([rows[i] for i in idx], p)}


def _loss_from_hidden(model, batch, hidden, loss_cfg, normaliser):
    from slimtune.train.forward import output_layer
    from slimtune.losses.sft import chunked_loss

    h = hidden[:, :-1]
    targets = batch["labels"][:, 1:]
    sel = targets != -100
    head = output_layer(model)
    return chunked_loss(h[sel], head.weight, targets[sel], normaliser=normaliser, chunk_size=loss_cfg.chunk_size,
                        **head.kwargs())


def summarise_profile(prof, wall: float) -> dict:
    """Seconds per stage (record_function ranges) and per op family (self time of aten ops)."""
    events = prof.events()
    stages = [e for e in events if e.name in STAGES]  # a stage runs once per piece of the batch
    by_stage = defaultdict(float)
    for ev in stages:
        by_stage[ev.name] += ev.cpu_time_total / 1e6
    by_stage = {k: round(v, 3) for k, v in by_stage.items()}
    ranges = [(ev.time_range.start, ev.time_range.end, ev.name) for ev in stages]
    fam = defaultdict(float)
    stage_fam = defaultdict(float)
    ops = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.name in STAGES or not e.name.startswith("aten::"):
            continue
        st = next((n for a, b, n in ranges if a <= e.time_range.start <= b), "outside")
        f = family(e.name)
        fam[f] += e.self_cpu_time_total / 1e6
        stage_fam[f"{st} | {f}"] += e.self_cpu_time_total / 1e6
        ops[e.name][0] += e.self_cpu_time_total / 1e6
        ops[e.name][1] += 1
    in_ops = sum(fam.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]
    return {"wall_s": round(wall, 3), "stages_s": by_stage, "families_s": {k: round(v, 3) for k, v in fam.items()},
            "stage_family_s": {k: round(v, 3) for k, v in sorted(stage_fam.items())},
            "outside_ops_s": round(wall - in_ops, 3),
            "top_ops": [(n, round(t, 3), c) for n, (t, c) in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random,smollm2")
    ap.add_argument("--steps", type=int, default=4, help="timed steps before the profiled one")
    ap.add_argument("--overrides", default="", help="slimtune key=value overrides, comma separated")
    ap.add_argument("--threads", type=int, default=1, help="worker threads (0: torch's default); see throughput.py")
    ap.add_argument("--name", default="peak", help="results file name")
    a = ap.parse_args()
    peak = measure_peak(a.threads)
    print(f"matmul peak: fp32 {peak['fp32']} GFLOP/s, 1 thread {peak['fp32_1thread']}; bf16 {peak['bf16']} GFLOP/s; model shapes fp32 "
          f"{peak['shapes_fp32']}", flush=True)
    data = common.make_data(Path("/tmp/slimtune-bench-data"), 12 * common.BATCH)
    out = {"machine": common.machine(), "peak": peak, "models": {}}
    lines = [f"# peak\n\n`{' '.join(sys.argv)}`\n", f"machine: {out['machine']}\n",
             "## matmul peak (GFLOP/s, best of several)\n",
             common.markdown_table(["dtype"] + [str(k) for k in peak["fp32"]],
                                   [[f"fp32, {peak['cores']} threads"] + list(peak["fp32"].values()),
                                    ["fp32, 1 thread"] + list(peak["fp32_1thread"].values())]),
             "\n" + common.markdown_table(["dtype"] + [str(k) for k in peak["bf16"]],
                                          [["bf16"] + list(peak["bf16"].values())]),
             "\n" + common.markdown_table([f"model shape (fp32, {a.threads or peak['cores']} thread(s))", "GFLOP/s"], [[k, v] for k, v in peak["shapes_fp32"].items()])]
    for m in a.models.split(","):
        spec = {"model": m, "model_dir": common.model_path(m), "data": data, "steps": a.steps,
                "overrides": [x for x in a.overrides.split(",") if x]}
        r = common.run_worker(Path(__file__).resolve(), spec, threads=a.threads or None)
        if "error" in r:
            print(r["log_tail"])
            continue
        out["models"][m] = r
        used = peak["peak_fp32_1thread"] if a.threads == 1 else peak["peak_fp32"]
        lines.append(report_model(m, r, used, max(peak["peak_fp32"], peak["peak_fp32_1thread"]), a.threads))
        print(lines[-1], flush=True)
    common.save_results(a.name, out, "\n".join(lines))


def report_model(m: str, r: dict, peak: float, machine_peak: float, threads: int) -> str:
    p = r["params"]
    times = r["step_s"][1:] or r["step_s"]  # the first step warms up allocators
    fl = r["flops"][1:] or r["flops"]
    t = sum(times)
    tot = sum(f["total"] for f in fl)
    conv = sum(f["per_trained_4N"] for f in fl)
    trained = sum(f["trained"] for f in fl)
    tokens = sum(f["tokens"] for f in fl)
    pr = r["profile"]
    lines = [f"\n## {common.MODELS[m][0]}\n",
             f"N_body {p['body'] / 1e6:.1f}M (decoder Linear weights), head V x H {p['head'] / 1e6:.1f}M, "
             f"LoRA {p['lora'] / 1e6:.2f}M; {len(times)} steps: {tokens:,} real tokens, {trained:,} trained, "
             f"{t:.1f} s ({trained / t:.0f} trained tok/s)\n",
             f"- useful FLOPs (body 4 N_body + 6 N_lora per real token, head 4 V H per trained token, causal "
             f"attention 12 L d T(T+1)/2 per sequence): {tot / 1e12:.2f} TFLOP -> {tot / t / 1e9:.1f} GFLOP/s = "
             f"**{100 * tot / t / 1e9 / peak:.0f}% of the fp32 matmul peak ({peak:.0f} GFLOP/s)**",
             f"  (body {sum(f['body'] for f in fl) / tot:.0%}, head {sum(f['head'] for f in fl) / tot:.0%}, "
             f"attention {sum(f['attn'] for f in fl) / tot:.0%}); the step ran on {threads or 'all'} thread(s): "
             f"{100 * tot / t / 1e9 / machine_peak:.0f}% of the best matmul rate seen on this machine with any "
             f"thread count ({machine_peak:.0f} GFLOP/s)",
             f"- convention 4 (N_body + V H) per trained token (frozen base: no weight grads): {conv / t / 1e9:.1f} "
             f"GFLOP/s = {100 * conv / t / 1e9 / peak:.0f}% of peak (ignores the prompt tokens' work)\n",
             f"Profiled step: {pr['wall_s']:.2f} s wall, {r['profiled_flops']['tokens']:,} tokens, "
             f"{r['profiled_flops']['trained']:,} trained\n",
             common.markdown_table(["stage", "s", "share"],
                                   [[k, f"{v:.2f}", f"{v / pr['wall_s']:.0%}"] for k, v in sorted(pr["stages_s"].items())]),
             "\n" + common.markdown_table(["op family (self time)", "s", "share"],
                                          [[k, f"{v:.2f}", f"{v / pr['wall_s']:.0%}"] for k, v in
                                           sorted(pr["families_s"].items(), key=lambda kv: -kv[1])]
                                          + [["not in aten ops (Python, dispatch, autograd engine)",
                                              f"{pr['outside_ops_s']:.2f}", f"{pr['outside_ops_s'] / pr['wall_s']:.0%}"]]),
             "\n" + common.markdown_table(["stage | op family", "s"],
                                          [[k, f"{v:.2f}"] for k, v in pr["stage_family_s"].items() if v >= 0.01]),
             "\n" + common.markdown_table(["top ops (self)", "s", "calls"], [[n, f"{s:.3f}", c] for n, s, c in pr["top_ops"]])]
    return "\n".join(lines)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
