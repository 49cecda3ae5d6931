"""The one training loop, for every method and loss: setup -> steps -> eval -> checkpoint -> summary.

Under `accelerate launch` the same loop runs data-parallel: each process takes every
world_size-th micro-batch, gradients are synchronised on the last micro-batch of a step, and the
loss is normalised by the trained tokens of the whole accumulated batch on all processes.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from .callbacks import Progress, RunLog, Stopper, Timer
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..config import Config
from ..data.batching import collate, count_trained, length_grouped_batches, pack, split_by_tokens
from ..data.prepare import prepare
from ..errors import ConfigError
from ..evaluate.heldout import heldout_metrics
from .forward import batch_loss
from ..methods import PROMPT_METHODS, apply_method, trainable_report
from .optim import make_optimizer, make_scheduler, set_mode
from ..utils import atomic_write_json, peak_rss_mb, quiet_libraries, seed_everything


def check_config(cfg: Config) -> None:
    """Cross-section checks that need no model."""
    if cfg.data.packing and cfg.method.name in PROMPT_METHODS:
        raise ConfigError("data.packing does not work with prompt or prefix tuning (they add positions); "
                          "set data.packing=false")
    if cfg.method.name == "qlora" and not torch.cuda.is_available():
        raise ConfigError("method.name=qlora needs a CUDA GPU (4-bit bitsandbytes base); "
                          "on CPU use method.name=lora")
    if cfg.model.dtype == "bfloat16" and not torch.cuda.is_available() and not _cpu_bf16():
        print("warning: this CPU has no native bf16 support; bf16 will be slow", file=sys.stderr)


def _cpu_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except Exception:
        return False


def micro_budget(tc, device) -> int:
    """Padded tokens per forward/backward piece (train.micro_batch_tokens; 0: whole batches).

    On CPU a piece of 1024 tokens is as fast per token as a whole 8 x 512 batch (matmuls of 1024
    rows keep the cores busy) and holds 2-3x less: the allocator reuses the same few buffers
    instead of growing. On GPU whole batches keep the device full.
    """
    if tc.micro_batch_tokens is not None:
        return tc.micro_batch_tokens
    return 1024 if torch.device(device).type == "cpu" else 0


def epoch_rows(examples: list[dict], cfg: Config, epoch: int) -> tuple[list[dict], list[list[int]]]:
    """Rows (packed or not) and their micro-batches for one epoch; fixed by (seed, epoch)."""
    seed = cfg.train.seed * 1000 + epoch
    rows = pack(examples, cfg.data.max_length, seed) if cfg.data.packing else examples
    batches = length_grouped_batches([len(r["input_ids"]) for r in rows], cfg.train.batch_size, seed,
                                     group=cfg.data.group_by_length and not cfg.data.packing)
    return rows, batches


def train(cfg: Config, log=print) -> dict:
    """Run a training job; returns the summary (also written to RUN/summary.json)."""
    from accelerate import Accelerator

    from ..models import load_model, load_tokenizer, model_info, resolve_model

    check_config(cfg)
    quiet_libraries()
    timer = Timer()
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    log = log if main else (lambda *_: None)  # one voice under accelerate launch
    if acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise ConfigError(f"{acc.distributed_type.name} is not supported yet: the chunked loss reads the LM "
                          "head outside the model's forward, where it is sharded; launch with DDP (--multi_gpu)")
    run_dir = Path(tc.output_dir)
    ckpt = latest_checkpoint(run_dir) if tc.resume else None
    if tc.resume and ckpt is None:
        log(f"resume: no checkpoint in {run_dir}/checkpoints, starting fresh")
    if not tc.resume and (run_dir / "checkpoints").exists() and main:
        raise ConfigError(f"{run_dir} already holds a run; set train.resume=true to continue it "
                          "or choose another train.output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)

    # --- model, data, method
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.chat_template)
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation,
                       quantize_4bit=cfg.method.name == "qlora", device=str(acc.device))
    data = prepare(cfg.data, tokenizer, tc.seed, log=log)
    if cfg.data.packing is None:  # empty: pack raw text (continued pre-training), not chats
        cfg.data.packing = data.stats.get("format") == "text"
    ref_model = None
    if cfg.method.name == "full" and (cfg.loss.kl_lambda > 0 or cfg.eval.kl):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # full FT: a frozen copy is the base
    base_params = model_info(model)["params"]
    model = apply_method(model, cfg.method, resolve_model(cfg.model.name), tc.gradient_checkpointing)
    params = trainable_report(model)
    pad_id = tokenizer.pad_token_id

    # --- steps
    rows0, batches0 = epoch_rows(data.train, cfg, 0)
    steps_per_epoch = max(1, len(batches0) // (tc.grad_accum * acc.num_processes))
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    warmup = tc.warmup_steps or int(tc.warmup_ratio * total_steps)
    optimizer = make_optimizer(model.parameters(), tc, total_steps, warmup)
    scheduler = make_scheduler(optimizer, tc, total_steps, warmup)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    set_mode(optimizer, True)

    loop = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "train_s": 0.0, "stopper": None}
    if ckpt is not None:
        loop = load_checkpoint(ckpt, acc.unwrap_model(model), optimizer, scheduler)
        log(f"resumed from {ckpt} at step {loop['step']}")
    stopper = Stopper(tc, loop.get("stopper"))
    runlog = RunLog(run_dir, loop["step"] if ckpt is not None else None) if main else None
    if main and ckpt is None:
        cfg.save(run_dir / "config.yaml")
        atomic_write_json(run_dir / "data_stats.json", data.stats)
    progress = Progress(total_steps, tc.progress and main)
    setup_s = timer()
    log(f"model {cfg.model.name}: {base_params:,} parameters; method "
        f"{cfg.method.name}: {params['trainable']:,} trainable ({params['percent']:.3f}%)")
    log(f"data: {len(data.train)} train / {len(data.val)} held-out examples, "
        f"{data.stats['train']['trained_tokens']:,} trained tokens; {total_steps} steps")

    ref_caches: dict[str, dict] = {"val": {}, "general": {}}  # the base's eval hidden states, computed once

    def evaluate(step: int) -> dict:
        set_mode(optimizer, False)
        ev = heldout_metrics(model, data.val, pad_id, cfg.loss, cfg.eval.batch_size, cfg.eval.max_examples,
                             kl=cfg.eval.kl, ref_model=ref_model, ref_cache=ref_caches["val"])
        gen = heldout_metrics(model, data.general, pad_id, cfg.loss, cfg.eval.batch_size, cfg.eval.max_examples,
                              kl=True, ref_model=ref_model, ref_cache=ref_caches["general"]) \
            if cfg.eval.kl and data.general else {}
        set_mode(optimizer, True)
        row = {"step": step, "eval_loss": ev.get("loss"), "eval_ppl": ev.get("ppl"), "eval_kl": ev.get("kl"),
               "general_kl": gen.get("kl")}
        if runlog:
            runlog.write(row)
        if ev:
            progress.message(f"eval @ step {step}: loss {ev['loss']:.4f}  ppl {ev['ppl']:.2f}"
                             + (f"  kl {ev['kl']:.4f}" if "kl" in ev else "")
                             + (f"  general kl {gen['kl']:.4f}" if gen else ""))
        return row

    first_eval = evaluate(0) if ckpt is None else loop.get("first_eval", {})
    last_eval = first_eval
    train_timer = Timer(loop["train_s"])
    resumed_s = loop["train_s"]  # time spent before a resume, for the wall-clock cap
    rows, batches = epoch_rows(data.train, cfg, loop["epoch"])
    step, last_logged = loop["step"], {}
    budget = micro_budget(tc, acc.device)
    while step < total_steps and stopper.reason is None:
        # one optimizer step = grad_accum micro-batches on every process
        need = tc.grad_accum * acc.num_processes
        if loop["batch"] + need > len(batches):
            loop["epoch"] += 1
            loop["batch"] = 0
            rows, batches = epoch_rows(data.train, cfg, loop["epoch"])
        group = batches[loop["batch"]: loop["batch"] + need]
        loop["batch"] += need
        mine = group[acc.process_index::acc.num_processes]
        micro = [piece for idx in mine for piece in split_by_tokens([rows[i] for i in idx], budget)]
        n_total = sum(count_trained([rows[i] for i in idx]) for idx in group)  # all processes
        kl_lambda = cfg.loss.kl_lambda * min(1.0, (step + 1) / cfg.loss.kl_warmup_steps) \
            if cfg.loss.kl_warmup_steps else cfg.loss.kl_lambda
        ce, kl = accumulate_grads(model, micro, n_total, pad_id, cfg.loss, kl_lambda, ref_model, acc)
        grad_norm = None
        if tc.grad_clip:
            grad_norm = float(acc.clip_grad_norm_(model.parameters(), tc.grad_clip))
        lr = scheduler.get_last_lr()[0]  # the lr this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loop["tokens"] += n_total
        elapsed = train_timer()
        ce_mean = ce * acc.num_processes / max(1, n_total)  # this process's share, scaled
        kl_mean = kl * acc.num_processes / max(1, n_total)
        loss = ce_mean + kl_lambda * kl_mean
        stopper.after_step(step, loss, timer() + resumed_s)  # the cap counts setup and evaluations too
        last_logged = {"step": step, "epoch": round(loop["epoch"] + loop["batch"] / max(1, len(batches)), 3),
                       "loss": loss, "ce": ce_mean, "kl": kl_mean if kl_lambda > 0 else None,
                       "kl_lambda": kl_lambda, "lr": lr, "grad_norm": grad_norm, "tokens": loop["tokens"],
                       "tokens_per_s": loop["tokens"] / max(1e-9, elapsed), "elapsed_s": elapsed}
        if runlog and (step % tc.log_every == 0 or step == total_steps):
            runlog.write(last_logged)
        progress.update(step, loss, lr, last_logged["tokens_per_s"], elapsed)
        if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps and data.val:
            last_eval = evaluate(step)
            stopper.after_eval(last_eval["eval_loss"])
        if tc.save_every and step % tc.save_every == 0 and step < total_steps and main:
            loop.update(step=step, train_s=train_timer(), stopper=stopper.state(), first_eval=first_eval)
            save_checkpoint(run_dir, step, acc.unwrap_model(model), optimizer, scheduler, loop, tc.keep_checkpoints)
            if os.environ.get("SLIMTUNE_CRASH_AFTER_CHECKPOINT") == str(step):  # crash tests: a real SIGKILL
                os.kill(os.getpid(), signal.SIGKILL)
    train_s = train_timer()
    if stopper.reason:
        log(f"stopping early at step {step}: {stopper.reason}")
    if last_eval.get("step") != step:
        last_eval = evaluate(step)

    # --- output: the adapter (or model), tokenizer, config, metrics
    set_mode(optimizer, False)
    summary = {}
    if main:
        final = acc.unwrap_model(model)
        final.save_pretrained(run_dir, safe_serialization=True)
        tokenizer.save_pretrained(run_dir)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        times = {"setup_s": round(setup_s, 2), "train_s": round(train_s, 2), "total_s": round(timer(), 2),
                 "steps": step, "steps_per_s": round(step / max(1e-9, train_s), 4),
                 "trained_tokens": loop["tokens"], "trained_tokens_per_s": round(loop["tokens"] / max(1e-9, train_s), 1),
                 "peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": peak}
        atomic_write_json(run_dir / "time_metrics.json", times)
        summary = {"run_dir": str(run_dir), "method": cfg.method.name, "steps": step,
                   "stopped": stopper.reason or "completed", "params": params,
                   "before": _metrics(first_eval), "after": _metrics(last_eval),
                   "last_train": last_logged, "time": times,
                   "chat_command": f"slimtune chat {run_dir}"}
        atomic_write_json(run_dir / "summary.json", summary)
        log(format_summary(summary))
    acc.wait_for_everyone()
    return summary


def accumulate_grads(model, micro: list[list[dict]], n_total: int, pad_id: int, loss_cfg, kl_lambda: float,
                     ref_model=None, acc=None) -> tuple[float, float]:
    """Backward over this process's micro-batches; returns its (CE sum, KL sum).

    Every micro-batch's loss is divided by `n_total`, the trained tokens of the whole accumulated
    batch on all processes, so 4 micro-batches of 2 give the gradient of one batch of 8.
    DDP averages gradients over processes; dividing by n_total / world_size turns that into a sum.
    """
    world = acc.num_processes if acc else 1
    device = acc.device if acc else next(model.parameters()).device
    ce = kl = 0.0
    for j, rows in enumerate(micro):
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        last = j == len(micro) - 1
        with acc.no_sync(model) if acc and not last else nullcontext():  # sync once per step
            out = batch_loss(model, batch, loss_cfg, kl_lambda, n_total / world, ref_model, want_kl=kl_lambda > 0)
            acc.backward(out.loss) if acc else out.loss.backward()
        ce += float(out.ce_sum)
        kl += float(out.kl_sum)
    return ce, kl


def _metrics(row: dict) -> dict:
    return {k: row.get(k) for k in ("eval_loss", "eval_ppl", "eval_kl", "general_kl")}


def format_summary(s: dict) -> str:
    b, a, t, p = s["before"], s["after"], s["time"], s["params"]
    f = (lambda v, d=4: "n/a" if v is None else f"{v:.{d}f}")
    lines = [
        "", "== slimtune summary ==",
        f"steps          {s['steps']} ({s['stopped']})",
        f"held-out loss  {f(b['eval_loss'])} -> {f(a['eval_loss'])}   (ppl {f(b['eval_ppl'], 2)} -> {f(a['eval_ppl'], 2)})",
        f"KL to base     held-out {f(a['eval_kl'])}   general prompts {f(a['general_kl'])}",
        f"trainable      {p['trainable']:,} of {p['total']:,} parameters ({p['percent']:.3f}%)",
        f"speed          {t['trained_tokens_per_s']:,.0f} trained tokens/s, {t['train_s']:.0f} s training, "
        f"{t['total_s']:.0f} s total, peak RSS {t['peak_rss_mb']:,.0f} MiB",
        f"adapter        {s['run_dir']}",
        f"chat with it   {s['chat_command']}",
    ]
    return "\n".join(lines)
