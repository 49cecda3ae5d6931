"""What the benchmarks share: the two models, the data, one subprocess per run, and tables.

Every measured run is a fresh `python bench/<script>.py --worker SPEC.json` process, so its peak
RSS (getrusage ru_maxrss, read right after training) is its own. The parent only orchestrates.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
REPO = BENCH.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The same LoRA for every framework: r16, alpha 32, no dropout, attention projections.
LORA = dict(r=16, alpha=32.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
MAX_LENGTH = 512
BATCH = 8
LR = 2e-4
SEED = 0


# ---------------------------------------------------------------------------------------------
# models


def random_model_dir() -> Path:
    """A random model of SmolLM2's (Llama) architecture, hidden 384 x 6 layers, 6 heads / 2 KV
    heads, MLP 1536, tied 49,152-word embeddings; seeded, saved once.

    It shares the SmolLM2 tokenizer and chat template, so it sees exactly the same token ids,
    trained tokens and batches as the real model. (A Qwen2 config would make transformers load
    the same tokenizer.json as a Qwen2Tokenizer, which splits some chats differently.)
    """
    from slimtune.models import cache_dir, resolve_model

    out = cache_dir() / "bench" / "random-llama-384x6"
    if (out / "config.json").exists():
        return out
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = Path(resolve_model("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=49152, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, tmp / f)
    os.replace(tmp, out)
    return out


MODELS = {  # key -> (label, callable giving the path)
    "smollm2": ("SmolLM2-135M-Instruct (embedded)", lambda: Path(__import__("slimtune.models", fromlist=["x"])
                                                                  .resolve_model("smollm2-135m"))),
    "random": ("random Llama 384x6, vocab 49k", random_model_dir),
}


def model_path(key: str) -> str:
    return str(MODELS[key][1]())


# ---------------------------------------------------------------------------------------------
# data


def make_data(workdir: Path, n_train: int, n_eval: int = 16, seed: int = SEED) -> dict:
    """Mixed-length chats: half chitchat (long, many turns), half the shipped instruction set.

    Rendered once with slimtune's `render_chat` (assistant turns + their <|im_end|> trained,
    truncated to 512). Writes train.jsonl (chats, for slimtune to render itself), train.json and
    eval.json (rendered {input_ids, labels}, for TRL and for the held-out loss).
    """
    from slimtune.data.formats import load_chitchat
    from slimtune.data.reader import load_chats
    from slimtune.data.tools import render_all, write_chats
    from slimtune.models import load_tokenizer

    need = (n_train + n_eval) // 2 + 1
    chit = load_chitchat(need)
    inst = load_chats("builtin:instructions")
    rng = random.Random(seed)
    rng.shuffle(inst)
    h_tr, h_ev = n_train // 2, n_eval // 2
    train = chit[:h_tr] + inst[:n_train - h_tr]
    evals = chit[h_tr:h_tr + h_ev] + inst[n_train - h_tr:n_train - h_tr + n_eval - h_ev]
    rng.shuffle(train)
    tok = load_tokenizer("smollm2-135m")
    tr, st = render_all(train, tok, max_length=MAX_LENGTH)
    ev, _ = render_all(evals, tok, max_length=MAX_LENGTH)
    workdir.mkdir(parents=True, exist_ok=True)
    write_chats(train, workdir / "train.jsonl")
    (workdir / "train.json").write_text(json.dumps(tr))
    (workdir / "eval.json").write_text(json.dumps(ev))
    return {"train_chats": str(workdir / "train.jsonl"), "train": str(workdir / "train.json"),
            "eval": str(workdir / "eval.json"), "stats": st.summary()}


# ---------------------------------------------------------------------------------------------
# inside a worker


def reinit_lora(model, seed: int = SEED) -> None:
    """Same starting adapter in every framework: lora_A ~ U(+-1/sqrt(in)) from a seeded generator
    in parameter-name order (PEFT's prefixes differ between wrappers; the order does not); B = 0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: _lora_key(kv[0])):
            if "lora_A" in name:
                bound = 1 / p.shape[1] ** 0.5
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
            elif "lora_B" in name:
                p.zero_()


def same_start_adapters() -> None:
    """Make slimtune's loop start from `reinit_lora`'s adapter, as the TRL runs of a bench do."""
    import slimtune.train.loop as st

    apply = st.apply_method

    def apply_and_reinit(*a, **kw):
        model = apply(*a, **kw)
        reinit_lora(model)
        return model

    st.apply_method = apply_and_reinit


def _lora_key(name: str) -> str:
    return name[name.find("layers."):] if "layers." in name else name


def train_trl_timed(trainer, steps: int, trained_tokens) -> dict:
    """Train a TRL trainer, timing each optimizer step and counting the tokens each batch trains
    (`trained_tokens(batch) -> int`, read from the collated batch). Returns tokens and seconds of
    the first `steps` steps, peak RSS, their losses, step_tokens and step_s."""
    from transformers import TrainerCallback

    counts: list[int] = []
    inner = trainer.data_collator

    def counting(features):
        batch = inner(features)
        counts.append(int(trained_tokens(batch)))
        return batch

    trainer.data_collator = counting
    marks: list[float] = []

    class Timing(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())

    trainer.add_callback(Timing())
    trainer.train()
    peak = peak_rss_mb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][:steps]
    return {"tokens": sum(counts[:steps]), "train_s": marks[steps] - marks[0], "peak_rss_mb": round(peak, 1),
            "losses": losses, "step_tokens": counts[:steps], "step_s": diffs([m - marks[0] for m in marks[1:steps + 1]])}


