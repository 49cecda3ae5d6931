"""`slimtune export RUN --format mlx --out DIR [--type f32|f16] [--quantize q4|q8] [--adapter-only]`:
a folder mlx-lm loads on Apple Silicon (`mlx_lm.generate --model DIR`).

    run --merge_in_memory (parity printed)--> merged fp32 model + training tokenizer
        --> plain HF folder (config.json made readable by mlx-lm, tokenizer, chat template)
        --> mlx_lm.convert: cast to f32 / f16, optionally quantise (mlx-lm's own affine q4 / q8)
        --> check: mlx-lm loads DIR; its greedy answers to the eval prompts vs transformers' on
            the merged model, and its logits vs the merged model with the file's weights

--adapter-only (LoRA / rsLoRA / DoRA runs): DIR holds adapters.safetensors + adapter_config.json
for `mlx_lm.generate --model BASE --adapter-path DIR`, BASE being the base exported once with
`slimtune export BASE --format mlx --type f32`.

What mlx-lm 0.32 needs that a transformers 5 folder does not say the way it reads it:
- its llama and qwen2 models read `rope_theta` / `rope_scaling` at the top of config.json and fall
  back to their own defaults (10,000 / 1,000,000) when transformers 5 nests them in
  `rope_parameters`: SmolLM2's 100,000 would silently become 10,000. They are lifted out.
- it stops on `eos_token_id` (generation_config.json's over config.json's): both become every stop id of the training template
  (e.g. <|im_end|>, or <|eot_id|> for Llama 3 whose eos is another token).
- its LoRA layer computes `linear(x) + scale * (x @ lora_a) @ lora_b` with lora_a (in, r) and
  lora_b (r, out), and its config holds `scale` itself (no alpha): PEFT's lora_A (r, in) and
  lora_B (out, r) are transposed and scale = alpha / r (alpha / sqrt(r) for rsLoRA).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data.prompts import load_prompts
from ..data.render import render_prompt
from ..errors import SlimtuneError
from ..generate import stop_ids
from ..methods import method_of
from ..runfolder import load_base, read_config
from ..utils import atomic_dir
from .merge import all_logits, max_abs_diff, merge_in_memory

ARCHS = ("llama", "qwen2", "qwen3")
DTYPES = {"f32": "float32", "f16": "float16"}
QUANT_BITS = {"q4": 4, "q8": 8}
GROUP_SIZE = 64  # mlx-lm's affine default; a layer whose input width is not a multiple stays unquantised
# The export read back by mlx-lm and run in float32 must give the logits of the merged model carrying
# the export's own (rounded, de-quantised) weights to this bound.
FILE_TOL = 1e-3
MARKER = "slimtune_export.json"


# ---------------------------------------------------------------- pure conversions
def mlx_config(config: dict, stops: list[int]) -> dict:
    """A transformers config.json dict -> the one mlx-lm reads the same way (see the module note)."""
    out = dict(config)
    rope = dict(out.get("rope_parameters") or {})
    if "rope_theta" in rope and "rope_theta" not in out:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and not out.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out["eos_token_id"] = stops[0] if len(stops) == 1 else list(stops)
    return out


_PEFT_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(.+?))\."
                       r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")


def adapter_to_mlx(tensors: dict, peft_cfg: dict, n_layers: int) -> tuple[dict, dict]:
    """PEFT LoRA / rsLoRA / DoRA adapter tensors -> (mlx-lm adapter weights, adapter_config.json).

    tensors: adapter_model.safetensors as {name: array}; lora_A.weight (r, in), lora_B.weight
    (out, r), DoRA's lora_magnitude_vector (out,). Out: {"model.layers.i.<path>.lora_a": (in, r),
    ".lora_b": (r, out), ".m": (out,)} as float32 numpy arrays, and the config mlx-lm's
    load_adapters reads (fine_tune_type, num_layers counted from the last layer, lora_parameters).
    """
    unsupported = [k for k in ("rank_pattern", "alpha_pattern") if peft_cfg.get(k)]
    if peft_cfg.get("peft_type", "LORA") != "LORA" or unsupported or peft_cfg.get("modules_to_save") \
            or peft_cfg.get("bias", "none") != "none" or peft_cfg.get("lora_bias") or peft_cfg.get("fan_in_fan_out"):
        raise SlimtuneError("--adapter-only: mlx-lm's adapter format holds one LoRA rank and scale on the "
                            "decoder layers' Linear modules, without biases or saved modules; this adapter "
                            f"({peft_cfg.get('peft_type')}, {unsupported or 'extra modules/biases'}) needs a merged export")
    r, alpha = int(peft_cfg["r"]), float(peft_cfg["lora_alpha"])
    scale = alpha / (r ** 0.5 if peft_cfg.get("use_rslora") else r)
    rename = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b"}
    weights, layers, keys = {}, set(), set()
    for name, t in tensors.items():
        m = _PEFT_KEY.match(name)
        if m is None:
            raise SlimtuneError(f"--adapter-only: no mlx-lm name for adapter tensor {name}")
        path, layer, rel, leaf = m.groups()
        a = np.asarray(t, dtype=np.float32)
        weights[f"{path}.{rename.get(leaf, 'm')}"] = a.T.copy() if leaf in rename else a
        layers.add(int(layer))
        keys.add(rel)
    config = {"fine_tune_type": "dora" if peft_cfg.get("use_dora") else "lora",
              "num_layers": n_layers - min(layers),  # mlx-lm adapts the last num_layers layers
              "lora_parameters": {"rank": r, "scale": scale, "dropout": 0.0, "keys": sorted(keys)}}
    return weights, config


# ---------------------------------------------------------------- greedy decoding, both runtimes
@torch.no_grad()
def torch_greedy(model, ids: list[int], n: int, stops) -> list[int]:
    """Up to n greedy token ids after `ids` (the stop token included), with a KV cache."""
    from transformers import DynamicCache

    from ..generate import cache_kwarg

    kw = cache_kwarg(model)  # the cache object is filled in place under either name
    out, x, cache = [], torch.tensor([ids]), DynamicCache(config=model.config)
    for _ in range(n):
        t = int(model(input_ids=x, use_cache=True, **{kw: cache}).logits[0, -1].float().argmax())
        out.append(t)
        if t in stops:
            break
        x = torch.tensor([[t]])
    return out


def mlx_greedy(model, ids: list[int], n: int, stops) -> list[int]:
    """The same loop on an mlx-lm model (its own prompt cache)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache, x, out = make_prompt_cache(model), mx.array([ids]), []
    for _ in range(n):
        t = int(mx.argmax(model(x, cache=cache)[0, -1].astype(mx.float32)).item())
        out.append(t)
        if t in stops:
            break
        x = mx.array([[t]])
    return out


