"""The one training loop, for every method and objective: setup -> step -> evaluate -> finish.

    train(cfg, objective=None, callbacks=())
        s = setup(cfg)              model, data, method, objective, optimizer, resume
        while not done:
            row = step(s)           grad_accum micro-batches on every process -> one update
            evaluate(s) / checkpoint(s) when due
        finish(s)                   final evaluation, the adapter, metrics, summary

Under `accelerate launch` the same loop runs data-parallel: each process takes every
world_size-th micro-batch, gradients are synchronised on the last micro-batch of a step, the loss
is normalised by the units (trained tokens) of the whole accumulated batch on all processes, and
the logged sums are all-reduced, so every process logs and stops on the same numbers. Stop rules
read only those numbers and the main process's clock (broadcast), so all processes stop at the
same step.
"""

from __future__ import annotations

import copy
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast, gather_object

from ..config import Config
from ..data.batching import collate, length_grouped_batches, pack, row_length
from ..data.prepare import Prepared
from ..errors import ConfigError
from ..machine import bf16_supported, four_bit_support, pick_device
from ..methods import apply_method, method_of, trainable_report
from ..models import load_model, load_tokenizer, model_info, resolve_model
from ..runfolder import weights_digest
from ..utils import atomic_write_json, peak_rss_mb, quiet_libraries, reset_peak_rss, seed_everything
from . import distributed
from .base_states import base_states
from .callbacks import Callback, Progress, RunLog, Stopper, Timer
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from .forward import check_head
from .heldout import heldout_metrics
from .layer_choice import auto_k, choose_layers, layer_scores
from .objectives import Objective, make_objective
from .optim import make_optimizer, make_scheduler, set_mode
from .precision import Precision, check_precision, use_fp32_attention
from .trackers import check_trackers, make_trackers


def check_machine(cfg: Config, device: str | None = None) -> None:
    """Checks that need the machine (the config checks itself): 4-bit base, bf16, trackers.
    device: cpu / cuda / mps (None: the one train.device picks)."""

    device = device or pick_device(cfg.train.device)
    if method_of(cfg.method.name).four_bit:
        four_bit_support(device)
    if cfg.model.dtype == "bfloat16" and device == "cpu" and not bf16_supported(device):
        print("warning: this CPU has no native bf16 support; bf16 will be slow", file=sys.stderr)
    check_precision(cfg.train.mixed_precision, device, cfg.model.dtype)
    check_trackers(cfg.train.report_to)


def epoch_rows(examples: list[dict], cfg: Config, epoch: int, objective: Objective | None = None):
    """Rows (packed or not) and their micro-batches for one epoch; fixed by (seed, epoch)."""
    seed = cfg.train.seed * 1000 + epoch
    rows = pack(examples, cfg.data.max_length, seed) if cfg.data.packing else examples
    length = objective.length if objective else row_length
    batches = length_grouped_batches([length(r) for r in rows], cfg.train.batch_size, seed,
                                     group=cfg.data.group_by_length and not cfg.data.packing)
    return rows, batches


@dataclass
class Session:
    """Everything a run holds between steps."""

    cfg: Config
    acc: object
    model: torch.nn.Module
    tokenizer: object
    objective: Objective
    data: Prepared
    ref_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    run_dir: Path
    total_steps: int
    params: dict
    base_params: int
    stopper: Stopper
    callbacks: list[Callback]
    timer: Timer
    loop: dict = field(default_factory=dict)
    """Resumable position: step, epoch, batch, tokens, train_s, first_eval."""
    rows: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    ref_caches: dict = field(default_factory=lambda: {"val": {}, "general": {}})
    last_eval: dict = field(default_factory=dict)
    last_logged: dict = field(default_factory=dict)
    setup_s: float = 0.0
    resumed_s: float = 0.0
    """Wall time spent before a resume (the cap counts it)."""
    train_timer: Timer | None = None
    amp: Precision = field(default_factory=Precision)
    """Autocast and fp16 loss scaling (train.mixed_precision)."""

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def emit(self, row: dict) -> None:
        for cb in self.callbacks:
            cb.on_log(row)


def train(cfg: Config, log=print, callbacks: list[Callback] | tuple = (), objective: Objective | None = None) -> dict:
    """Run a training job; returns the summary (also written to RUN/summary.json)."""
    s = setup(cfg, log, callbacks, objective)
    while s.loop["step"] < s.total_steps and s.stopper.reason is None:
        row = step(s)
        n = s.loop["step"]
        if n % s.cfg.train.log_every == 0 or n == s.total_steps:
            s.emit(row)
        if s.cfg.eval.every and n % s.cfg.eval.every == 0 and n < s.total_steps and s.data.val:
            s.stopper.after_eval(_agreed(s, evaluate(s)["eval_loss"]))
        if s.cfg.train.save_every and n % s.cfg.train.save_every == 0 and n < s.total_steps:
            checkpoint(s)
    return finish(s, log)