def diffs(cumulative: list[float]) -> list[float]:
    """Per-step values from running totals."""
    return [b - a for a, b in zip([0] + cumulative[:-1], cumulative)]


def peak_rss_mb() -> float:
    """ru_maxrss of this process and of any children it waited for, in MiB."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(me, kids) / 1024


def heldout_loss(model_dir: str, adapter_dir: str, eval_path: str) -> float:
    """Mean CE per trained token of base + adapter on the eval examples, one example at a time,
    with the model's own loss (full logits): the same code for every framework."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    total = n = 0.0
    with torch.no_grad():
        for ex in json.loads(Path(eval_path).read_text()):
            ids, lab = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            k = int((lab[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=lab).loss) * k
            n += k
    return total / max(1.0, n)


def worker_main(run) -> None:
    """`script.py --worker SPEC.json`: run(spec) -> dict, written to spec['out']."""
    spec = json.loads(Path(sys.argv[sys.argv.index("--worker") + 1]).read_text())
    res = run(spec)
    Path(spec["out"]).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# in the parent


def run_worker(script: Path, spec: dict, timeout: float = 3600, threads: int | None = None) -> dict:
    """Run one measured configuration in its own process; returns its result dict (or an error).

    threads: OMP/MKL threads of the worker (None: torch's default, one per core), the same for
    every framework.
    """
    import psutil

    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="slimbench-") as tmp:
        spec = dict(spec, out=str(Path(tmp) / "result.json"), tmp=tmp)
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        errf = open(Path(tmp) / "stderr.txt", "w+")
        proc = subprocess.Popen([sys.executable, str(script), "--worker", str(Path(tmp) / "spec.json")],
                                stdout=errf, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        ps, polled = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:  # polled RSS: a cross-check of the worker's own ru_maxrss
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                polled = max(polled, rss / 2**20)
            except psutil.Error:
                pass
            if time.perf_counter() - t0 > timeout:
                proc.kill()
            time.sleep(0.2)
        errf.seek(0)
        tail = errf.read()[-3000:]
        out = Path(spec["out"])
        if proc.returncode != 0 or not out.exists():
            return {"error": f"exit {proc.returncode}", "log_tail": tail}
        res = json.loads(out.read_text())
        res["polled_rss_mb"] = round(polled, 1)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        return res


def median_spread(xs: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the values that exist."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return (float("nan"),) * 3
    return statistics.median(xs), min(xs), max(xs)


def fmt_ms(xs: list[float], digits: int = 0) -> str:
    m, lo, hi = median_spread(xs)
    if m != m:
        return "n/a"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(m)} ({f.format(lo)}-{f.format(hi)})" if len(xs) > 1 else f.format(m)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> dict:
    """CPU model, cores, relevant ISA flags and library versions."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in cpu.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
        info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")) or f in ("f16c",))
    except (OSError, StopIteration):
        pass
    try:
        info["mkldnn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        info["mkldnn_bf16"] = False
    for mod in ("transformers", "peft", "accelerate", "trl"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def save_results(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")


def vs_trl_summary(results: dict, steps: int, unit: str) -> tuple[str, dict]:
    """The table and medians of a slimtune-vs-TRL bench: results {"trl": [...], "slimtune": [...]},
    each run {tokens, train_s, peak_rss_mb, losses} or {error}. Returns (Markdown table, numbers)."""
    ok = {fw: [x for x in rs if "error" not in x] for fw, rs in results.items()}
    tps = {fw: [x["tokens"] / x["train_s"] for x in rs] for fw, rs in ok.items()}
    rss = {fw: [x["peak_rss_mb"] for x in rs] for fw, rs in ok.items()}
    med = {fw: median_spread(v)[0] for fw, v in tps.items()}
    mem = {fw: median_spread(v)[0] for fw, v in rss.items()}
    rows = [[fw, str(len(ok[fw])), fmt_ms(tps[fw], 1), fmt_ms([x["train_s"] / steps for x in ok[fw]], 2),
             fmt_ms(rss[fw]), fmt_ms([x["losses"][0] for x in ok[fw]], 4) if ok[fw] else "n/a",
             fmt_ms([x["losses"][-1] for x in ok[fw]], 4) if ok[fw] else "n/a"] for fw in ("trl", "slimtune")]
    table = markdown_table(["framework", "runs", f"{unit} tokens/s", "s/step", "peak RSS MiB",
                            "loss step 1", f"loss step {steps}"], rows)
    ratio_t = med["slimtune"] / med["trl"] if med["trl"] else float("nan")
    ratio_m = mem["slimtune"] / mem["trl"] if mem["trl"] else float("nan")
    return table, {"median_tokens_per_s": med, "median_peak_rss_mb": mem, "ratio_tokens_per_s": ratio_t,
                   "ratio_peak_rss": ratio_m}
