"""Typed configs: the one source of defaults. YAML and `key=value` overrides only change them.

A config file mirrors these sections:

    model:  {name: smollm2-135m, dtype: float32}
    data:   {train: data.jsonl, max_length: 512}
    method: {name: lora, r: 16, targets: attn}
    loss:   {kl_lambda: 0.0}
    train:  {lr: 2e-4, max_steps: 100}
    eval:   {every: 50}

Unknown keys and bad values fail here, before any model loads, listing the valid choices.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

METHODS = ("lora", "dora", "rslora", "qlora", "prompt_tuning", "prefix_tuning", "ia3", "full")
TARGETS = ("attn", "attn_mlp", "all_linear")
TRAIN_ON = ("assistant", "last", "all")
OPTIMIZERS = ("adamw", "adafactor", "lion", "schedulefree")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16", "auto")
KL_DIRECTIONS = ("forward", "reverse", "jsd")
KL_POSITIONS = ("trained", "all", "last_n")
FORMATS = ("auto", "messages", "alpaca", "dolly", "sharegpt")


@dataclass
class ModelCfg:
    name: str = "smollm2-135m"
    """Hub id, local HF folder, a .gguf file, or an embedded name (smollm2-135m)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 (CPU with AVX512-BF16/AMX, or CUDA), float16, auto."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless you trust the repo."""
    attn_implementation: str = "sdpa"
    """sdpa, eager, or flash_attention_2 (CUDA)."""

    def __post_init__(self):
        _choice("model.dtype", self.dtype, DTYPES)


@dataclass
class DataCfg:
    train: str | None = None
    """Training file (JSON/JSONL), several as 'a.jsonl:3,b.jsonl:1' (weights), or 'builtin:instructions'."""
    val: str | None = None
    """Held-out file. When empty, `val_fraction` of train is split off (seeded)."""
    val_fraction: float = 0.1
    format: str = "auto"
    """auto, messages (ChatML), alpaca, dolly, sharegpt."""
    system_prompt: str | None = None
    """Added to chats that have no system turn (formats without one: alpaca, dolly...)."""
    train_on: str = "assistant"
    """Which tokens are trained: every assistant turn, the last assistant turn, or all tokens."""
    max_length: int = 512
    """Longer examples are truncated to this many tokens (labels stay aligned)."""
    drop_untrained: bool = True
    """Drop (and count) examples whose trained tokens were all truncated away; False raises."""
    max_examples: int | None = None
    """Use only the first N training examples (after shuffling)."""
    packing: bool = False
    """Pack several examples per row (position ids restart, no attention across examples)."""
    group_by_length: bool = True
    """Batch examples of similar length together to waste little on padding."""
    general_prompts: str | None = "builtin:general_prompts"
    """Chats unrelated to the training data, for KL-to-base drift at evaluation. Empty: skip."""

    def __post_init__(self):
        _choice("data.format", self.format, FORMATS)
        _choice("data.train_on", self.train_on, TRAIN_ON)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")


