"""One lean decoding step, timed: ms per step at each batch size for the packed bf16 decoder, the
fp32 one and the fp32 one with its weights laid out for MKL's packed sgemm at that batch size, and the same steps with every matmul replaced by a stub returning a stored output
(what everything but the matmuls costs), on the embedded SmolLM2 after a 60-token prefill.

    PYTHONPATH=src python bench/decode_step.py --batches 1,24 --steps 50 --rounds 3

Also times the matmuls of a step alone, called back to back with the step's own shapes (what
they cost without the other operators between them). Medians of --rounds; writes
bench/results/decode_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

PROMPT = 60


class _Stub:
    """A projection that returns its first output for each input shape again (no matmul)."""

    def __init__(self, proj):
        self.proj, self.out = proj, {}

    def __call__(self, x):
        key = tuple(x.shape)
        if key not in self.out:
            self.out[key] = self.proj(x).clone()
        return self.out[key]

    def times(self, x, other):
        return self(x)


def steps_ms(dec, B: int, n: int) -> float:
    from slimtune.generate import _Cache

    cache = _Cache(PROMPT + n + 2)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 1000, (B, PROMPT), generator=g)
    mask = torch.ones(B, PROMPT + n + 1, dtype=torch.long)
    with torch.inference_mode():
        dec.step(toks, torch.arange(PROMPT)[None].expand(B, PROMPT), mask[:, :PROMPT], cache)
        t0 = time.perf_counter()
        for i in range(n):
            dec.step(toks[:, :1], torch.full((B, 1), PROMPT + i), mask[:, :PROMPT + i + 1], cache)
        return (time.perf_counter() - t0) / n * 1e3


def matmuls_ms(dec, cfg, B: int, n: int) -> float:
    """The step's projections alone, back to back, on the step's input shapes."""
    x = torch.randn(B, 1, cfg.hidden_size).to(dec.dtype)
    inner = torch.randn(B, 1, cfg.intermediate_size).to(dec.dtype)
    with torch.inference_mode():
        def one():
            for lay in dec.layers:
                lay.joined(x)
                lay.o(x)
                lay.gate(x)
                if dec.pack:
                    lay.up.times(x, inner)
                else:
                    lay.up(x)
                lay.d(inner)
            dec.head(x[:, -1])
        one()
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        return (time.perf_counter() - t0) / n * 1e3


def stubbed(dec):
    for lay in dec.layers:
        for name in ("o", "d", "gate", "up") + (("q",) if dec.pack else ("q", "k", "v")):
            setattr(lay, name, _Stub(getattr(lay, name)))
    dec.head = _Stub(dec.head)
    return dec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,24")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "decode_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import common
    from generation import cpu_info, versions

    from slimtune.lean_decode import LeanDecoder, can_mkl_pack
    from slimtune.models import load_model

    net = load_model(common.model_path("smollm2")).eval()
    rows = []
    for dtype, pack, mkl in ((torch.bfloat16, True, False), (torch.float32, False, False), (torch.float32, False, True)):
        if pack and LeanDecoder.build(net, dtype, pack=True).pack is False:
            continue  # no packed bf16 on this CPU
        if mkl and not can_mkl_pack("cpu"):
            continue
        for B in [int(b) for b in args.batches.split(",")]:
            full, bare, mm = [], [], []
            at = B if mkl else 0                       # fp32 weights laid out for MKL at this batch
            for _ in range(args.rounds):
                full.append(steps_ms(LeanDecoder.build(net, dtype, pack=pack, rows=at), B, args.steps))
                mm.append(matmuls_ms(LeanDecoder.build(net, dtype, pack=pack, rows=at), net.config, B, args.steps))
                bare.append(steps_ms(stubbed(LeanDecoder.build(net, dtype, pack=pack)), B, args.steps))
            row = {"dtype": str(dtype).split(".")[-1], "packed": "oneDNN" if pack else "MKL" if mkl else False,
                   "batch": B,
                   "step_ms": round(statistics.median(full), 2), "matmuls_alone_ms": round(statistics.median(mm), 2),
                   "without_matmuls_ms": round(statistics.median(bare), 2)}
            row["matmuls_in_step_ms"] = round(row["step_ms"] - row["without_matmuls_ms"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"command": "python bench/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "cpu": cpu_info(),
           "versions": versions(), "threads": args.threads, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
