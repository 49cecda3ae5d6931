"""The machine a run trains on: one device, DDP, or FSDP2 over several processes.

    acc = make_accelerator(cfg)        train.device (auto: cuda > mps > cpu) -> an Accelerator
    model = shard(model, acc)          train.fsdp under a multi-process launch: FSDP2
    norm = clip_grads(s, max_norm)     FSDP: replicated gradients averaged first; any: clipped
    model, opt = gathered(s)           what a checkpoint saves (full tensors; every process calls)
    load_sharded(path, model, ...)     resume under FSDP

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder layer and the rest of the model
over the processes, so each holds 1/N of the weights, gradients and optimizer state, and gathers a
layer's weights only while it runs. The embedding and the LM head are NOT sharded (`ignored_params`,
replicated like DDP): the chunked loss applies the LM head outside the model's forward, where a
sharded head would be a 1/N slice, and tied embeddings share that weight. Their gradients (full
fine-tuning) are averaged over processes here, as FSDP averages the sharded ones.

Checkpoints under FSDP hold full tensors, gathered from the shards when saving (every process
takes part; the main one writes: simple and correct, at the cost of a full copy of the trained
weights and optimizer state in every process's CPU memory while it is written) and cut into shards again on resume. Resume under the same kind of launch:
full fine-tuning under FSDP keeps the replicated weights in optimizer groups of their own
(optim.py), so its optimizer state does not load into an unsharded run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from ..errors import ConfigError
from ..machine import pick_device, prepare_mps
from ..methods import base_of, method_of
from ..readback import read_json, read_safetensors
from .checkpoint import join_optimizer, set_rng
from .forward import decoder_of


def make_accelerator(cfg):
    """An Accelerator on the chosen device; refuses launches slimtune cannot train under."""


    device = pick_device(cfg.train.device)
    if device == "mps":
        prepare_mps()
    acc = Accelerator(cpu=device == "cpu", mixed_precision="no")  # autocast is ours (precision.py)
    kind = acc.distributed_type.name
    if kind in ("FSDP", "DEEPSPEED"):
        raise ConfigError(f"{kind} launches are not used: slimtune shards the model itself. Launch with "
                          "`accelerate launch --multi_gpu` (or torchrun) and set train.fsdp=true")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no" and cfg.train.mixed_precision == "no" and acc.is_main_process:
        print(f"warning: accelerate's --mixed_precision {launched} is not used; set "
              f"train.mixed_precision={launched} instead", file=sys.stderr)
    if cfg.train.fsdp:
        check_fsdp(cfg, acc.num_processes)
    return acc


def check_fsdp(cfg, processes: int) -> None:
    """What train.fsdp cannot be combined with (yet), said before any model loads."""

    if method_of(cfg.method.name).four_bit:
        raise ConfigError("train.fsdp with method.name=qlora: bitsandbytes' packed 4-bit weights are not "
                          "sharded here; use DDP (train.fsdp=false), which QLoRA's small memory suits")
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.fsdp with train.mixed_precision=fp16: the loss scaler would decide on each "
                          "process's shard alone; use train.mixed_precision=bf16")
    if processes == 1:
        print("note: train.fsdp with one process: nothing to shard, training unsharded", file=sys.stderr)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def replicated_params(model) -> set:
    """The embedding and LM head weights (one tensor when tied): kept whole on every process."""

    base = base_of(model)
    return {m.weight for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None}


def shard(model, acc, log=print):
    """FSDP2: one unit per decoder layer, then the root (norm and anything left); the embedding
    and LM head replicated. Returns the model (now an FSDPModule) on acc.device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard


    model.to(acc.device)
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise ConfigError(f"train.fsdp: cannot find the decoder layers of {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=replicated_params(model))
    # FSDP allocates its gather buffers on the first forward; evaluation runs under inference_mode,
    # whose tensors training could not write into later, so the first forward happens here.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=acc.device), use_cache=False)
    # A forward without backward leaves the root's weights gathered, and model.parameters() would
    # then hand the optimizer the gathered copies instead of the shards it must update.
    model.reshard()
    if acc.is_main_process:
        log(f"FSDP2: {len(layers)} decoder layers + the rest sharded over {acc.num_processes} processes; "
            "embedding and LM head replicated")
    return model


def clip_grads(s, max_norm: float | None) -> float | None:
    """Average replicated gradients over processes (FSDP), then clip the global norm; returns it."""
    model, acc = s.model, s.acc
    if not is_sharded(model):
        return float(acc.clip_grad_norm_(model.parameters(), max_norm)) if max_norm else None
    from torch.distributed.tensor import DTensor

    local = torch.zeros((), dtype=torch.float64, device=acc.device)
    shared = torch.zeros((), dtype=torch.float64, device=acc.device)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for g in grads:
        if isinstance(g, DTensor):
            local += g.to_local().double().pow(2).sum()
        else:
            torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.AVG)
            shared += g.double().pow(2).sum()
    torch.distributed.all_reduce(local)  # sum of the shards' squares = the sharded part
    norm = float((local + shared).sqrt())
    if max_norm and norm > max_norm:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(max_norm / (norm + 1e-6))
    return norm if max_norm else None


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


class _Gathered:
    """Stands in for the model and optimizer in `save_checkpoint`: full tensors."""

    def __init__(self, named: list, opt_state: dict | None = None):
        self.named, self.opt_state = named, opt_state

    def named_parameters(self):
        return iter(self.named)

    def state_dict(self):
        return self.opt_state


def gathered(s):
    """(model, optimizer) as save_checkpoint reads them. FSDP: trainable weights and optimizer
    state gathered into full tensors (a collective: every process calls, in the same order)."""
    model = s.acc.unwrap_model(s.model)
    if not is_sharded(s.model):
        return model, s.optimizer
    s.model.reshard()  # the root's shards, not a copy gathered by an evaluation forward
    named = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            named.append((n, _full(p).requires_grad_(True)))
    sd = s.optimizer.state_dict()
    state = {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items()} for i, st in sd["state"].items()}
    return _Gathered(named), _Gathered([], {"state": state, "param_groups": sd["param_groups"]})


def full_state_dict(s) -> dict | None:
    """The model's full state dict on the main process (None elsewhere); FSDP only. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(s.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if s.acc.is_main_process else None


def load_sharded(path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """`checkpoint.load_checkpoint` under FSDP: from full tensors, each process keeps its shard."""

    from torch.distributed.tensor import DTensor, distribute_tensor


    def place(t, like):
        if isinstance(like, DTensor):
            return distribute_tensor(t.to(like.device, like.dtype), like.device_mesh, like.placements)
        return t.to(like.device, like.dtype)

    path = Path(path)
    fix = "delete this checkpoint folder to resume from the one before it"
    trained = read_safetensors(path / "trainable.safetensors", fix)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in trained.items():
            if n not in params:
                raise RuntimeError(f"checkpoint {path} does not match this model (e.g. {n})")
            p = params[n]
            placed = place(t, p)
            (p.to_local() if isinstance(p, DTensor) else p).copy_(
                placed.to_local() if isinstance(placed, DTensor) else placed)
    meta = read_json(path / "state.json", fix)
    sd = join_optimizer(read_safetensors(path / "optimizer.safetensors", fix), meta["optimizer"])
    order = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == order[i].shape:
                st[k] = place(v, order[i])
    optimizer.load_state_dict(sd)
    scheduler.load_state_dict(meta["scheduler"])
    set_rng(read_safetensors(path / "rng.safetensors", fix), meta["python_rng"], rank)
    return meta["loop"]