@dataclass
class MethodCfg:
    name: str = "lora"
    """lora, dora, rslora, qlora, prompt_tuning, prefix_tuning, ia3, full."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | list[str] = "attn"
    """attn, attn_mlp, all_linear, or a list of module names (e.g. [q_proj, v_proj])."""
    layers: str | list[int] | None = None
    """Only these layers, e.g. '10-20' or [0, 1, 2]. Empty: all layers."""
    num_virtual_tokens: int = 20
    """prompt_tuning / prefix_tuning: number of virtual tokens."""
    prompt_init_text: str | None = None
    """prompt_tuning: initialise the soft prompt from this text (else random)."""

    def __post_init__(self):
        _choice("method.name", self.name, METHODS)
        if isinstance(self.targets, str):
            if self.targets not in TARGETS:
                raise ConfigError(f"method.targets={self.targets!r} is not valid; choose one of: "
                                  f"{', '.join(TARGETS)}, or a list of module names like [q_proj, v_proj]")
        if self.r < 1:
            raise ConfigError(f"method.r must be >= 1, got {self.r}")


@dataclass
class LossCfg:
    kl_lambda: float = 0.0
    """Weight of KL to the base model; 0 is plain SFT."""
    kl_warmup_steps: int = 0
    """lambda rises linearly from 0 to kl_lambda over these steps."""
    kl_temperature: float = 1.0
    """Softmax temperature tau for the KL term (scaled by tau^2)."""
    kl_direction: str = "forward"
    """forward KL(base||tuned), reverse KL(tuned||base), or jsd."""
    jsd_beta: float = 0.5
    kl_positions: str = "trained"
    """trained (assistant tokens), all (every real token), last_n."""
    kl_last_n: int = 64
    chunk_size: int = 1024
    """Tokens per chunk of the output projection: peak logits memory = chunk x vocab."""

    def __post_init__(self):
        _choice("loss.kl_direction", self.kl_direction, KL_DIRECTIONS)
        _choice("loss.kl_positions", self.kl_positions, KL_POSITIONS)
        if self.kl_lambda < 0 or self.kl_temperature <= 0:
            raise ConfigError("loss.kl_lambda must be >= 0 and loss.kl_temperature > 0")
        if not 0 < self.jsd_beta < 1:
            raise ConfigError(f"loss.jsd_beta must be in (0, 1), got {self.jsd_beta}")


@dataclass
class TrainCfg:
    output_dir: str = "runs/run"
    seed: int = 0
    lr: float = 2e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Used when warmup_steps is 0: a fraction of the total steps."""
    min_lr_ratio: float = 0.0
    """The schedule ends at lr x min_lr_ratio."""
    batch_size: int = 8
    """Examples (or packed rows) per batch; a step takes grad_accum batches on every process."""
    grad_accum: int = 1
    """Batches per optimizer step; the loss is normalised by trained tokens over all of them."""
    micro_batch_tokens: int | None = None
    """Run each batch in pieces of at most this many padded tokens (rows x longest row) and sum
    their gradients: the same update, activation memory bounded by this instead of the batch.
    Empty: 1024 on CPU (as fast as whole batches there, and 2-3x less memory: BENCHMARKS.md),
    no split on GPU. 0: never split."""
    max_steps: int | None = None
    """Optimizer steps. Empty: `epochs` passes over the data."""
    epochs: float = 1.0
    max_minutes: float | None = None
    """Wall-clock cap (setup included): training stops, evaluates once more and saves the adapter."""
    grad_clip: float | None = 1.0
    gradient_checkpointing: bool = False
    log_every: int = 1
    save_every: int | None = None
    """Checkpoint every N steps (for resume). Empty: only the final adapter."""
    keep_checkpoints: int = 1
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    plateau_patience: int | None = None
    """Stop when the smoothed training loss has not improved by plateau_min_delta for N steps."""
    plateau_min_delta: float = 1e-3
    plateau_min_steps: int = 0
    plateau_smoothing: float = 0.9
    early_stop_patience: int | None = None
    """Stop after N evaluations without held-out loss improving."""
    progress: bool = True
    num_threads: int | None = None
    """torch CPU threads. Empty: torch's default."""

    def __post_init__(self):
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 0:
            raise ConfigError(f"train.micro_batch_tokens must be >= 0 (0: never split), got {self.micro_batch_tokens}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")


