"""Generation against its limits: slimtune, transformers `generate` (dynamic and static cache) and
llama.cpp, same prompts and lengths, greedy, interleaved; each beside the limit it should approach.

    PYTHONPATH=src python bench/generation.py --rounds 2            # fp32, batches 1 8 32 64
    PYTHONPATH=src python bench/generation.py --stop eos --batches 32  # answers end at end-of-turn

Per round, for each batch size, the variants run one after another (their order rotates between
rounds) on the same B prompts (the shipped eval prompts, then the IFEval ones, rendered with the
model's template); the medians over rounds are reported.
  --stop none (default): every row generates exactly --new-tokens tokens (no variant stops at eos),
    so every variant does the same work and the limit is exact.
  --stop eos: rows end at end-of-turn, as in `slimtune eval`; tokens/s counts real tokens only
    (transformers keeps finished rows in its batch as padding).
llama.cpp (llama-cpp-python, the f32 GGUF `slimtune export` writes): one sequence per `Llama`, so
batch B = the B prompts one after another (--llama-batches, default 1 and 8).
More variants: slimtune_bf16 (bf16 decoding whatever --autocast says), slimtune_no_lean and
slimtune_bf16_no_lean (every decoding step through transformers' forward, as before lean_decode.py),
hf_dynamic_bf16 (transformers' `generate` under bf16 autocast, as TRL's bf16=True runs it),
slimtune_bf16_kept (slimtune_bf16 with its packed decoder built once, untimed, and kept across calls
as a chat session keeps it: `generate.keep_decoders`; the other slimtune variants build it per call).
A bf16 variant's limit counts half the weight and KV bytes and the bf16 matmul peak.

The limits, measured in the same process: read bandwidth (sum of a 1 GiB fp32 tensor) and fp32
matmul peak (2048^2, torch's threads). A decoding step reads every weight once plus each row's
KV cache, and computes 2 x matmul parameters FLOPs (+ attention) per row:
    step time >= max((weight bytes + KV bytes) / bandwidth, B x FLOPs per token / peak)
tok/s limit = B / that; "share" = decode tok/s (after the first token) / limit.
Writes bench/results/generation.json and generation.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return {"cpu": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "capability": torch.backends.cpu.get_cpu_capability()}


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        out["llama_cpp_python"] = None
    return out


# ---------------------------------------------------------------------------------------------
# limits


def bandwidth_gbs(mib: int = 1024, reps: int = 5) -> dict:
    """Read bandwidth (sum of a fp32 tensor far larger than the caches) and copy bandwidth
    (read + write), GB/s, best of `reps`."""
    a = torch.rand(mib * 2**20 // 4)
    b = torch.empty_like(a)
    read, copy = [], []
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        read.append(a.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        copy.append(2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return {"read_gbs": round(max(read), 1), "copy_gbs": round(max(copy), 1)}


def matmul_peak_gflops(n: int = 2048, reps: int = 5, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return round(best, 1)


def model_costs(model) -> dict:
    """Bytes and FLOPs of one decoding step, from the model's shapes (fp32)."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    emb = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    matmul = params - emb + (emb if tied else 0)  # every Linear, lm_head included; lookups are free
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = c.num_hidden_layers * 2 * getattr(c, "num_key_value_heads", c.num_attention_heads) * hd * 4
    attn_flops_per_ctx = c.num_hidden_layers * c.num_attention_heads * hd * 4  # QK^T and PV, per context token
    return {"params": params, "weight_bytes": params * 4, "matmul_params": matmul, "kv_bytes_per_token": kv_per_token,
            "attn_flops_per_ctx_token": attn_flops_per_ctx}


def limit(costs: dict, B: int, prompt_lens: list[int], n_new: int, bw_gbs: float, peak_gflops: float) -> dict:
    """tok/s limit of the decode steps (tokens 2..n_new) for B rows: the roofline of each step,
    averaged over the steps (each row's context grows from its prompt length)."""
    total = 0.0
    bound = {"bandwidth": 0, "compute": 0}
    for step in range(1, n_new):
        ctx = sum(p + step for p in prompt_lens)  # context tokens read, summed over the rows
        mem = (costs["weight_bytes"] + ctx * costs["kv_bytes_per_token"]) / (bw_gbs * 1e9)
        flops = B * 2 * costs["matmul_params"] + ctx * costs["attn_flops_per_ctx_token"]
        cmp = flops / (peak_gflops * 1e9)
        total += max(mem, cmp)
        bound["bandwidth" if mem >= cmp else "compute"] += 1
    steps = n_new - 1
    return {"tok_s": round(B * steps / total, 1), "bound": max(bound, key=bound.get),
            "mem_tok_s": round(B * steps / sum((costs["weight_bytes"] + sum(p + s for p in prompt_lens)
                                                * costs["kv_bytes_per_token"]) / (bw_gbs * 1e9)
                                               for s in range(1, n_new)), 1),
            "compute_tok_s": round(peak_gflops * 1e9 / (2 * costs["matmul_params"]), 1)}


