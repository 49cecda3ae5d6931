"""Which device trains, and what that device can do: 4-bit bases, bf16, MPS fallbacks.

    pick_device("auto")  -> "cuda" if a CUDA GPU, else "mps" (Apple silicon), else "cpu"
    four_bit_support(d)  -> the compute dtype bitsandbytes NF4 runs in on d (float32 on CPU,
                            bfloat16 on CUDA, float16 on CUDA without bf16), or a SlimtuneError
                            saying why d cannot hold a 4-bit base

Every check asks the machine (torch's availability flags, one tiny bitsandbytes quantisation),
never a table of device names, so a newer bitsandbytes that learns a device needs no change here.
Batches reach the device with a plain `.to(device)`: nothing pins host memory (which MPS, sharing
memory with the CPU, has no use for).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache

import torch

from .config import DEVICES
from .errors import ConfigError, SlimtuneError


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(want: str = "auto") -> str:
    """'auto' -> cuda > mps > cpu; an explicit choice is checked against the machine."""
    if want not in DEVICES:
        raise ConfigError(f"train.device={want!r} is not valid; choose one of: {', '.join(DEVICES)}")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA GPU (a CPU-only torch build, or no "
                          "driver); use train.device=auto")
    if want == "mps" and not mps_available():
        raise ConfigError("train.device=mps but MPS is not available (needs Apple silicon, macOS 12.3+ and "
                          "a torch built with MPS); use train.device=auto")
    return want


def prepare_mps() -> None:
    """Ops MPS lacks run on the CPU instead of failing (set before the first MPS op)."""
    if os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") != "1":
        os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] = "1"
        print("note: MPS: operators MPS does not implement fall back to the CPU "
              "(PYTORCH_ENABLE_MPS_FALLBACK=1); they are slower there", file=sys.stderr)


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bf16_supported(device: str) -> bool:
    """Native bf16 on the device: CUDA (Ampere+), MPS (macOS 14+), CPU with AVX512-BF16 / AMX.

    SLIMTUNE_CPU_BF16=0 or 1 overrides the CPU's answer (tests pin it so that the suite computes
    the same on every CPU, and check both answers; a user can see what another CPU would pick).
    """
    device = str(device)
    forced = os.environ.get("SLIMTUNE_CPU_BF16")
    if forced in ("0", "1") and device.startswith("cpu"):
        return forced == "1"
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.startswith("mps"):
        try:  # older macOS raises on bf16 tensors
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            return True
        except (RuntimeError, TypeError):
            return False
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except Exception:
        return False


def four_bit_support(device: str) -> torch.dtype:
    """The compute dtype of an NF4 base on `device`; raises SlimtuneError if bitsandbytes cannot.

    CPU computes in float32 (bf16 matmuls are slow without AMX), CUDA in bfloat16 where the GPU
    has it. The answer comes from quantising one small tensor on the device.
    """
    kind = str(device).split(":")[0]
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SlimtuneError("method.name=qlora needs bitsandbytes (4-bit NF4 layers): pip install bitsandbytes")
    if not _quantises(kind):
        raise SlimtuneError(f"bitsandbytes cannot quantise to NF4 on {kind} on this machine, so a 4-bit "
                            "base cannot load here; use method.name=lora (or train.device=cpu)")
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@lru_cache(maxsize=None)
def _quantises(kind: str) -> bool:
    try:
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(torch.ones(128, device=kind), quant_type="nf4", compress_statistics=True)
        back = bnbf.dequantize_4bit(q, state, quant_type="nf4")
        return bool(torch.allclose(back.float().cpu(), torch.ones(128), atol=0.1))
    except Exception:  # noqa: BLE001 - any failure means "not on this device"
        return False