def mlx_logits(model, ids: list[int]) -> torch.Tensor:
    """(T, V) float32 logits of an mlx-lm model on one sequence."""
    import mlx.core as mx

    return torch.from_numpy(np.array(model(mx.array([ids]))[0].astype(mx.float32)))


def to_float32(model) -> None:
    """Cast an mlx model's float parameters (quantisation scales included) to float32 in place."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))


def twin_with_export_weights(merged, mlx_model):
    """A copy of `merged` carrying the export's weights, rounded and de-quantised as mlx holds them
    (names are transformers' own in mlx-lm's llama / qwen2 / qwen3)."""
    import copy

    import mlx.core as mx
    import mlx.nn as nn

    twin = copy.deepcopy(merged)
    params = dict(twin.named_parameters())
    for name, mod in mlx_model.named_modules():
        if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(mod.weight, mod.scales, mod.biases, group_size=mod.group_size, bits=mod.bits,
                              mode=mod.mode)
            tensors = {f"{name}.weight": w, **({f"{name}.bias": mod.bias} if "bias" in mod else {})}
        elif isinstance(mod, (nn.Linear, nn.Embedding, nn.RMSNorm)):
            tensors = {f"{name}.{k}": v for k, v in mod.items() if isinstance(v, mx.array)}
        else:
            continue
        with torch.no_grad():
            for k, v in tensors.items():
                if k in params:
                    params[k].copy_(torch.from_numpy(np.array(v.astype(mx.float32))).reshape(params[k].shape))
    return twin


# ---------------------------------------------------------------- write
def _hf_folder(model, tokenizer, dst: Path, stops: list[int]) -> None:
    """A plain float32 transformers folder with config.json as mlx-lm reads it."""
    model.to(torch.float32).save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)  # tokenizer files + chat_template.jinja: the training template
    cfg_path, gen_path = dst / "config.json", dst / "generation_config.json"
    cfg_path.write_text(json.dumps(mlx_config(json.loads(cfg_path.read_text()), stops), indent=2) + "\n")
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}  # mlx-lm prefers its eos_token_id
    gen_path.write_text(json.dumps({**gen, "eos_token_id": mlx_config({}, stops)["eos_token_id"]}, indent=2) + "\n")


def write_mlx_model(model, tokenizer, out: str | Path, kind: str = "f16", quantize: str | None = None,
                    stops: list[int] | None = None) -> None:
    """Write `model` (llama / qwen2 / qwen3) + `tokenizer` to `out` through mlx_lm.convert, atomically."""
    from mlx_lm import convert


    check_supported(model.config, kind, quantize)
    stops = stops or stop_ids(tokenizer, model)
    with tempfile.TemporaryDirectory(prefix="slimtune-mlx-") as hf, atomic_dir(out) as tmp:
        _hf_folder(model, tokenizer, Path(hf), stops)
        with contextlib.redirect_stdout(sys.stderr):  # mlx-lm prints [INFO] lines; stdout carries the JSON
            convert(hf, str(tmp / "m"), dtype=DTYPES[kind], quantize=quantize is not None,
                    q_bits=QUANT_BITS.get(quantize), q_group_size=GROUP_SIZE if quantize else None)
        for f in (tmp / "m").iterdir():
            f.rename(tmp / f.name)
        (tmp / "m").rmdir()


def write_mlx_adapter(run: str | Path, out: str | Path, n_layers: int) -> dict:
    """RUN's PEFT adapter -> OUT/adapters.safetensors + adapter_config.json; returns the config."""
    import mlx.core as mx
    from safetensors.numpy import load_file


    peft_cfg = json.loads((Path(run) / "adapter_config.json").read_text())
    weights, config = adapter_to_mlx(load_file(Path(run) / "adapter_model.safetensors"), peft_cfg, n_layers)
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), {k: mx.array(v) for k, v in weights.items()})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def open_permissions(out: str | Path) -> None:
    """atomic_dir's mkdtemp makes the folder 0700: readable by others, as a model folder is."""
    for f in Path(out).rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    Path(out).chmod(0o755)