@dataclass
class EvalCfg:
    every: int | None = None
    """Evaluate held-out loss (and KL to base) every N steps; always before and after training."""
    max_examples: int | None = 64
    """Held-out examples used per evaluation."""
    batch_size: int = 8
    kl: bool = True
    """Report KL(base || tuned) on held-out and general prompts at each evaluation."""
    max_new_tokens: int = 128
    banned_phrases: list[str] = field(default_factory=lambda: [
        "As an AI", "as an AI language model", "I cannot", "I'm sorry"])
    top_p: float = 1.0
    """Generation (eval, compare, chat): nucleus sampling mass when sampling; 1 = off."""
    top_k: int = 0
    """Generation: sample among the k most likely tokens; 0 = off."""
    repetition_penalty: float = 1.0
    """Generation: > 1 makes tokens already in the prompt or answer less likely; 1 = off."""
    no_repeat_ngram_size: int = 0
    """Generation: forbid any token n-gram of this size from appearing twice; 0 = off."""
    gen_batch_size: int = 16
    """Prompts answered together (left-padded, KV-cached, finished rows leave the batch)."""
    ifeval: str | None = "builtin:ifeval_prompts"
    """Prompts with checkable instructions (IFEval-style) answered by `slimtune eval`. Empty: skip."""


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from .utils import atomic_write_text
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _coerce(key: str, raw, typ):
    """Turn a YAML value or a `key=value` string into the field's type, or raise ConfigError."""
    if isinstance(typ, str):
        typ = eval(typ, vars(typing) | {"list": list})  # annotations are strings (future import)
    import types
    is_union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    args = typing.get_args(typ) if is_union else ()
    if raw is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} may not be empty")
    if isinstance(raw, str) and type(None) in args and raw.lower() in ("none", "null", "~", ""):
        return None
    options = [a for a in args if a is not type(None)] or [typ]
    if isinstance(raw, str) and raw.startswith("["):  # "[q_proj, v_proj]" is a list, not a name
        options.sort(key=lambda o: (typing.get_origin(o) or o) is not list)
    errors = []
    for opt in options:  # first type that accepts the value wins (e.g. int before list)
        origin = typing.get_origin(opt) or opt
        try:
            if origin is bool:
                if isinstance(raw, bool):
                    return raw
                if isinstance(raw, str) and raw.lower() in ("true", "false", "yes", "no", "1", "0"):
                    return raw.lower() in ("true", "yes", "1")
                raise ValueError("expected true or false")
            if origin is list:
                val = yaml.safe_load(raw) if isinstance(raw, str) else raw
                if not isinstance(val, list):
                    raise ValueError("expected a list like [a, b]")
                (inner,) = typing.get_args(opt) or (str,)
                return [inner(v) for v in val]
            if origin in (int, float):
                if isinstance(raw, bool):
                    raise ValueError("expected a number")
                val = yaml.safe_load(raw) if isinstance(raw, str) else raw
                if origin is int and isinstance(val, float) and not val.is_integer():
                    raise ValueError("expected an integer")
                return origin(val)
            if origin is str:
                if isinstance(raw, (dict, list)):
                    raise ValueError("expected a string")
                return str(raw)
        except (ValueError, TypeError, yaml.YAMLError) as e:
            errors.append(str(e))
    raise ConfigError(f"{key}={raw!r}: {'; '.join(errors) or 'bad value'}")


def build_config(raw: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Make a validated Config from a nested dict (a YAML file's content) and `a.b=value` strings."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()} if raw else {}
    for k in raw:
        if k not in _SECTIONS:
            raise ConfigError(f"unknown config section '{k}'; valid sections: {', '.join(_SECTIONS)}")
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section '{section}' in '{item}'; valid: {', '.join(_SECTIONS)}")
        raw.setdefault(section, {})[name] = value
    sections = {}
    for section, cls in _SECTIONS.items():
        cls = globals()[cls] if isinstance(cls, str) else cls
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for name, val in raw.get(section, {}).items():
            if name not in fields:
                raise ConfigError(f"unknown key '{section}.{name}'; valid keys: {', '.join(fields)}")
            values[name] = _coerce(f"{section}.{name}", val, fields[name].type)
        sections[section] = cls(**values)
    return Config(**sections)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or none: the defaults) and apply `section.key=value` overrides."""
    raw = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected sections (model:, data:, train: ...) at the top level")
    return build_config(raw, overrides)
