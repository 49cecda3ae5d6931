"""QLoRA (NF4 + double quantisation base, fp32 compute) against LoRA (fp32 base) on CPU:
memory of the weights, peak memory of training steps, and trained tokens/s.

    python bench/qlora.py                        # SmolLM2-135M (embedded), 3 steps each
    python bench/qlora.py --steps 2 --threads 2

Each method runs in its own process. The base loads through slimtune's `load_model` (4-bit via
bitsandbytes for QLoRA), LoRA r16 goes on q/k/v/o, and `steps` optimizer steps run through the
loop's `accumulate_grads` on the same fixed batch of 4 rows x 256 tokens (train.micro_batch_tokens
1024, the CPU default) with AdamW. Memory: bytes held by parameters and buffers (exact), RSS after
loading, and the peak RSS (VmHWM) during the steps, its high-water mark reset after loading
(/proc/self/clear_refs) so the load's transient does not count. The first step is a warm-up: tokens/s
is over the later steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

B, T, PROMPT = 4, 256, 64  # rows, tokens per row, untrained prompt tokens per row
METHODS = ("lora", "qlora")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def variant(spec: dict) -> dict:
    import torch

    from slimtune.config import MethodCfg, build_config
    from slimtune.data.batching import count_trained, split_by_tokens
    from slimtune.methods import apply_method, method_of
    from slimtune.models import load_model, resolve_model
    from slimtune.train.loop import accumulate_grads
    from slimtune.train.objectives.sft import SFT

    path = resolve_model("smollm2-135m")
    t0 = time.perf_counter()
    model = load_model(path, quantize_4bit=method_of(spec["method"]).four_bit, device="cpu")
    model = apply_method(model, MethodCfg(name=spec["method"], r=common.LORA["r"], alpha=common.LORA["alpha"],
                                          targets="attn"), path)
    model.train()
    load_s = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    g = torch.Generator().manual_seed(common.SEED)
    rows = []
    for _ in range(B):
        ids = torch.randint(0, 49000, (T,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * PROMPT + ids[PROMPT:]})
    pieces, n = split_by_tokens(rows, 1024), count_trained(rows)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    loaded_rss = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    out = {"method": spec["method"], "weights_mb": round(weights / 2**20, 1), "loaded_rss_mb": round(loaded_rss),
           "load_s": round(load_s, 1), "step_s": [], "ce": []}
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        ce = accumulate_grads(model, pieces, n, 0, SFT(build_config()))["ce"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["step_s"].append(round(time.perf_counter() - t, 2))
        out["ce"].append(round(ce / n, 4))
    out["peak_rss_mb"] = round(_status_mb("VmHWM"))
    timed = out["step_s"][1:] or out["step_s"]
    out["trained_tokens_per_s"] = round(n / (sum(timed) / len(timed)), 1)
    out["trained_tokens"] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--name", default="qlora", help="results file name")
    a = ap.parse_args()
    script = Path(__file__).resolve()
    results, rows = {}, []
    for m in METHODS:
        r = common.run_worker(script, {"method": m, "steps": a.steps}, threads=a.threads or None)
        results[m] = r
        print(m, r if "error" not in r else r["log_tail"][-2000:], flush=True)
        if "error" in r:
            rows.append([m, "error", r["error"], "", "", "", ""])
            continue
        rows.append([m, f"{r['weights_mb']:,.1f}", f"{r['loaded_rss_mb']:,}", f"{r['peak_rss_mb']:,}",
                     " / ".join(f"{s:.1f}" for s in r["step_s"]), f"{r['trained_tokens_per_s']:,.0f}",
                     " / ".join(f"{c:.3f}" for c in r["ce"])])
    lines = [f"# qlora\n\n`python bench/qlora.py {' '.join(sys.argv[1:])}`\n",
             f"SmolLM2-135M, LoRA r{common.LORA['r']} on q/k/v/o, {B} rows x {T} tokens "
             f"({B * (T - PROMPT)} trained) per step, micro_batch_tokens 1024, AdamW, "
             f"threads: {a.threads or 'torch default'}; a shared machine (other jobs on the cores): "
             "times are indicative, memory is not affected\n",
             common.markdown_table(["method", "weights+buffers MiB", "RSS after load MiB", "peak RSS in steps MiB",
                                    "s per step (1st / 2nd ...)", "trained tok/s (after the 1st)", "CE per step"],
                                   rows)]
    text = "\n".join(lines)
    print(text)
    common.save_results(a.name, {"meta": {"machine": common.machine(), "argv": sys.argv}, "runs": results}, text)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(variant)
    else:
        main()
