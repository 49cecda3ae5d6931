"""Data preparation at scale: chats/s rendering a 100k-chat file with 1 and 2 processes, cold and
cached, and peak memory (the process and its workers together).

    python bench/data_prep.py                  # 100,000 chats, SmolLM2 tokenizer, max_length 512
    python bench/data_prep.py --n 20000        # quicker

The file is built from the chitchat-dataset package: each of its 7,168 conversations is cut into
windows of 4 turns (user, assistant, user, assistant) at every other turn, so the chats differ
from one another and look like real multi-turn data; windows are taken round-robin over the
conversations until there are N. Each scenario runs in a fresh process with its own cache folder:
  cold   reads the JSONL into Arrow and renders (chat template + masks) every chat;
  cached a second run over the same file and settings: both steps are loaded from the disk cache.
Results: bench/results/data_prep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_file(path: Path, n: int, turns: int = 4) -> dict:
    """Write N chats of `turns` messages cut from chitchat conversations; returns a summary."""
    from slimtune.data.formats import load_chitchat

    convs = [c for c in load_chitchat() if len(c) >= turns]
    windows = [[c[s:s + turns] for s in range(0, len(c) - turns + 1, 2) if c[s]["role"] == "user"] for c in convs]
    out, k = [], 0
    while len(out) < n:  # round-robin: window k of every conversation that has one
        row = [w[k] for w in windows if len(w) > k]
        if not row:
            k = 0
            continue
        out += row
        k += 1
    out = out[:n]
    with open(path, "w") as f:
        for chat in out:
            f.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
    return {"chats": n, "conversations": len(convs), "bytes": path.stat().st_size}


class PeakRSS:
    """Peak memory of this process plus its children, sampled every 50 ms: the sum of their PSS
    (proportional set size), so pages that forked workers share with the parent count once."""

    def __init__(self):
        import psutil
        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil
        while not self.stop:
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def done(self) -> float:
        self.stop = True
        self.thread.join()
        return self.peak / 2**20


def worker(spec: dict) -> dict:
    """One scenario in this (fresh) process: open the source, render it, time both."""
    from slimtune.data.preprocess import render_source
    from slimtune.data.sources import open_source
    from slimtune.models import load_tokenizer

    import datasets  # noqa: F401  (imports are not what we measure)

    tok = load_tokenizer(spec["model"])
    mem = PeakRSS()
    t0 = time.perf_counter()
    source = open_source(spec["file"])
    t1 = time.perf_counter()
    r = render_source(source, tok, max_length=spec["max_length"], num_proc=spec["num_proc"])
    t2 = time.perf_counter()
    tokens = sum(len(x) for x in r.ds.data.column("input_ids").to_pylist()) if spec.get("count") else None
    return {"read_s": t1 - t0, "render_s": t2 - t1, "total_s": t2 - t0, "cached": r.cached,
            "examples": len(r.ds), "tokens": tokens, "peak_rss_mb": mem.done()}


def run_scenario(name: str, spec: dict, cache: Path) -> dict:
    env = dict(os.environ, SLIMTUNE_DATA_CACHE=str(cache), PYTHONPATH=str(BENCH.parent / "src"))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = subprocess.run([sys.executable, __file__, "--worker", f.name], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(scenario=name, num_proc=spec["num_proc"], chats_per_s=spec["n"] / res["total_s"])
    print(f"{name:<16} {res['total_s']:7.1f} s  {res['chats_per_s']:8.0f} chats/s  "
          f"peak {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return res


def table(results: list[dict], meta: dict) -> str:
    lines = [
        "# Data preparation: render + mask a chat file, 1 and 2 processes, cold and cached",
        "",
        f"`python bench/data_prep.py --n {meta['n']}` on {meta['machine']}; {meta['n']:,} chats of 4 turns cut "
        f"from chitchat-dataset ({meta['bytes'] / 2**20:.1f} MB JSONL), tokenizer {meta['model']}, "
        f"max_length {meta['max_length']}, {meta['tokens']:,} tokens in all. Each row is a fresh process with "
        "its own cache folder. cold = JSONL -> Arrow + render every chat; cached = the same run again, both "
        "loaded from the disk cache. Peak memory: the PSS of the process and its workers, summed (shared pages count once).",
        "",
        "| scenario | processes | read s | render s | total s | chats/s | peak memory MB (PSS) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['scenario']} | {r['num_proc']} | {r['read_s']:.1f} | {r['render_s']:.1f} | "
                     f"{r['total_s']:.1f} | {r['chats_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--procs", default="1,2", help="data.num_proc values, comma separated")
    ap.add_argument("--name", default="data_prep", help="results file name in bench/results/")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    import platform
    work = Path(tempfile.mkdtemp(prefix="slimtune-bench-data-"))
    path = work / f"chitchat_{args.n}.jsonl"
    meta = build_file(path, args.n)
    meta.update(n=args.n, model=args.model, max_length=args.max_length,
                machine=f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})")
    spec = dict(file=str(path), model=args.model, max_length=args.max_length, n=args.n)
    results = []
    out = BENCH / "results" / args.name
    for nproc in map(int, args.procs.split(",")):
        cache = work / f"cache{nproc}"
        for kind in ("cold", "cached"):
            results.append(run_scenario(f"{kind}, {nproc} proc", {**spec, "num_proc": nproc, "count": not results},
                                        cache))
            meta["tokens"] = results[0]["tokens"]
            out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
            out.with_suffix(".md").write_text(table(results, meta))  # after each row: a long run keeps what it has
    print(table(results, meta))


if __name__ == "__main__":
    main()
