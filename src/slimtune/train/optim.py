"""Optimizers (adamw, adafactor, lion, schedulefree) and the warm-up + decay schedule."""

from __future__ import annotations

import math

import torch
from transformers.optimization import Adafactor

from ..config import TrainCfg
from ..errors import ConfigError


def make_optimizer(params, cfg: TrainCfg, total_steps: int, warmup: int) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: the method left no parameter trainable")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms, biases, IA3 vectors: no weight decay
    # one group per tensor type too: FSDP's sharded DTensors and its replicated plain tensors
    # (embedding, LM head) cannot share a foreach kernel
    groups = [{"params": [p for p in ps if type(p.data) is kind], "weight_decay": wd}
              for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0))
              for kind in dict.fromkeys(type(p.data) for p in ps)]
    betas = tuple(cfg.betas)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, foreach=True)
    if cfg.optimizer == "adafactor":
        return Adafactor(groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if cfg.optimizer == "lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise ConfigError("train.optimizer=lion needs: pip install lion-pytorch") from None
        return Lion(groups, lr=cfg.lr, betas=betas[:2])
    if cfg.optimizer == "schedulefree":
        try:
            import schedulefree
        except ImportError:
            raise ConfigError("train.optimizer=schedulefree needs: pip install schedulefree") from None
        # Schedule-free replaces the decay schedule; it keeps its own warm-up.
        return schedulefree.AdamWScheduleFree(groups, lr=cfg.lr, betas=betas, warmup_steps=warmup)
    raise ConfigError(f"unknown optimizer {cfg.optimizer}")


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based): linear warm-up, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(opt, cfg: TrainCfg, total_steps: int, warmup: int):
    if cfg.optimizer == "schedulefree":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio))


def set_mode(opt, train: bool) -> None:
    """Schedule-free keeps two parameter sequences: switch to the averaged one for eval/save."""
    if hasattr(opt, "train") and hasattr(opt, "eval") and callable(getattr(opt, "eval")):
        opt.train() if train else opt.eval()