# ---------------------------------------------------------------------------------------------
# the variants: (model, tok, prompts, n_new, stop) -> {ids, seconds, ttft_s}


def run_slimtune(model, tok, prompts, n_new, stops, pad, autocast="no", lean=True):
    import slimtune.generate as G
    from slimtune.generate import GenSettings, _decode

    G.LEAN = lean  # False: every decoding step through transformers' forward (before lean_decode.py)

    first = []
    t = time.perf_counter()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast == "bf16" else torch.autocast("cpu", enabled=False)
    with amp:
        ids = _decode(model, prompts, GenSettings(max_new_tokens=n_new, autocast=autocast), [0] * len(prompts),
                      stops, pad, on_token=lambda picks: first or first.append(time.perf_counter()))
    return {"ids": ids, "seconds": time.perf_counter() - t, "ttft_s": first[0] - t}


_KEPT: dict = {}


def run_slimtune_kept(model, tok, prompts, n_new, stops, pad):
    """slimtune_bf16 with its packed decoder built once and kept (`generate.keep_decoders`: what a
    chat session and each generate_many call do), as llama.cpp's weights are loaded once before it
    is timed: the first call builds it in an untimed 1-token answer (its seconds printed)."""
    import slimtune.generate as G

    G._KEPT = _KEPT  # this variant's kept decoders; the other slimtune variants still build per call
    try:
        if not _KEPT:
            t = time.perf_counter()
            run_slimtune(model, tok, prompts[:1], 1, stops, pad, autocast="bf16")
            print(json.dumps({"kept_decoder_build_s": round(time.perf_counter() - t, 3)}), flush=True)
        return run_slimtune(model, tok, prompts, n_new, stops, pad, autocast="bf16")
    finally:
        G._KEPT = None


def run_hf(model, tok, prompts, n_new, stops, pad, cache="dynamic", autocast="no"):
    from transformers import LogitsProcessor, LogitsProcessorList

    first = []

    class FirstToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if not first:
                first.append(time.perf_counter())
            return scores

    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    gc = model.generation_config
    saved = gc.eos_token_id
    gc.eos_token_id = stops or None  # --stop none: no eos at all, every row runs n_new tokens
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    try:
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                                 eos_token_id=stops or None, pad_token_id=pad, top_k=None, top_p=None,
                                 logits_processor=LogitsProcessorList([FirstToken()]), **kw)
        seconds = time.perf_counter() - t
    finally:
        gc.eos_token_id = saved
    rows = []
    for row in out[:, T:].tolist():
        cut = next((i + 1 for i, x in enumerate(row) if x in stops), len(row))  # up to the first stop
        rows.append(row[:cut])
    return {"ids": rows, "seconds": seconds, "ttft_s": first[0] - t}