def setup(cfg: Config, log=print, callbacks=(), objective: Objective | None = None) -> Session:

    quiet_libraries()
    reset_peak_rss()  # this run's own peak, also when a sweep runs several in one process
    timer = Timer()
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    acc = distributed.make_accelerator(cfg)  # train.device; FSDP is train.fsdp (distributed.py)
    asked = cfg.train.mixed_precision
    cfg = cfg.resolved(str(acc.device), bf16_supported(acc.device.type), method_of(cfg.method.name).four_bit)
    check_machine(cfg, acc.device.type)
    tc = cfg.train
    if asked == "auto":
        log(f"precision: {tc.mixed_precision} (train.mixed_precision=auto on {acc.device.type}: native bf16 "
            f"{'yes' if bf16_supported(acc.device.type) else 'no'}, weights {cfg.model.dtype})")
    run_dir = Path(tc.output_dir)
    ckpt = latest_checkpoint(run_dir, log) if tc.resume else None
    if tc.resume and ckpt is None:
        log(f"resume: no checkpoint in {run_dir}/checkpoints, starting fresh")
    if not tc.resume and (run_dir / "checkpoints").exists() and acc.is_main_process:
        raise ConfigError(f"{run_dir} already holds a run; set train.resume=true to continue it "
                          "or choose another train.output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    objective = objective or make_objective(cfg)
    method = method_of(cfg.method.name)

    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.chat_template)
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation, quantize_4bit=method.four_bit,
                       device=str(acc.device))
    use_fp32_attention(model, tc.mixed_precision, acc.device.type, log)  # CPU + bf16: see train/precision.py
    with acc.main_process_first():  # rank 0 renders into the cache, the other ranks read it
        data = objective.prepare_data(tokenizer, cfg.data.data_seed(tc.seed), log=log)
    if cfg.data.packing is None:  # empty: pack raw text (continued pre-training), not chats
        cfg.data.packing = data.stats.get("format") == "text"
    # The loss rebuilds logits from hidden states: check it against the model's own head once.
    probe = [r for r in data.train[:1] if "labels" in r] or data.general[:1]
    if probe:
        batch = collate(probe, tokenizer.pad_token_id)
        check_head(model, {k: v.to(acc.device) for k, v in batch.items()},
                   rtol=1e-3 if cfg.model.dtype == "float32" else 3e-2)
    ref_model = None
    if method.reference_copy and (objective.uses_reference or cfg.eval.kl):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the base, frozen
    base_params = model_info(model)["params"]
    if auto_k(cfg.method.layers) is not None:  # measure which layers to adapt, then record the choice
        k = auto_k(cfg.method.layers)
        scores = layer_scores(model, cfg, objective, data.train, tokenizer.pad_token_id, resolve_model(cfg.model.name))
        cfg.method.layers = choose_layers(scores, k)
        log(f"layers auto:{k}: chose {cfg.method.layers} by adapter gradient norm")
        if acc.is_main_process:
            atomic_write_json(run_dir / "layer_choice.json", {
                "spec": f"auto:{k}", "chosen": cfg.method.layers, "batches": cfg.method.auto_layers_batches,
                "measure": "L2 norm of d loss / d (adapter parameters of the layer) at initialisation",
                "scores": {str(k_): v for k_, v in scores.items()}})
    model = apply_method(model, cfg.method, resolve_model(cfg.model.name), tc.gradient_checkpointing)
    if tc.fsdp and acc.num_processes > 1:
        model = distributed.shard(model, acc, log)  # before the optimizer sees the parameters

    rows0, batches0 = epoch_rows(data.train, cfg, 0, objective)
    steps_per_epoch = max(1, len(batches0) // (tc.grad_accum * acc.num_processes))
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    warmup = tc.warmup_steps or int(tc.warmup_ratio * total_steps)
    optimizer = make_optimizer(model.parameters(), tc, total_steps, warmup)
    scheduler = make_scheduler(optimizer, tc, total_steps, warmup)
    if distributed.is_sharded(model):
        optimizer = acc.prepare(optimizer)
    else:
        model, optimizer = acc.prepare(model, optimizer)
    model.train()
    set_mode(optimizer, True)
    if acc.num_processes > 1:  # same initial weights everywhere (seeded above), but each process
        seed_everything(tc.seed + 1000 * acc.process_index)  # draws its own dropout masks from here

    loop = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "train_s": 0.0, "stopper": None}
    if ckpt is not None:
        load = distributed.load_sharded if distributed.is_sharded(model) else load_checkpoint
        loop = load(ckpt, acc.unwrap_model(model), optimizer, scheduler, acc.process_index)
        log(f"resumed from {ckpt} at step {loop['step']}")
    own = []
    if acc.is_main_process:
        own = [RunLog(run_dir, loop["step"] if ckpt is not None else None), Progress(total_steps, tc.progress)]
        own += make_trackers(tc.report_to, run_dir, cfg.to_dict())
        if ckpt is None:
            cfg.save(run_dir / "config.yaml")
            atomic_write_json(run_dir / "data_stats.json", data.stats)
    # the base's hidden states at evaluated positions, on disk: `slimtune eval` and later runs reuse them
    states = base_states(cfg.model.name, cfg.model.dtype, str(acc.device), method_of(cfg.method.name).four_bit)
    s = Session(cfg=cfg, acc=acc, model=model, tokenizer=tokenizer, objective=objective, data=data,
                ref_model=ref_model, optimizer=optimizer, scheduler=scheduler, run_dir=run_dir,
                total_steps=total_steps, params=trainable_report(model), base_params=base_params,
                stopper=Stopper(tc, loop.get("stopper")),
                callbacks=own + (list(callbacks) if acc.is_main_process else []),
                timer=timer, loop=loop, resumed_s=loop["train_s"] if ckpt is not None else 0.0,
                amp=Precision(tc.mixed_precision, acc.device.type, log),
                ref_caches={"val": states if objective.spec.evaluation == "heldout" else {}, "general": states})
    s.amp.load_state_dict(loop.get("amp"))
    s.rows, s.batches = epoch_rows(data.train, cfg, loop["epoch"], objective)
    objective.before_training(model, data.train, tokenizer.pad_token_id, ref_model)
    s.setup_s = timer()
    if s.main:
        log(f"model {cfg.model.name}: {base_params:,} parameters; method {cfg.method.name}: "
            f"{s.params['trainable']:,} trainable ({s.params['percent']:.3f}%); objective {objective.name}")
        log(f"data: {len(data.train)} train / {len(data.val)} held-out examples, "
            f"{data.stats['train']['trained_tokens']:,} trained tokens; {total_steps} steps")
    s.loop["first_eval"] = evaluate(s) if ckpt is None else loop.get("first_eval", {})
    s.last_eval = s.loop["first_eval"]
    s.train_timer = Timer(loop["train_s"])
    return s


