"""Mixed precision: `train.mixed_precision: no | bf16 | fp16`.

    with amp.autocast():           forward and loss: matmuls in bf16/fp16 (torch.autocast)
        loss = ...
    amp.backward(loss, acc)        fp16: the loss is scaled first, so small gradients survive
    amp.unscale(optimizer)         gradients back to their true size (before clipping)
    skipped = amp.step(optimizer)  fp16: a step whose gradients hold inf/nan is skipped and the
                                   scale halved (torch.amp.GradScaler); otherwise optimizer.step()

Weights that train (adapters, or every weight in full fine-tuning) and the optimizer state stay
float32: autocast casts copies for the matmuls, never the parameters. The chunked loss computes
its softmax in float32 whatever the matmul dtype (losses.py). bf16 has float32's range, so it
needs no scaling; fp16 does (its largest value is 65504, its smallest normal 6e-5).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from ..errors import ConfigError
from ..machine import bf16_supported

MIXED = ("no", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast and (fp16) loss scaling for one device; `Precision("no", ...)` changes nothing."""

    def __init__(self, mode: str = "no", device: str = "cpu", log=None):
        if mode not in MIXED:
            raise ConfigError(f"train.mixed_precision={mode!r} is not valid; choose one of: {', '.join(MIXED)}")
        self.mode, self.device_type = mode, str(device).split(":")[0]
        self.dtype = DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None
        self.skipped = 0
        """Steps skipped because their fp16 gradients overflowed."""
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, acc=None) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        acc.backward(loss) if acc is not None else loss.backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """optimizer.step(), or (fp16) the scaler's step; returns True when the step was skipped."""
        if self.scaler is None:
            optimizer.step()
            return False
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)   # skips optimizer.step() if any gradient is inf/nan
        self.scaler.update()          # halves the scale after a skip, grows it after 2000 good steps
        skipped = self.scaler.get_scale() < before
        if skipped:
            self.skipped += 1
            self.log(f"fp16: gradients overflowed, step skipped (loss scale {before:g} -> {self.scaler.get_scale():g})")
        return skipped

    def state_dict(self) -> dict:
        return {"scale": self.scaler.get_scale(), "skipped": self.skipped} if self.scaler else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": float(state["scale"])})
            self.skipped = int(state.get("skipped", 0))


def check_precision(mode: str, device: str, weights_dtype: str) -> None:
    """Refuse combinations that cannot work, before any model loads; warn about slow ones."""

    if mode != "no" and weights_dtype in ("bfloat16", "float16"):
        raise ConfigError(f"train.mixed_precision={mode} with model.dtype={weights_dtype}: autocast is for "
                          "float32 weights; set model.dtype=float32 (trained weights stay fp32) or "
                          "train.mixed_precision=no")
    kind = str(device).split(":")[0]
    if mode == "bf16" and not bf16_supported(device):
        if kind != "cpu":
            raise ConfigError(f"train.mixed_precision=bf16: this {kind} has no bf16 support (GPUs before "
                              "Ampere, MPS before macOS 14); use train.mixed_precision=fp16 or no")
        print("warning: this CPU has no native bf16 (AVX512-BF16 / AMX): bf16 autocast is emulated and "
              "slower than float32", file=sys.stderr)
