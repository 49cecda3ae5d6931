"""`slimtune merge RUN --out DIR`: fold the adapter into the base and save a standalone model.

    base (fp32) + adapter --merge_and_unload--> merged --cast to dtype--> DIR (safetensors,
    tokenizer, chat_template.jinja), loadable by `AutoModelForCausalLM.from_pretrained(DIR)`.

Parity check: logits of the adapter model and of DIR reloaded with plain transformers, on a few
prompts rendered with the training template; the max absolute difference is printed (about 1e-5
in fp32; bf16 rounding shows as ~1e-2). LoRA / rsLoRA / DoRA / IA3 merge; prompt and prefix
tuning add positions rather than change weights, so they cannot. A QLoRA base is de-quantised
(float32 on CPU, bf16 on CUDA), then the adapter is merged into it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM

from ..config import WEIGHT_DTYPES
from ..data.formats import builtin_path
from ..data.prompts import load_prompts
from ..data.reader import load_chats
from ..data.render import render_chat, render_prompt
from ..errors import SlimtuneError
from ..machine import four_bit_support
from ..methods import method_of
from ..models import DTYPES as _TORCH_DTYPES
from ..models import load_tokenizer
from ..runfolder import load_base, load_run, read_config, run_kind
from ..utils import atomic_dir

DTYPES = {k: _TORCH_DTYPES[k] for k in WEIGHT_DTYPES}


def parity_inputs(tokenizer, system_prompt: str | None = None, n: int = 3) -> list[list[int]]:
    """Token ids of a few eval prompts (with the assistant header) and one whole training chat."""

    ids = [render_prompt(c, tokenizer) for c in load_prompts("builtin:eval_prompts", n, system_prompt)]
    chat = load_chats(builtin_path("instructions"))[0]
    return ids + [render_chat(chat, tokenizer)[0][:256]]


@torch.no_grad()
def all_logits(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    """Float32 CPU logits (T, V) for each sequence of ids."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in inputs]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@dataclass
class Merged:
    """A run folded into one plain transformers model, in memory, with its parity numbers.

    reference: the adapter model's float32 logits (T, V) on `inputs`; logits: the merged model's;
    parity: the max absolute difference between the two."""
    model: object
    tokenizer: object
    cfg: object
    inputs: list
    reference: list
    logits: list

    @property
    def parity(self) -> float:
        return max_abs_diff(self.reference, self.logits)


def merge_in_memory(run: str, log=None) -> Merged:
    """Merge RUN's adapter into its base in float32 (bf16 for a QLoRA base on CUDA) and check parity.

    RUN may also be a full fine-tune (returned as it is) or a plain model folder (parity 0).
    Raises SlimtuneError for prompt/prefix tuning, which adds positions rather than weights.
    """

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    kind = run_kind(run)
    if kind is None:  # a plain model (a merged folder, a .gguf): nothing to fold in
        model, tokenizer, cfg = load_run(run, "float32")
        inputs = parity_inputs(tokenizer, cfg.data.system_prompt)
        reference = all_logits(model, inputs)
        return Merged(model, tokenizer, cfg, inputs, reference, reference)
    cfg = read_config(Path(run) / "config.yaml")
    if not method_of(cfg.method.name).can_merge:
        raise SlimtuneError(
            f"a {cfg.method.name} run cannot be merged: its learned virtual tokens are extra input "
            "positions, not a change to the weights, so no standalone model can hold them. "
            f"Use the adapter as it is: slimtune chat {run} (or peft.PeftModel.from_pretrained)")
    if method_of(cfg.method.name).four_bit:
        merged, tokenizer, reference, inputs = _merge_4bit(run, cfg, log)
    else:
        model, tokenizer, _ = load_run(run, "float32")
        inputs = parity_inputs(tokenizer, cfg.data.system_prompt)
        reference = all_logits(model, inputs)
        if kind == "adapter":
            log(f"merging the {cfg.method.name} adapter into {cfg.model.name} (float32) ...")
            merged = model.merge_and_unload()
        else:  # a full fine-tune is already a whole model
            merged = model
    return Merged(merged, tokenizer, cfg, inputs, reference, all_logits(merged, inputs))