def step(s: Session) -> dict:
    """One optimizer step: grad_accum micro-batches on every process; returns the logged row."""
    tc, acc, loop = s.cfg.train, s.acc, s.loop
    need = tc.grad_accum * acc.num_processes
    if loop["batch"] + need > len(s.batches):
        loop["epoch"] += 1
        loop["batch"] = 0
        s.rows, s.batches = epoch_rows(s.data.train, s.cfg, loop["epoch"], s.objective)
    group = s.batches[loop["batch"]: loop["batch"] + need]
    loop["batch"] += need
    mine = group[acc.process_index::acc.num_processes]
    if s.objective.generates:
        # rows made during the step (completions sampled from the model now): their units are
        # known only where they were made, so the processes add theirs up
        batches = [s.objective.begin_step(s.model, [s.rows[i] for i in idx], loop["step"], s.ref_model)
                   for idx in mine]
        counted = _all_reduce(acc, {"units": sum(s.objective.units(b) for b in batches),
                                    "tokens": sum(s.objective.tokens(b) for b in batches)})
        units, tokens = counted["units"], int(counted["tokens"])
    else:
        batches = [[s.rows[i] for i in idx] for idx in mine]
        units = sum(s.objective.units([s.rows[i] for i in idx]) for idx in group)  # all processes
        tokens = sum(s.objective.tokens([s.rows[i] for i in idx]) for idx in group)
    micro = [piece for rows in batches for piece in s.objective.split(rows, tc.micro_batch_tokens)]
    sums = accumulate_grads(s.model, micro, units, s.tokenizer.pad_token_id, s.objective, loop["step"],
                            s.ref_model, acc, s.amp)
    s.amp.unscale(s.optimizer)  # fp16: true gradients before clipping
    grad_norm = distributed.clip_grads(s, tc.grad_clip)
    lr = s.scheduler.get_last_lr()[0]  # the lr this step used
    s.amp.step(s.optimizer)  # fp16: skipped (and counted) when gradients overflowed
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    sums = _all_reduce(acc, sums)
    row = s.objective.summarize(sums, units, loop["step"])
    loop["step"] += 1
    loop["tokens"] += tokens
    elapsed = s.train_timer()
    # the wall-clock cap counts setup and evaluations too; the main process's clock decides
    wall = _agreed(s, s.timer() + s.resumed_s)
    s.stopper.after_step(loop["step"], row["loss"], wall)
    s.last_logged = {"step": loop["step"], "epoch": round(loop["epoch"] + loop["batch"] / max(1, len(s.batches)), 3),
                     **row, "lr": lr, "grad_norm": grad_norm, "tokens": loop["tokens"],
                     "tokens_per_s": loop["tokens"] / max(1e-9, elapsed), "elapsed_s": elapsed,
                     **({"skipped_steps": s.amp.skipped} if s.amp.scaler else {})}
    return s.last_logged


