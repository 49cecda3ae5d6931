"""Our method config -> a PEFT model (or a fully trainable one); targets; trainable-parameter report.

PEFT does the methods; this module only chooses modules and settings. `METHODS` is the one table
of methods: each row's flags are `specs.METHOD_SPECS` (torch-free: config validation reads them
there) and its builder is in `BUILDERS`; the loop, loading a run, generation and merging read the
flags, never names:

    name           PEFT config                           merges  adds positions  4-bit base  base = frozen copy
    lora           LoraConfig                             yes
    rslora         LoraConfig(use_rslora): alpha/sqrt(r)  yes
    dora           LoraConfig(use_dora): DoRA 4.3         yes
    qlora          LoraConfig on an NF4 base              yes                    yes
    ia3            IA3Config (k, v, down_proj input)      yes
    prompt_tuning  PromptTuningConfig                            yes
    prefix_tuning  PrefixTuningConfig                            yes
    full           none: every parameter trains           (is the model)                     yes

Adding a PEFT method = a `specs.METHOD_SPECS` row + its builder in `BUILDERS` + a config example + a test row.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import peft
from torch import nn

from .errors import ConfigError
from .specs import METHOD_SPECS, MethodSpec

ATTN_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "feed_forward", "ffn")
FF_NAMES = {"down_proj", "fc2", "w2"}  # feed-forward output layers (IA3 scales their input)


def parse_layers(spec) -> list[int] | None:
    """'10-20' (inclusive), '1,3,5', [0, 1] or None -> a sorted list of layer indices."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str) and spec.strip().startswith("auto:"):
        raise ConfigError(f"method.layers={spec!r} is resolved when training starts (slimtune train); "
                          "here give explicit layers")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, list):
        return sorted(int(x) for x in spec)
    out = set()
    for part in str(spec).split(","):
        a, _, b = part.strip().partition("-")
        if not a.strip().isdigit() or (b and not b.strip().isdigit()):
            raise ConfigError(f"method.layers={spec!r}: use a range like '10-20' or a list like [0, 1, 2]")
        out.update(range(int(a), int(b or a) + 1))
    return sorted(out)


def linear_names(model) -> dict[str, set[str]]:
    """Leaf names of the Linear layers inside the decoder blocks, grouped as attn / mlp / other."""
    groups = {"attn": set(), "mlp": set(), "other": set()}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or ".layers." not in f".{name}" and ".h." not in f".{name}":
            continue
        parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        kind = "attn" if any(w in parent for w in ATTN_WORDS) else "mlp" if any(w in parent for w in MLP_WORDS) else "other"
        groups[kind].add(leaf)
    return groups


def target_modules(model, targets) -> list[str]:
    """Module names for PEFT from attn / attn_mlp / all_linear / an explicit list."""
    groups = linear_names(model)
    if isinstance(targets, list):
        known = set().union(*groups.values())
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise ConfigError(f"method.targets: no Linear module named {unknown} in this model; "
                              f"it has: {', '.join(sorted(known))}")
        return list(targets)
    if targets == "all_linear":  # every Linear in the blocks (not the output layer)
        return sorted(set().union(*groups.values()))
    names = set(groups["attn"]) | (groups["mlp"] if targets == "attn_mlp" else set())
    if not names:
        raise ConfigError(f"method.targets={targets}: found no attention/MLP Linear layers; "
                          "name them explicitly, e.g. [q_proj, v_proj]")
    return sorted(names)


def _layers(model, cfg) -> list[int] | None:
    layers = parse_layers(cfg.layers)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if layers and n_layers is not None and layers[-1] >= n_layers:
        raise ConfigError(f"method.layers={cfg.layers!r}: this model has layers 0-{n_layers - 1}")
    return layers


def _lora(model, cfg, _tok=None, **flags):
    return peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=target_modules(model, cfg.targets), layers_to_transform=_layers(model, cfg),
                           bias="none", **flags)