def merge_run(run: str, out: str, dtype: str | None = None, log=None) -> dict:
    """Merge the run's adapter into its base and save it to `out`; returns {out, dtype, parity...}.

    dtype: float32 | bfloat16 | float16 for the saved weights (default: the run's model.dtype,
    float32 for 'auto'). The merge itself runs in float32 (bf16 for a QLoRA base on CUDA).
    """

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if run_kind(run) is None:
        raise SlimtuneError(f"{run} is not a run folder (config.yaml + adapter): nothing to merge")
    cfg = read_config(Path(run) / "config.yaml")
    dtype = dtype or (cfg.model.dtype if cfg.model.dtype in DTYPES else "float32")
    if dtype not in DTYPES:
        raise SlimtuneError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    out_p = Path(out)
    if out_p.resolve() == Path(run).resolve():
        raise SlimtuneError("--out must be a new folder, not the run folder")
    if out_p.is_dir() and any(out_p.iterdir()) and not (out_p / "slimtune_merge.json").exists():
        raise SlimtuneError(f"{out} exists and is not an earlier merge: choose a new --out folder")

    m = merge_in_memory(run, log)
    merged, tokenizer, reference, inputs, in_memory = m.model, m.tokenizer, m.reference, m.inputs, m.parity
    merged = merged.to(DTYPES[dtype])
    merged.config.dtype = DTYPES[dtype]
    _save(merged, tokenizer, out, run, cfg, dtype)


    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    saved = max_abs_diff(reference, all_logits(reloaded, inputs))
    res = {"out": str(out), "dtype": dtype, "method": cfg.method.name, "prompts": len(inputs),
           "max_abs_logit_diff_merged": in_memory, "max_abs_logit_diff_saved": saved}
    note = "" if dtype == "float32" else f" (includes {dtype} rounding of the saved weights)"
    log(f"parity on {len(inputs)} prompts, max |logit difference| vs the adapter model: "
        f"merged in memory {in_memory:.2e}, saved folder {saved:.2e}{note}")
    (Path(out) / "slimtune_merge.json").write_text(json.dumps({"source_run": str(run), "base": cfg.model.name,
                                                               **res}, indent=2) + "\n")
    log(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return res


def _save(model, tokenizer, out: str, run: str, cfg, dtype: str) -> None:

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # tokenizer files + chat_template.jinja
        if not list(tmp.glob("*.safetensors")):
            raise SlimtuneError(f"saving {out} wrote no safetensors file")
    for f in Path(out).iterdir():  # mkdtemp makes 0700
        f.chmod(0o644)
    Path(out).chmod(0o755)


def _merge_4bit(run: str, cfg, log):
    """QLoRA: the adapter was trained on NF4 weights, so merge it into those weights de-quantised
    (not into the original checkpoint, which differs by the quantisation error). On CPU the
    de-quantised base is float32, on CUDA bf16 (the compute dtypes of machine.four_bit_support)."""


    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = four_bit_support(device)  # SlimtuneError where bitsandbytes cannot run
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[compute]
    model, tokenizer, _ = load_run(run, dtype, device)  # 4-bit base + adapter, as trained
    inputs = parity_inputs(tokenizer, cfg.data.system_prompt)
    reference = all_logits(model, inputs)
    del model
    log(f"de-quantising the 4-bit base {cfg.model.name} to {dtype} and merging the adapter ...")
    base = load_base(cfg, dtype, device).dequantize(dtype=compute).to(compute)
    merged = peft.PeftModel.from_pretrained(base, run).merge_and_unload()
    return merged, load_tokenizer(run), reference, inputs