def accumulate_grads(model, micro: list[list[dict]], units: float, pad_id: int, objective: Objective,
                     step: int = 0, ref_model=None, acc=None, amp: Precision | None = None) -> dict[str, float]:
    """Backward over this process's micro-batches; returns the sums of their `StepOut.sums`.

    Every micro-batch's loss is divided by `units`, the normalising units of the whole accumulated
    batch on all processes, so 4 micro-batches of 2 give the gradient of one batch of 8. DDP
    averages gradients over processes; dividing by units / world_size turns that into a sum.
    """
    world = acc.num_processes if acc else 1
    device = acc.device if acc else next(model.parameters()).device
    sums: dict[str, float] = {}
    amp = amp or Precision()
    for j, rows in enumerate(micro):
        batch = {k: v.to(device) for k, v in objective.collate(rows, pad_id).items()}
        last = j == len(micro) - 1
        with acc.no_sync(model) if acc and not last else nullcontext():  # sync once per step
            with amp.autocast(model):  # train.mixed_precision: forward and loss
                out = objective(model, batch, units / world, step, ref_model)
            amp.backward(out.loss, acc)
        for k, v in out.sums.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums


def _all_reduce(acc, sums: dict[str, float]) -> dict[str, float]:
    """Sums over processes (the identity on one)."""
    if acc.num_processes == 1:
        return sums
    keys = sorted(sums)
    t = acc.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device), "sum")
    return dict(zip(keys, t.tolist()))


def _agreed(s: Session, value: float | None) -> float | None:
    """The main process's value on every process, so decisions taken from it agree."""
    if s.acc.num_processes == 1 or value is None:
        return value

    return float(broadcast(torch.tensor([value], dtype=torch.float64, device=s.acc.device), 0)[0])


def evaluate(s: Session) -> dict:
    """Held-out metrics of the objective, and KL to base on the general prompts; logs the row."""
    cfg, model = s.cfg, s.model
    set_mode(s.optimizer, False)
    ev = s.objective.evaluate(model, s.data.val, s.tokenizer.pad_token_id, cfg.eval.batch_size, s.ref_model,
                              cfg.eval.max_examples, kl=cfg.eval.kl, ref_cache=s.ref_caches["val"])
    gen = heldout_metrics(model, s.data.general, s.tokenizer.pad_token_id, cfg.loss, cfg.eval.batch_size,
                          cfg.eval.max_examples, kl=True, ref_model=s.ref_model,
                          ref_cache=s.ref_caches["general"]) if cfg.eval.kl and s.data.general else {}
    set_mode(s.optimizer, True)
    row = {"step": s.loop["step"], **ev, "general_kl": gen.get("kl")}
    if ev or gen:
        s.emit(row)
    s.last_eval = row
    return row


def checkpoint(s: Session) -> None:

    states = gather_object([rng_state()]) if s.acc.num_processes > 1 else [rng_state()]
    model, optimizer = distributed.gathered(s)  # FSDP: full tensors from the shards (every process)
    if s.main:
        s.loop.update(train_s=s.train_timer(), stopper=s.stopper.state(), amp=s.amp.state_dict())
        path = save_checkpoint(s.run_dir, s.loop["step"], model, optimizer, s.scheduler,
                               s.loop, s.cfg.train.keep_checkpoints, states)
        for cb in s.callbacks:
            cb.on_checkpoint(s.loop["step"], path)
    s.acc.wait_for_everyone()