class LlamaCpp:
    def __init__(self, gguf: str, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         logits_all=False, verbose=False)

    def last_logits(self, np):
        from llama_cpp import llama_get_logits_ith

        return np.ctypeslib.as_array(llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def __call__(self, model, tok, prompts, n_new, stops, pad):
        import numpy as np

        rows, ttft = [], None
        t = time.perf_counter()
        for p in prompts:  # one sequence at a time
            self.llm.reset()
            self.llm.eval(p)
            out = []
            for i in range(n_new):  # greedy: argmax of the last token's logits (not kept in .scores
                nxt = int(np.argmax(self.last_logits(np)))  # without logits_all, which costs the prefill)
                if ttft is None:
                    ttft = time.perf_counter() - t
                out.append(nxt)
                if nxt in stops or i + 1 == n_new:
                    break
                self.llm.eval([nxt])
            rows.append(out)
        return {"ids": rows, "seconds": time.perf_counter() - t, "ttft_s": ttft}


# ---------------------------------------------------------------------------------------------


def bench_prompts(tok, n: int) -> list[list[int]]:
    from slimtune.data.prompts import load_prompts
    from slimtune.data.render import render_prompt

    chats = load_prompts("builtin:eval_prompts")
    try:
        from slimtune.evaluate.ifeval import load_ifeval

        chats += [[{"role": "user", "content": r["prompt"]}] for r in load_ifeval("builtin:ifeval_prompts")]
    except Exception:  # noqa: BLE001 - the eval prompts alone, cycled
        pass
    return [render_prompt(chats[i % len(chats)], tok) for i in range(n)]


def f32_gguf(model_name: str) -> Path:
    from slimtune.models import cache_dir

    out = cache_dir() / "bench" / f"{model_name}-f32.gguf"
    if not out.exists():
        from slimtune.ship.gguf import export_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(model_name, str(out), "f32", verify=False)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stop", choices=["none", "eos"], default="none")
    ap.add_argument("--variants", default="slimtune,hf_dynamic,hf_static,llama_cpp")
    ap.add_argument("--llama-batches", default="1,8")
    ap.add_argument("--threads", type=int, default=0, help="torch / llama.cpp threads (0: torch's default)")
    ap.add_argument("--autocast", default="no", choices=["no", "bf16"], help="slimtune's decoding precision")
    ap.add_argument("--out", default=str(RESULTS / "generation.json"))
    ap.add_argument("--table", help="only write the Markdown table of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.table:
        data = json.loads(Path(args.table).read_text())
        args = argparse.Namespace(**data["settings"])
        Path(data["settings"]["out"]).with_suffix(".md").write_text(md := table(data["info"], data["summary"], args))
        print(md)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from slimtune.generate import stop_ids
    from slimtune.models import load_model, load_tokenizer

    info = {"command": "python bench/generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            **cpu_info(), "versions": versions(), "loadavg_start": Path("/proc/loadavg").read_text().strip()}
    print(json.dumps(info), flush=True)
    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    costs = model_costs(model)
    bw = bandwidth_gbs()
    peak = matmul_peak_gflops()
    info.update(costs=costs, bandwidth=bw, fp32_peak_gflops=peak, bf16_peak_gflops=matmul_peak_gflops(dtype=torch.bfloat16))
    print(json.dumps({k: info[k] for k in ("bandwidth", "fp32_peak_gflops", "bf16_peak_gflops")}), flush=True)
    stops = stop_ids(tok, model) if args.stop == "eos" else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids(tok, model)[0]
    batches = [int(b) for b in args.batches.split(",")]
    variants = args.variants.split(",")
    runners = {"slimtune": lambda *a: run_slimtune(*a, autocast=args.autocast),
               "hf_dynamic": lambda *a: run_hf(*a, cache="dynamic"),
               "hf_static": lambda *a: run_hf(*a, cache="static"),
               "hf_dynamic_bf16": lambda *a: run_hf(*a, cache="dynamic", autocast="bf16"),
               "slimtune_bf16": lambda *a: run_slimtune(*a, autocast="bf16"),
               "slimtune_bf16_kept": run_slimtune_kept,
               "slimtune_no_lean": lambda *a: run_slimtune(*a, autocast=args.autocast, lean=False),
               "slimtune_bf16_no_lean": lambda *a: run_slimtune(*a, autocast="bf16", lean=False)}
    if "llama_cpp" in variants:
        try:
            gguf = f32_gguf(args.model)
            runners["llama_cpp"] = LlamaCpp(str(gguf), 2048, args.threads or torch.get_num_threads())
            info["gguf"] = str(gguf)
        except ImportError as e:
            print(f"llama.cpp skipped: {e}", flush=True)
            variants.remove("llama_cpp")
    llama_batches = {int(b) for b in args.llama_batches.split(",")}
    prompts_all = bench_prompts(tok, max(batches))
    rows = []
    for r in range(args.rounds):
        for B in batches:
            prompts = prompts_all[:B]
            order = [v for v in variants if v != "llama_cpp" or B in llama_batches]
            k = r % len(order)
            for v in order[k:] + order[:k]:  # rotate: each variant goes first in some round
                res = runners[v](model, tok, prompts, args.new_tokens, stops, pad)
                n = sum(map(len, res["ids"]))
                row = {"round": r, "batch": B, "variant": v, "tokens": n, "seconds": round(res["seconds"], 3),
                       "ttft_s": round(res["ttft_s"], 3), "tok_s": round(n / res["seconds"], 1),
                       "decode_tok_s": round((n - len(prompts)) / (res["seconds"] - res["ttft_s"]), 1),
                       "loadavg": loadavg(), "ids_head": [x[:8] for x in res["ids"][:2]],
                       "ids_hash": hashlib.md5(json.dumps(res["ids"]).encode()).hexdigest()[:12]}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ids_head"}), flush=True)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    summary = summarise(rows, costs, bw["read_gbs"], peak, prompts_all, args.new_tokens, args.stop,
                        info["bf16_peak_gflops"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "settings": vars(args), "summary": summary, "rows": rows}, indent=1) + "\n")
    md = table(info, summary, args)
    out.with_suffix(".md").write_text(md)
    print(md)


def summarise(rows, costs, bw, peak, prompts_all, n_new, stop, bf16_peak=None) -> list[dict]:
    """Medians per (batch, variant), each beside its limit: a bf16 variant's with half the weight
    and KV bytes and the bf16 matmul peak."""
    out = []
    half = {**costs, "weight_bytes": costs["weight_bytes"] / 2, "kv_bytes_per_token": costs["kv_bytes_per_token"] / 2}
    for B in sorted({r["batch"] for r in rows}):
        lens = [len(p) for p in prompts_all[:B]]
        same = {r["variant"]: r["ids_hash"] for r in rows if r["batch"] == B and r["round"] == 0}
        for v in dict.fromkeys(r["variant"] for r in rows if r["batch"] == B):
            lim = (limit(half, B, lens, n_new, bw, bf16_peak or peak) if "bf16" in v
                   else limit(costs, B, lens, n_new, bw, peak))
            mine = [r for r in rows if r["batch"] == B and r["variant"] == v]
            med = {k: statistics.median(r[k] for r in mine) for k in ("tok_s", "decode_tok_s", "ttft_s", "seconds")}
            out.append({"batch": B, "variant": v, **{k: round(x, 3) for k, x in med.items()},
                        "tokens": mine[0]["tokens"], "rounds": len(mine),
                        "loadavg": [r["loadavg"] for r in mine],
                        "same_ids_as_slimtune": same.get(v) == same.get("slimtune"),
                        "limit_tok_s": lim["tok_s"], "bound": lim["bound"],
                        "share_of_limit": round(med["decode_tok_s"] / lim["tok_s"], 3) if stop == "none" else None})
    return out


def table(info, summary, args) -> str:
    lines = [f"`{info['command']}`  ", f"{info['cpu']} ({', '.join(info['flags'])}; torch {info['capability']}), "
             f"{info['threads']} threads; torch {info['versions']['torch']}, transformers "
             f"{info['versions']['transformers']}, llama-cpp-python {info['versions']['llama_cpp_python']}  ",
             f"read bandwidth {info['bandwidth']['read_gbs']} GB/s (copy {info['bandwidth']['copy_gbs']}), "
             f"fp32 matmul peak {info['fp32_peak_gflops']} GFLOP/s (bf16 {info['bf16_peak_gflops']}); "
             f"weights {info['costs']['weight_bytes'] / 1e6:.0f} MB fp32, KV {info['costs']['kv_bytes_per_token'] / 1e3:.0f} kB/token  ",
             f"{args.new_tokens} new tokens per row, stop={args.stop}, greedy, medians of {args.rounds} rounds; "
             f"load average {info['loadavg_start'].split()[0]} at start, {info['loadavg_end'].split()[0]} at end", "",
             "| batch | variant | tok/s | decode tok/s | first token s | limit tok/s (bound) | share of limit | same ids as slimtune | load avg |",
             "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for s in summary:
        share = f"{s['share_of_limit']:.0%}" if s["share_of_limit"] is not None else "-"
        lines.append(f"| {s['batch']} | {s['variant']} | {s['tok_s']:.1f} | {s['decode_tok_s']:.1f} | {s['ttft_s']:.3f} | "
                     f"{s['limit_tok_s']:.0f} ({s['bound']}) | {share} | {'yes' if s['same_ids_as_slimtune'] else 'no'} | "
                     f"{' '.join(s['loadavg'])} |")
    tok_s = {(x["batch"], x["variant"]): x["tok_s"] for x in summary}
    lines.append("")
    for mine in ("slimtune", "slimtune_bf16", "slimtune_bf16_kept"):
        for B, other in ((1, "llama_cpp"), (32, "hf_dynamic"), (32, "hf_dynamic_bf16"), (32, "hf_static")):
            if (B, other) in tok_s and (B, mine) in tok_s:
                lines.append(f"- batch {B}: {mine} / {other} = {tok_s[(B, mine)] / tok_s[(B, other)]:.2f}x tokens/s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
