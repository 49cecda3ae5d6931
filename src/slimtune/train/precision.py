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

What autocast alone leaves slow, and `autocast(model)` changes (measured on a 2-core Xeon with AMX,
the quickstart: see BENCHMARKS.md, "Precision"):
- a frozen weight is cast again at every call (autocast caches only weights that require grad):
  `frozen_in` casts each frozen Linear weight once for the run, the same rounding autocast does;
- PEFT casts a LoRA layer's input back to the adapter's float32 and autocast casts it down again:
  switched off for the block, the values are the same;
- on a CPU, bf16 attention's backward is ~2x slower than float32's at training shapes (head dim
  64, a few hundred tokens): attention that will be differentiated runs in float32 there
  (`ATTENTION`, `use_fp32_attention`); generation and evaluation keep bf16 attention.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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
        self._frozen: dict = {}
        """Module -> (its float32 weight, that weight in self.dtype): made once, frozen weights never change."""

    def autocast(self, model=None):
        """torch.autocast for the mode; with `model`, its frozen weights cast once and PEFT's input
        casts off for the block (see the module doc). Nothing for mode "no"."""
        if self.dtype is None:
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype))
        if model is not None:
            stack.enter_context(frozen_in(model, self.dtype, self._frozen))
            stack.enter_context(peft_input_casts_off(model))
        return stack

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


@contextmanager
def frozen_in(net, dtype: torch.dtype, cache: dict | None = None, frozen_only: bool = True):
    """Every float32 `nn.Linear` weight of `net` that does not train, in `dtype` for the block.

    Autocast casts such a weight at every call (it keeps only casts of weights that require
    grad); this is the same rounding done once. `cache` keeps the casts between blocks (training:
    frozen weights never change). Left alone: weights that train (unless `frozen_only=False`, for
    inference), an unmerged DoRA layer's (its weight norm would see the rounded weight), sharded
    (FSDP) ones. Restored on exit; a tied head gets its own copy, the embedding table stays float32.
    """
    from torch.distributed.tensor import DTensor

    skip = {id(sub) for m in net.modules() if len(getattr(m, "lora_magnitude_vector", ())) and not m.merged
            for sub in m.modules()}
    saved = []
    for m in net.modules():
        w = getattr(m, "weight", None)
        if (not isinstance(m, torch.nn.Linear) or w is None or w.dtype != torch.float32 or id(m) in skip
                or (frozen_only and w.requires_grad) or isinstance(w.data, DTensor)):
            continue
        hit = cache.get(m) if cache is not None else None
        if hit is None or hit[0] is not w:
            hit = (w, torch.nn.Parameter(w.detach().to(dtype), requires_grad=False))
            if cache is not None:
                cache[m] = hit
        saved.append((m, w, hit[1]))
    try:
        for m, _, low in saved:
            m.weight = low
        yield
    finally:
        for m, w, _ in saved:
            m.weight = w


@contextmanager
def peft_input_casts_off(net):
    """PEFT's tuner layers cast their input to the adapter's dtype (float32 here) before the adapter
    matmul, which autocast then casts back down: off for the block (`cast_input_dtype_enabled`)."""
    layers = [m for m in net.modules() if getattr(m, "cast_input_dtype_enabled", None) is True]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.cast_input_dtype_enabled = True


ATTENTION = "slimtune_sdpa"
"""An attention implementation registered with transformers: PyTorch SDPA, in float32 where a CPU
under bf16 autocast would differentiate it (bf16's backward is the slow one), plain SDPA elsewhere."""


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    groups = getattr(attention_mask, "slimtune_groups", None)
    attend = sdpa_attention_forward if groups is None else partial(_grouped, groups)
    if (query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = attend(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return out.to(torch.bfloat16), weights
    return attend(module, query, key, value, attention_mask, **kwargs)


def with_groups(mask: torch.Tensor, groups: dict) -> torch.Tensor:
    """`mask` (batching.pack_shared_prefix's) carrying its group layout, so that `ATTENTION` computes
    `grouped_attention` instead of attending over the whole masked (T, T); transformers hands a
    prepared 4-D mask to the attention function as it is (any other attention ignores the layout)."""
    mask.slimtune_groups = groups.to(mask.device)
    return mask


def _grouped(groups, module, query, key, value, attention_mask, scaling=None, **kwargs):
    return grouped_attention(query, key, value, groups, scaling), None


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: dict, scale: float | None = None
                      ) -> torch.Tensor:
    """Attention over pack_shared_prefix rows [prompt, c_1, ..., c_G] as its mask defines it (each
    completion sees the prompt and itself), without the masked sibling blocks: the prompts (R, Pm)
    causal, then each completion's (Lm,) queries against [its prompt's keys, its own keys].
    q (R, H, T, D), k / v (R, KV, T, D); groups: `batching._group_layout`. Returns (R, T, H, D), the
    layout transformers' attention functions return. Work: R Pm^2 + C Lm (Pm + Lm) against R T^2."""
    R, H, T, D = q.shape
    Pm, at = groups["pm"], groups["at"]
    gqa = H != k.shape[1]
    op = F.scaled_dot_product_attention(q[:, :, :Pm], k[:, :, :Pm], v[:, :, :Pm], attn_mask=groups["pmask"],
                                        scale=scale, enable_gqa=gqa)                  # (R, H, Pm, D)

    def gather(x):  # (R, h, T, D) -> (C, h, Lm, D): each completion's tokens
        return x.transpose(1, 2).flatten(0, 1)[at].transpose(1, 2)

    kc = torch.cat([k[:, :, :Pm][groups["row"]], gather(k)], dim=2)                  # (C, KV, Pm + Lm, D)
    vc = torch.cat([v[:, :, :Pm][groups["row"]], gather(v)], dim=2)
    oc = F.scaled_dot_product_attention(gather(q), kc, vc, attn_mask=groups["cmask"], scale=scale,
                                        enable_gqa=gqa)                               # (C, H, Lm, D)
    flat = torch.cat([op.transpose(1, 2).flatten(0, 1), oc.transpose(1, 2).flatten(0, 1)])  # (R Pm + C Lm, H, D)
    return flat[groups["src"]].view(R, T, H, D)


def use_fp32_attention(model, mode: str, device: str, log=None) -> bool:
    """Switch a model that uses SDPA to `ATTENTION` when training runs bf16 autocast on a CPU.
    Returns whether it did (models without transformers' attention interface keep theirs)."""
    if mode != "bf16" or str(device).split(":")[0] != "cpu":
        return False
    return use_attention(model, log)


def use_attention(model, log=None) -> bool:
    """Switch a model that uses transformers' SDPA to `ATTENTION` (the same SDPA, with the fp32
    backward of `use_fp32_attention` and `grouped_attention` for a mask that carries its groups).
    Returns whether the model computes with it now."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "_attn_implementation", None) == ATTENTION:
        return True
    if getattr(getattr(base, "config", None), "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, _sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    try:
        base.set_attn_implementation(ATTENTION)
    except Exception as e:  # an architecture that cannot switch: autocast's bf16 attention, correct, slower
        if log:
            log(f"note: attention stays transformers' SDPA ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return False
    return True
