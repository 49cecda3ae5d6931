"""GGUF round trip on a real run: merge once, export f32 / f16 / q8_0, read each file back with
transformers' GGUF loader (logits vs the merged model, tokenizer ids) and, when a Python with
llama-cpp-python is at hand, with llama.cpp itself (greedy answer vs transformers').

    PYTHONPATH=src python bench/gguf_roundtrip.py runs/rt [--out runs/rt-gguf]
        [--llama-cpp-python /tmp/llamacpp/bin/python] [--prompt "What is the capital of France?"]

Writes OUT/model-<type>.gguf, OUT/Modelfile and bench/results/gguf_roundtrip.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def greedy_hf(model, tok, prompt_text: str, n: int) -> list[int]:
    ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--out", help="folder for the .gguf files (default: RUN-gguf)")
    ap.add_argument("--llama-cpp-python", default="/tmp/llamacpp/bin/python")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    from slimtune.ship.gguf import check_export, write_gguf
    from slimtune.ship.merge import merge_in_memory
    from slimtune.ship.modelfile import write_modelfile

    out = Path(args.out or str(args.run).rstrip("/") + "-gguf")
    m = merge_in_memory(args.run)
    prompt = m.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    hf_ids = greedy_hf(m.model, m.tokenizer, prompt, args.new_tokens)
    rows = []
    have_llama = Path(args.llama_cpp_python).exists() and subprocess.run(
        [args.llama_cpp_python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    for kind in ("f32", "f16", "q8_0"):
        path = out / f"model-{kind}.gguf"
        t0 = time.time()
        meta = write_gguf(m.model, m.tokenizer, path, kind, title=Path(args.run).name)
        row = {"type": kind, "file": str(path), "MiB": round(path.stat().st_size / 2**20, 1),
               "write_s": round(time.time() - t0, 1), **check_export(path, m.model, m.tokenizer, m.inputs, m.logits, kind)}
        if have_llama:
            proc = subprocess.run([args.llama_cpp_python, str(BENCH / "llama_cpp_answer.py"), str(path), prompt,
                                   str(args.new_tokens)], capture_output=True, text=True)
            if proc.returncode == 0:
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                row["llama_cpp_prompt_ids_match"] = got["prompt_ids"] == m.tokenizer(
                    prompt, add_special_tokens=False)["input_ids"]
                row["llama_cpp_greedy_match"] = got["greedy_ids"] == hf_ids
                row["llama_cpp_answer"] = got["greedy_text"]
            else:
                row["llama_cpp_error"] = proc.stderr[-500:]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    write_modelfile(out / "model-q8_0.gguf", m.tokenizer, meta)
    res = {"run": args.run, "parity_merged": m.parity, "prompt": args.prompt,
           "transformers_answer": m.tokenizer.decode(hf_ids), "llama_cpp": have_llama, "rows": rows}
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "gguf_roundtrip.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["| type | size (MiB) | max abs logit diff vs merged | vs merged with the same rounding | "
             "same top token | tokenizer ids | llama.cpp greedy = transformers |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lc = {True: "yes", False: "no"}.get(r.get("llama_cpp_greedy_match"), "not run")
        lines.append(f"| {r['type']} | {r['MiB']} | {r['max_abs_logit_diff']:.2e} | {r['max_abs_logit_diff_rounded']:.2e} | "
                     f"{r['top1_agreement']:.1%} | "
                     f"{'same' if r['tokenizer_match'] else 'DIFFER'} | {lc} |")
    (BENCH / "results" / "gguf_roundtrip.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