def _ia3(model, cfg, _tok=None):
    groups, layers = linear_names(model), _layers(model, cfg)
    if cfg.targets in ("attn", "attn_mlp"):
        # IA3 rescales keys, values and the input of the MLP's down projection (paper section 3).
        mods = sorted(groups["attn"] & {"k_proj", "v_proj"}) + sorted(groups["mlp"] & FF_NAMES)
    else:
        mods = target_modules(model, cfg.targets)
    ff = [m for m in mods if m in FF_NAMES]
    if layers:  # IA3Config has no layers_to_transform: select layers with a regex instead
        where = rf".*\.layers\.({'|'.join(map(str, layers))})\.(.*\.)?"
        mods, ff = rf"{where}({'|'.join(mods)})$", rf"{where}({'|'.join(ff) or '$^'})$"
    return peft.IA3Config(task_type="CAUSAL_LM", target_modules=mods, feedforward_modules=ff)


def _prompt(model, cfg, tokenizer_path=None):
    kw = {}
    if cfg.prompt_init_text:
        kw = dict(prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.prompt_init_text,
                  tokenizer_name_or_path=tokenizer_path)
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens, **kw)


def _prefix(model, cfg, _tok=None):
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)


@dataclass(frozen=True)
class Method:
    """One row of the method table: its flags (specs.METHOD_SPECS, torch-free, what config checks)
    and how to build its PEFT config."""

    spec: MethodSpec
    build: Callable | None
    """(model, MethodCfg, tokenizer path) -> a PEFT config; None: no PEFT (every parameter trains)."""

    def __getattr__(self, flag):  # name, can_merge, adds_positions, four_bit, reference_copy
        if flag.startswith("_") or flag in ("spec", "build"):
            raise AttributeError(flag)
        return getattr(self.spec, flag)


BUILDERS: dict[str, Callable | None] = {
    "lora": _lora,
    "rslora": lambda m, c, t=None: _lora(m, c, t, use_rslora=True),
    "dora": lambda m, c, t=None: _lora(m, c, t, use_dora=True),
    "qlora": _lora,
    "ia3": _ia3,
    "prompt_tuning": _prompt,
    "prefix_tuning": _prefix,
    "full": None,
}
METHODS: dict[str, Method] = {name: Method(spec, BUILDERS[name]) for name, spec in METHOD_SPECS.items()}


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not valid; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_of_model(model) -> Method | None:
    """The table row of a loaded model's adapter (None: a plain model, nothing to merge or add).

    Read from the PEFT config PEFT saved (its type, DoRA / rsLoRA flags) and the 4-bit base, so a
    model loaded from any run folder is classified the same way the config that trained it was.
    """
    cfgs = getattr(getattr(model, "module", model), "peft_config", None)
    if not cfgs:
        return None
    c = next(iter(cfgs.values()))
    kind = str(c.peft_type).split(".")[-1].lower()
    four = getattr(model, "is_loaded_in_4bit", False) or getattr(base_of(model), "is_loaded_in_4bit", False)
    if kind == "lora":
        name = "qlora" if four else "dora" if c.use_dora else "rslora" if c.use_rslora else "lora"
    else:
        name = {"ia3": "ia3", "prompt_tuning": "prompt_tuning", "prefix_tuning": "prefix_tuning"}.get(kind)
    if name is None:
        raise ConfigError(f"this model's adapter ({kind}) is not one slimtune trains; methods: {', '.join(METHODS)}")
    return METHODS[name]


def peft_config(model, cfg, tokenizer_path: str | None = None):
    """The PEFT config for `cfg` on `model` (None for full fine-tuning)."""
    build = method_of(cfg.name).build
    return build(model, cfg, tokenizer_path) if build else None


def apply_method(model, cfg, tokenizer_path: str | None = None, gradient_checkpointing: bool = False):
    """Wrap `model` for training with the configured method (a MethodCfg); frozen parts stay frozen."""
    method = method_of(cfg.name)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.build is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.four_bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing and not method.adds_positions:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return peft.get_peft_model(model, peft_config(model, cfg, tokenizer_path))


def base_of(model):
    """The transformers model under any PEFT/DDP wrapping."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def adapters_disabled(model):
    """The base model: PEFT adapters switched off (no second copy in memory)."""
    model = getattr(model, "module", model)
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with ctx:
        yield model


def trainable_report(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": round(100 * trainable / max(1, total), 4)}