def check_supported(config, kind: str = "f16", quantize: str | None = None) -> None:
    if config.model_type not in ARCHS:
        raise SlimtuneError(f"MLX export supports the Llama family, Qwen2 and Qwen3; this model is "
                            f"'{config.model_type}'. Save it with `slimtune merge` and try mlx_lm.convert on it")
    if kind not in DTYPES:
        raise SlimtuneError(f"--type {kind}: MLX weights are f32 or f16 (--quantize q4|q8 for smaller ones)")
    if quantize is not None and quantize not in QUANT_BITS:
        raise SlimtuneError(f"--quantize {quantize}: choose q4 or q8")


# ---------------------------------------------------------------- check
def check_mlx(out, merged, tokenizer, chats: list[list[dict]], inputs: list[list[int]], n_new: int = 48,
              adapter_path=None) -> dict:
    """Load OUT with mlx-lm (on the base folder `out` plus `adapter_path` for an adapter) and compare:
    greedy_equal: chats (eval prompts) whose mlx greedy answer (up to n_new tokens) equals transformers' on `merged`;
    max_abs_logit_diff: its logits on `inputs` vs the merged model's, as shipped (f16 / q4 / q8 included);
    max_abs_logit_diff_file: in float32 vs the merged model carrying the export's own weights (the
        file holds what was meant when this is ~1e-5), and greedy_equal_file the same for answers;
    tokenizer_match: mlx-lm's tokenizer renders the chats to the same ids and stops on the same ids."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load


    stops = set(stop_ids(tokenizer, merged))
    model, mtok = load(str(out), adapter_path=str(adapter_path) if adapter_path else None)
    prompts = [render_prompt(c, tokenizer) for c in chats]
    ref = [torch_greedy(merged, ids, n_new, stops) for ids in prompts]
    got = [mlx_greedy(model, ids, n_new, stops) for ids in prompts]
    res = {"prompts": len(prompts), "max_new_tokens": n_new,
           "greedy_equal": sum(a == b for a, b in zip(ref, got)),
           "max_abs_logit_diff": max_abs_diff(all_logits(merged, inputs), [mlx_logits(model, i) for i in inputs])}
    shipped_f32 = all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    to_float32(model)
    twin = twin_with_export_weights(merged, model)
    res["max_abs_logit_diff_file"] = max_abs_diff(all_logits(twin, inputs), [mlx_logits(model, i) for i in inputs])
    res["greedy_equal_file"] = res["greedy_equal"] if shipped_f32 else sum(  # f32: the same runs as above
        torch_greedy(twin, ids, n_new, stops) == mlx_greedy(model, ids, n_new, stops) for ids in prompts)
    res["tokenizer_match"] = set(mtok.eos_token_ids) == stops and all(
        mtok.apply_chat_template(c, add_generation_prompt=True) == ids
        for c, ids in zip(chats, prompts))
    res["answers_differ_at"] = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                                for x, y in zip(ref, got) if x != y]
    return res


def export_mlx(run: str, out: str, kind: str = "f16", quantize: str | None = None, adapter_only: bool = False,
               verify: bool = True, n_prompts: int | None = None, n_new: int = 48, log=None) -> dict:
    """Merge RUN and write an mlx-lm model folder (or, adapter_only, the adapter alone) at `out`;
    with verify, load it with mlx-lm and compare it with the merged model (check_mlx).

    Returns {out, format, type, quantize, bytes, parity_merged, seconds_write, ... check_mlx's keys}."""

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out_p = Path(out)
    check_supported(type("C", (), {"model_type": "llama"}), kind, quantize)
    if out_p.exists() and any(out_p.iterdir()) and not (out_p / MARKER).exists():
        raise SlimtuneError(f"{out} exists and is not an earlier slimtune export: choose a new --out folder")
    if adapter_only and quantize:
        raise SlimtuneError("--adapter-only writes the adapter in float32; quantise the base instead")
    if adapter_only and not (Path(run) / "adapter_config.json").exists():
        raise SlimtuneError(f"--adapter-only: {run} has no PEFT adapter (a full fine-tune or a plain model)")
    if adapter_only and _four_bit(run):
        raise SlimtuneError("--adapter-only: a QLoRA adapter was trained on the 4-bit base, which mlx-lm does not "
                            "have; export the merged model (the adapter folded into the de-quantised base)")
    m = merge_in_memory(run, log)
    check_supported(m.model.config, kind, quantize)
    log(f"parity on {len(m.inputs)} prompts, max |logit difference| merged vs the run: {m.parity:.2e}")
    t0 = time.time()
    res = {"out": str(out), "format": "mlx", "parity_merged": m.parity}
    if adapter_only:
        res["adapter_config"] = write_mlx_adapter(run, out, m.model.config.num_hidden_layers)
        res.update(base=m.cfg.model.name, type="f32")
    else:
        write_mlx_model(m.model, m.tokenizer, out, kind, quantize)
        res.update(type=kind, quantize=quantize)
    open_permissions(out)
    res["seconds_write"] = round(time.time() - t0, 1)
    res["bytes"] = sum(f.stat().st_size for f in out_p.rglob("*") if f.is_file())
    log(f"wrote {out} ({res['bytes'] / 2**20:.1f} MiB) in {res['seconds_write']} s")
    if verify:
        res.update(_verify(out_p, m, adapter_only, n_prompts, n_new, log))
    (out_p / MARKER).write_text(json.dumps({"source_run": str(run), **res}, indent=2) + "\n")
    return res


def _four_bit(run) -> bool:

    return method_of(read_config(Path(run) / "config.yaml").method.name).four_bit


def _verify(out: Path, m, adapter_only: bool, n_prompts, n_new: int, log) -> dict:

    chats = load_prompts("builtin:eval_prompts", n_prompts, m.cfg.data.system_prompt)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="slimtune-mlx-base-") as base:
        if adapter_only:  # the base the adapter goes on, in float32, with the training tokenizer
            write_mlx_model(load_base(m.cfg, "float32").eval(), m.tokenizer, Path(base) / "b", "f32")
        res = check_mlx(Path(base) / "b" if adapter_only else out, m.model, m.tokenizer, chats, m.inputs,
                        n_new, adapter_path=out if adapter_only else None)
    res["seconds_check"] = round(time.time() - t0, 1)
    log(f"mlx-lm loaded it: greedy answers equal transformers' on {res['greedy_equal']} of {res['prompts']} eval "
        f"prompts ({n_new} tokens); max |logit difference| {res['max_abs_logit_diff']:.2e} as shipped, "
        f"{res['max_abs_logit_diff_file']:.2e} in float32 vs the export's own weights; tokenizer "
        f"{'gives the same ids and stops' if res['tokenizer_match'] else 'DIFFERS'}")
    if res["max_abs_logit_diff_file"] > FILE_TOL or not res["tokenizer_match"]:
        shutil.rmtree(out)  # a folder that does not hold the model must not be shipped by mistake
        raise SlimtuneError(f"{out} does not load back as written, so it was removed: mlx-lm's logits differ by "
                            f"{res['max_abs_logit_diff_file']:.2e} from the merged model with the export's weights "
                            f"(tokenizer match: {res['tokenizer_match']}); please report this")
    return res
