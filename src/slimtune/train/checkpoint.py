"""Resumable checkpoints, written atomically, in safetensors + JSON (no pickles).

    RUN/checkpoints/step-000040/
        trainable.safetensors   trained parameters by name
        optimizer.safetensors   optimizer state tensors ("<param index>.<key>")
        rng.safetensors         every process's torch CPU and CUDA RNG states ("torch.<rank>",
                                "cuda.<rank>.<device>"), so dropout continues exactly on resume
        state.json              optimizer non-tensor state and groups, scheduler, loop position,
                                early-stop counters, every process's python RNG
    RUN/checkpoints/latest      name of the newest complete checkpoint

A checkpoint folder is renamed into place only when complete, and `latest` is replaced
atomically after it, so a run killed at any moment resumes from the last complete one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import SlimtuneError
from ..readback import check_safetensors, read_json, read_safetensors
from ..utils import atomic_dir, atomic_write_text


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {}
    for idx, st in sd["state"].items():
        rest[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().clone().contiguous()
            else:
                rest[str(idx)][k] = v
    return tensors, {"state": rest, "param_groups": sd["param_groups"]}


def join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    """This process's random states: torch CPU, every CUDA device, python."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def set_rng(tensors: dict, pythons: list, rank: int) -> None:
    if f"torch.{rank}" not in tensors:  # saved by fewer processes than now run: share rank 0's
        rank = 0
    torch.set_rng_state(tensors[f"torch.{rank}"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith(f"cuda.{rank}."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    v, internal, gauss = pythons[min(rank, len(pythons) - 1)]
    random.setstate((v, tuple(internal), gauss))


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, loop_state: dict,
                    keep: int = 1, rng_states: list[dict] | None = None) -> Path:
    """Write RUN/checkpoints/step-N atomically. rng_states: every process's `rng_state()`, by rank
    (default: this process's alone)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    trainable = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    with atomic_dir(final) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        states = rng_states or [rng_state()]
        rng = {f"torch.{r}": st["torch"] for r, st in enumerate(states)}
        rng.update({f"cuda.{r}.{d}": t for r, st in enumerate(states) for d, t in enumerate(st["cuda"])})
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = {"step": step, "loop": loop_state, "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(), "python_rng": [st["python"] for st in states]}
        (tmp / "state.json").write_text(json.dumps(meta, default=_jsonable))
    atomic_write_text(root / "latest", final.name)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for junk in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(junk, ignore_errors=True)
    return final


def _jsonable(o):
    if isinstance(o, tuple):
        return list(o)
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"cannot save {type(o).__name__} in a checkpoint")


FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


def latest_checkpoint(run_dir: str | Path, log=None) -> Path | None:
    """The newest checkpoint whose files read back whole; a damaged newer one is skipped, and
    `log` says which and why (resume then repeats the steps since the one it falls back to)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").exists()]
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if named in done:  # the pointer's checkpoint first, then the others newest first
            done.remove(named)
            done.append(named)
    for path in reversed(done):
        try:
            verify_checkpoint(path)
            return path
        except SlimtuneError as e:
            if log:
                log(f"resume: skipping {path.name}: {e}")
    return None


def verify_checkpoint(path: Path) -> None:
    """Raise a SlimtuneError if any file of the checkpoint is truncated or corrupt."""
    fix = "an older checkpoint is used if there is one; delete this folder to silence this"
    for name in FILES:
        if (path / name).exists() or name != "rng.safetensors":
            check_safetensors(path / name, fix)
    read_json(path / "state.json", fix)


def load_checkpoint(path: str | Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore trained parameters, optimizer, scheduler and this process's (`rank`) RNG states;
    returns the loop state."""
    path = Path(path)
    fix = "delete this checkpoint folder to resume from the one before it"
    trained = read_safetensors(path / "trainable.safetensors", fix)
    params = dict(model.named_parameters())
    missing = [n for n in trained if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match this model (e.g. {missing[0]}); "
                           "was the method or model changed? Start a new output_dir instead")
    with torch.no_grad():
        for n, t in trained.items():
            params[n].copy_(t)
    meta = read_json(path / "state.json", fix)
    optimizer.load_state_dict(join_optimizer(read_safetensors(path / "optimizer.safetensors", fix), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    set_rng(read_safetensors(path / "rng.safetensors", fix), meta["python_rng"], rank)
    return meta["loop"]