def finish(s: Session, log=print) -> dict:
    """Final evaluation, then the adapter (or model), tokenizer, metrics and summary."""
    train_s = s.train_timer()
    n = s.loop["step"]
    if s.stopper.reason and s.main:
        log(f"stopping early at step {n}: {s.stopper.reason}")
    if s.last_eval.get("step") != n:
        evaluate(s)
    set_mode(s.optimizer, False)
    summary = {}
    state = distributed.full_state_dict(s) if distributed.is_sharded(s.model) else None  # every process
    if s.main:
        final = s.acc.unwrap_model(s.model)
        final.save_pretrained(s.run_dir, safe_serialization=True, **({"state_dict": state} if state else {}))
        s.tokenizer.save_pretrained(s.run_dir)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        tokens = s.loop["tokens"]
        times = {"setup_s": round(s.setup_s, 2), "train_s": round(train_s, 2), "total_s": round(s.timer(), 2),
                 "steps": n, "steps_per_s": round(n / max(1e-9, train_s), 4),
                 "trained_tokens": tokens, "trained_tokens_per_s": round(tokens / max(1e-9, train_s), 1),
                 "peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": peak}
        atomic_write_json(s.run_dir / "time_metrics.json", times)
        summary = {"run_dir": str(s.run_dir), "method": s.cfg.method.name, "objective": s.objective.name,
                   "steps": n, "stopped": s.stopper.reason or "completed", "params": s.params,
                   "before": _metrics(s.loop["first_eval"]), "after": _metrics(s.last_eval),
                   "last_train": s.last_logged, "time": times,
                   "final_eval": _eval_context(s, n),
                   "chat_command": f"slimtune chat {s.run_dir}"}
        atomic_write_json(s.run_dir / "summary.json", summary)
        for cb in s.callbacks:
            cb.on_end(summary)
        log(format_summary(summary))
    s.acc.wait_for_everyone()
    return summary


def _eval_context(s: Session, step: int) -> dict:
    """What `slimtune eval` must match to take the "after" metrics as its own held-out numbers
    instead of measuring them again: the saved weights and how they were evaluated."""

    cfg = s.cfg
    return {"step": step, "weights_sha256": weights_digest(s.run_dir), "dtype": cfg.model.dtype,
            "device": torch.device(s.acc.device).type, "mixed_precision": cfg.train.mixed_precision,
            "max_examples": cfg.eval.max_examples, "batch_size": cfg.eval.batch_size,
            "general_prompts": cfg.data.general_prompts, "processes": s.acc.num_processes}


def _metrics(row: dict) -> dict:
    return {"eval_loss": None, "eval_ppl": None, "eval_kl": None, "general_kl": None,
            **{k: v for k, v in row.items() if k != "step"}}


def format_summary(s: dict) -> str:
    b, a, t, p = s["before"], s["after"], s["time"], s["params"]
    f = (lambda v, d=4: "n/a" if v is None else f"{v:.{d}f}")
    lines = [
        "", "== slimtune summary ==",
        f"steps          {s['steps']} ({s['stopped']})",
        f"held-out loss  {f(b['eval_loss'])} -> {f(a['eval_loss'])}"
        + (f"   (ppl {f(b['eval_ppl'], 2)} -> {f(a['eval_ppl'], 2)})" if a.get("eval_ppl") is not None else ""),
        f"KL to base     held-out {f(a['eval_kl'])}   general prompts {f(a['general_kl'])}",
        *([f"preference     held-out accuracy {f(b['eval_pref_accuracy'], 3)} -> {f(a['eval_pref_accuracy'], 3)}   "
           f"margin {f(b.get('eval_pref_margin'))} -> {f(a.get('eval_pref_margin'))}   "
           f"reward accuracy {f(a.get('eval_accuracy'), 3)}"] if "eval_pref_accuracy" in a else []),
        *([f"teacher        KL(teacher || student) {f(b['eval_kl_teacher'])} -> {f(a['eval_kl_teacher'])}   "
           f"greedy agreement {f(b.get('eval_agreement'), 3)} -> {f(a.get('eval_agreement'), 3)}   "
           f"teacher's loss {f(a.get('eval_teacher_loss'))}"] if "eval_kl_teacher" in a else []),
        *([f"reward         held-out mean {f(b.get('eval_reward'))} -> {f(a.get('eval_reward'))} (greedy)   "
           f"length {f(b.get('eval_length'), 1)} -> {f(a.get('eval_length'), 1)} tokens"] if "eval_reward" in a else []),
        f"trainable      {p['trainable']:,} of {p['total']:,} parameters ({p['percent']:.3f}%)",
        f"speed          {t['trained_tokens_per_s']:,.0f} trained tokens/s, {t['train_s']:.0f} s training, "
        f"{t['total_s']:.0f} s total, peak RSS {t['peak_rss_mb']:,.0f} MiB",
        f"adapter        {s['run_dir']}",
        f"chat with it   {s['chat_command']}",
    ]
    return "\n".join(lines)
