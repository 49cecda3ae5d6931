"""Load what `slimtune train` wrote (or any plain model) for evaluation, chat, compare and merge.

A run folder holds config.yaml (the resolved config) and either an adapter
(adapter_config.json + adapter_model.safetensors, loaded onto the base named in the config) or,
for method=full, a whole model (config.json + model*.safetensors). Its tokenizer files and
chat_template.jinja are the ones training rendered with, so they are loaded from the run.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import peft
import torch

from .config import CONFIG_END, CONFIG_HEAD, Config, ModelCfg, load_config
from .errors import SlimtuneError
from .machine import four_bit_support
from .methods import adapters_disabled, method_of
from .models import load_model, load_tokenizer
from .readback import check_safetensors


def run_kind(path: str | Path) -> str | None:
    """'adapter' or 'full' for a run folder, None for anything else (a plain model or nothing).

    Raises SlimtuneError for a folder with config.yaml whose weights are missing.
    """
    p = Path(path)
    if not (p / "config.yaml").is_file():
        return None
    if (p / "adapter_config.json").is_file():
        if not (p / "adapter_model.safetensors").is_file():
            raise SlimtuneError(f"{p} has adapter_config.json but no adapter_model.safetensors: "
                                "the run did not finish saving; train it again or resume it")
        return "adapter"
    if (p / "config.json").is_file() and list(p.glob("model*.safetensors")):
        return "full"
    hint = " (checkpoints/ holds resumable state: finish it with train.resume=true)" \
        if (p / "checkpoints").is_dir() else ""
    raise SlimtuneError(f"{p} has a config.yaml but no adapter (adapter_model.safetensors) or model "
                        f"(model.safetensors): the run did not finish{hint}")


def weights_digest(path: str | Path) -> str | None:
    """sha256 over the run's weight files (adapter_model.safetensors, or model*.safetensors), in name
    order; None if there are none. It tells `slimtune eval` whether training's final evaluation
    measured exactly these weights."""

    p = Path(path)
    files = [p / "adapter_model.safetensors"] if (p / "adapter_model.safetensors").is_file() \
        else sorted(p.glob("model*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_config(path: str | Path) -> Config:
    """A run's resolved config.yaml as a Config; a one-line error if it was cut short."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    if text.startswith(CONFIG_HEAD) and CONFIG_END not in text:
        raise SlimtuneError(f"{path} is truncated (its last line is missing); restore it from a copy or "
                            "train again (every setting of the run is in it)")
    return load_config(path)


def load_base(cfg: Config, dtype: str = "float32", device: str | None = None):
    """The run's base model (the reference for base metrics and samples), in eval mode."""


    four_bit = method_of(cfg.method.name).four_bit and _quantises(device)
    return load_model(cfg.model.name, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                      attn_implementation=cfg.model.attn_implementation, quantize_4bit=four_bit,
                      device=device)


def _quantises(device: str | None) -> bool:
    """Can bitsandbytes hold a 4-bit base on `device` here? (Else a QLoRA base loads unquantised.)"""

    try:
        four_bit_support(device or "cpu")
        return True
    except SlimtuneError:
        return False


def load_run(path: str | Path, dtype: str = "float32", device: str | None = None):
    """A run folder or a plain model name/folder -> (model, tokenizer, cfg), model in eval mode.

    Adapters load as a `peft.PeftModel` on the base named in the run's config (so
    `methods.adapters_disabled(model)` is the base); a full fine-tune loads as a plain model.
    For a plain model, cfg is the defaults with model.name set.
    A QLoRA run loads its base in 4 bits (NF4) wherever bitsandbytes runs (CPU, CUDA), as it was
    trained, and unquantised in `dtype` elsewhere (e.g. MPS).
    """

    path = str(path)
    kind = run_kind(path)
    if kind is None:
        p = Path(path)
        if p.is_dir() and not (p / "config.json").is_file():
            raise SlimtuneError(f"{p} is neither a run folder (config.yaml + adapter or model) nor a model "
                                "folder (config.json + *.safetensors)")
        cfg = Config(model=ModelCfg(name=path, dtype=dtype))
        try:
            model = load_model(path, dtype=dtype, device=device)
        except SlimtuneError as e:
            raise SlimtuneError(f"'{path}' is not a run folder, and loading it as a model failed: {e}") from None
        return model, load_tokenizer(path), cfg
    cfg = read_config(Path(path) / "config.yaml")
    for weights in sorted(Path(path).glob("*.safetensors")):  # a damaged file: one line, not a traceback
        check_safetensors(weights, "restore it, or train again (train.resume=true continues from "
                                   "checkpoints/ if the run kept any)")
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    if kind == "full":
        model = load_model(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                           attn_implementation=cfg.model.attn_implementation, device=device)
        return model, tokenizer, cfg

    base = load_base(cfg, dtype, device)
    try:
        model = peft.PeftModel.from_pretrained(base, path, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SlimtuneError(f"cannot load the adapter in {path} onto base model '{cfg.model.name}': {e}") from e
    return model.eval(), tokenizer, cfg


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def base_reference(model, cfg: Config, dtype: str = "float32"):
    """What to compare against: None for an adapter (switching it off gives the base, no second
    copy), a separately loaded base model for a full fine-tune."""
    if hasattr(model, "disable_adapter"):
        return None
    return load_base(cfg, dtype, str(device_of(model)))


@contextmanager
def as_base(model, ref=None):
    """`with as_base(model, ref) as base:` the base model: `ref` if given, else adapters off."""

    if ref is not None:
        yield ref
        return
    with adapters_disabled(model) as base:
        yield base
