"""How a training step's cost grows: with sequence length, with model size (and data preparation
with data size: bench/data_prep.py --n).

    python bench/curves.py length                  # SmolLM2-135M, 1 row of 256 ... 8192 tokens
    python bench/curves.py size                    # random Llama configs of ~135M, ~360M, ~1B, 512 tokens
    python bench/curves.py data --n 1000,10000,100000
    python bench/curves.py plot                    # bench/results/curves.png from the three results

Every point is one process (its own peak RSS, ru_maxrss after the last step). Two implementations
of the same LoRA step (r16 on q/k/v/o, fp32, one row, the first quarter of its tokens untrained):
  slimtune  train.loop.accumulate_grads: the loss at trained positions only, in chunks of 1024
            rows of the head (losses/sft.py), so no (T, V) logits tensor exists;
  hf        the transformers model's own loss (`model(input_ids, labels=...)`): full (T, V) logits,
            upcast to fp32, as TRL's SFTTrainer computes it. TRL's trainer adds its loop on top.
each with gradient checkpointing off and on. Reported: s/step (median of the steps after the
first), tokens/s (all tokens of the row), peak RSS during the steps (VmHWM reset after loading,
so the model's resident weights count, loading's transient copies do not), RSS after loading, and
the growth between the two largest points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LENGTHS = [256, 512, 1024, 2048, 4096, 8192]
SIZES = {  # random Llama configurations on SmolLM2's 49,152-word vocabulary (tied embeddings)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),                                  # SmolLM2-135M's shape
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),                                  # SmolLM2-360M's shape
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),                                    # Llama-3.2-1B's body
}
IMPLS = {"slimtune": False, "slimtune+gc": True, "hf": False, "hf+gc": True}


# ---------------------------------------------------------------------------------------------
# worker
def build(spec: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.config import MethodCfg
    from slimtune.methods import apply_method
    from slimtune.models import load_model, resolve_model

    torch.manual_seed(common.SEED)
    if spec["model"] == "smollm2":
        model = load_model(resolve_model("smollm2-135m"))
    else:
        cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2, **SIZES[spec["model"]])
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model = apply_method(model, MethodCfg(name="lora", r=common.LORA["r"], alpha=common.LORA["alpha"],
                                          targets="attn"), None, spec["gc"])
    model.train()
    return model, n_params


def run(spec: dict) -> dict:
    import torch

    from slimtune.config import build_config
    from slimtune.data.batching import count_trained
    from slimtune.train.loop import accumulate_grads
    from slimtune.train.objectives.sft import SFT

    from slimtune.utils import peak_rss_mb, reset_peak_rss

    model, n_params = build(spec)
    reset_peak_rss()  # VmHWM from here: the steps' own peak (the resident model included), not loading's
    loaded = peak_rss_mb()
    T = spec["T"]
    g = torch.Generator().manual_seed(common.SEED)
    ids = torch.randint(0, 49000, (T,), generator=g).tolist()
    row = {"input_ids": ids, "labels": [-100] * (T // 4) + ids[T // 4:]}
    n = count_trained([row])
    objective = SFT(build_config())
    out = {"params": n_params, "loaded_rss_mb": round(loaded), "step_s": [], "rss_mb": []}
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        if spec["impl"].startswith("slimtune"):
            accumulate_grads(model, [[row]], n, 0, objective)
        else:  # transformers' own loss: full logits over every position
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        out["step_s"].append(round(time.perf_counter() - t0, 3))
        out["rss_mb"].append(round(peak_rss_mb()))
    timed = out["step_s"][1:] or out["step_s"]
    out.update(s_per_step=statistics.median(timed), tokens_per_s=T / statistics.median(timed),
               peak_rss_mb=out["rss_mb"][-1], tokens=T, trained=n)
    return out


# ---------------------------------------------------------------------------------------------
# parent
def sweep(name: str, points: list[dict], threads: int | None) -> list[dict]:
    script = Path(__file__).resolve()
    results = []
    for p in points:
        r = common.run_worker(script, p, threads=threads, timeout=1800)
        r.update(p)
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("impl", "model", "T", "s_per_step", "tokens_per_s", "peak_rss_mb",
                                                "error")}), flush=True)
    return results


def growth(results: list[dict], key: str, x: str, impl: str) -> str:
    x = "params" if x == "model" else x  # a model's size, not its name
    pts = sorted((r[x], r[key]) for r in results if r.get("impl") == impl and key in r and "error" not in r)
    if len(pts) < 2:
        return "-"
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return f"x{y1 / y0:.2f} for x{x1 / x0:.1f}"


def table(results: list[dict], x: str, label: str) -> str:
    rows = []
    for r in sorted(results, key=lambda r: (r["impl"], r[x] if isinstance(r[x], int) else r.get("params", 0))):
        if "error" in r:
            rows.append([r["impl"], r[x], "error", r["error"], "", ""])
            continue
        rows.append([r["impl"], f"{r[x]:,}" if isinstance(r[x], int) else f"{r[x]} ({r['params'] / 1e6:.0f}M)",
                     f"{r['s_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_rss_mb']:,}",
                     f"{r['loaded_rss_mb']:,}"])
    text = common.markdown_table(["implementation", label, "s/step", "tokens/s", "peak RSS MiB",
                                  "RSS after load MiB"], rows)
    impls = sorted({r["impl"] for r in results})
    text += "\n\nGrowth between the last two points (peak RSS; s/step): " + "; ".join(
        f"{i}: {growth(results, 'peak_rss_mb', x, i)}; {growth(results, 's_per_step', x, i)}" for i in impls)
    return text


def plot() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, x, xlabel in (("curves_length", "T", "sequence length (tokens, one row)"),
                            ("curves_size", "params", "model parameters")):
        f = common.RESULTS / f"{name}.json"
        if f.exists():
            panels.append((json.loads(f.read_text())["runs"], x, xlabel))
    data = common.RESULTS / "curves_data.json"
    fig, axes = plt.subplots(2, len(panels) + data.exists(), figsize=(5.5 * (len(panels) + data.exists()), 8),
                             squeeze=False)
    for col, (runs, x, xlabel) in enumerate(panels):
        for impl in sorted({r["impl"] for r in runs}):
            pts = sorted((r[x], r["tokens_per_s"], r["peak_rss_mb"]) for r in runs if r["impl"] == impl and "error" not in r)
            if not pts:
                continue
            xs, tps, mem = zip(*pts)
            axes[0][col].plot(xs, tps, "o-", label=impl)
            axes[1][col].plot(xs, mem, "o-", label=impl)
        for row, ylabel in ((0, "tokens/s"), (1, "peak RSS (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2 if x == "T" else 10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    if data.exists():
        runs = json.loads(data.read_text())["runs"]
        col = len(panels)
        for kind in ("cold", "cached"):
            pts = sorted((r["n"], r["total_s"], r["peak_rss_mb"]) for r in runs if r["scenario"].startswith(kind))
            if pts:
                xs, secs, mem = zip(*pts)
                axes[0][col].plot(xs, secs, "o-", label=kind)
                axes[1][col].plot(xs, mem, "o-", label=kind)
        for row, ylabel in ((0, "seconds to prepare"), (1, "peak memory (MB, PSS)")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log" if row == 0 else "linear")
            ax.set_xlabel("chats")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(common.RESULTS / "curves.png", dpi=100)
    print(f"wrote {common.RESULTS / 'curves.png'}")


def data_curve(ns: list[int], nproc: int) -> None:
    """bench/data_prep.py at each size (its own results file per size), gathered into curves_data."""
    runs = []
    for n in ns:
        name = f"data_prep_{n}"
        subprocess.run([sys.executable, str(common.BENCH / "data_prep.py"), "--n", str(n), "--procs", str(nproc),
                        "--name", name], check=True)
        for r in json.loads((common.RESULTS / f"{name}.json").read_text())["results"]:
            runs.append(dict(r, n=n))
    lines = ["| chats | scenario | total s | chats/s | peak MB (PSS) |", "|---|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['scenario']} | {r['total_s']:.1f} | {r['chats_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |"
              for r in runs]
    common.save_results("curves_data", {"meta": {"machine": common.machine(), "argv": sys.argv}, "runs": runs},
                        "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curve", choices=["length", "size", "data", "plot"])
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--T", type=int, default=512, help="tokens of the size curve's row")
    ap.add_argument("--steps", type=int, default=3, help="steps per point (the first is not timed)")
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default (one per core)")
    ap.add_argument("--n", default="1000,10000,100000", help="data curve: chats per file")
    ap.add_argument("--procs", type=int, default=1, help="data curve: data.num_proc")
    a = ap.parse_args()
    if a.curve == "plot":
        return plot()
    if a.curve == "data":
        return data_curve([int(x) for x in a.n.split(",")], a.procs)
    impls = a.impls.split(",")
    if a.curve == "length":
        points = [{"impl": i, "gc": IMPLS[i], "model": "smollm2", "T": T, "steps": a.steps}
                  for T in map(int, a.lengths.split(",")) for i in impls]
        x, label = "T", "tokens (one row)"
    else:
        points = [{"impl": i, "gc": IMPLS[i], "model": s, "T": a.T, "steps": a.steps}
                  for s in a.sizes.split(",") for i in impls]
        x, label = "model", f"model ({a.T} tokens, one row)"
    results = sweep(a.curve, points, a.threads or None)
    common.save_results(f"curves_{a.curve}", {"meta": {"machine": common.machine(), "argv": sys.argv},
                                              "runs": results}, "(table below)")  # kept even if the table fails
    text = (f"# curves: {a.curve}\n\n`python bench/curves.py {' '.join(sys.argv[1:])}`\n\n"
            + table(results, x, label))
    print(text)
    common.save_results(f"curves_{a.curve}", {"meta": {"machine": common.machine(), "argv": sys.argv},
                                              "runs": results}, text)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        common.worker_main(run)
    else:
        main()
