"""`slimtune export RUN --format coreml --out DIR [--context 2048,4096]`: the tuned model for Core ML
on macOS 15 / iOS 18, as seed 002's export notes describe it (merge first, a ChatML-compatible
prompt wrapper, enumerated context lengths 2k / 4k, compute units left to Core ML).

    run --merge_in_memory--> merged fp32 model + training tokenizer
        --> StatefulLM (coreml_model.py): checked in torch against transformers (logits, greedy)
        --> torch.jit.trace --> coremltools: ML program, fp16 weights and compute, KV cache as
            states; one model function per context length (ctx_2048, ctx_4096) in ONE .mlpackage
            whose functions share the weights
        --> DIR/Model.mlpackage, tokenizer files, prompt_format.json, reference.json (transformers'
            greedy answers), SlimtuneChat/ (Swift package), check_on_mac.py, README.md
        --> check: coremltools reads the package back: functions, inputs, outputs, states, weight bytes

What Linux cannot do: run the package. Core ML predictions need macOS (coremltools' runtime is a
macOS library), so the numbers of the converted program are checked on a Mac by check_on_mac.py
(or `pytest -m apple tests/ship/test_coreml.py` there) against reference.json. On Linux the torch
module that is traced, and the traced graph itself, are checked against transformers.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..data.prompts import load_prompts
from ..data.render import render_prompt
from ..errors import SlimtuneError
from ..generate import stop_ids
from ..utils import atomic_dir
from .coreml_model import StatefulLM, causal_mask, stateful_greedy
from .merge import all_logits, merge_in_memory
from .mlx import open_permissions, torch_greedy
from .modelfile import match_template

ARCHS = ("llama", "qwen2", "qwen3")
INPUTS, OUTPUT, STATES = ("inputIds", "causalMask"), "logits", ("keyCache", "valueCache")
PACKAGE = "Model.mlpackage"
TRACE_TOL = 1e-3  # traced module (float32 KV cache) vs transformers, max |logit difference|


def function_name(context: int) -> str:
    return f"ctx_{context}"


def convert(model, context: int, out: str | Path) -> None:
    """Trace StatefulLM(model, context) and write one single-function ML program to `out`."""
    import coremltools as ct

    module = StatefulLM(model, context).eval()
    example = (torch.zeros(1, 2, dtype=torch.int32), causal_mask(2, 5))
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    T, end = ct.RangeDim(1, context, default=1), ct.RangeDim(1, context, default=1)
    cache = module.keyCache.shape
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(INPUTS[0], shape=(1, T), dtype=np.int32),
                ct.TensorType(INPUTS[1], shape=(1, 1, T, end), dtype=np.float16)],
        outputs=[ct.TensorType(OUTPUT, dtype=np.float16)],
        states=[ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name=n) for n in STATES],
        minimum_deployment_target=ct.target.macOS15,  # states need macOS 15 / iOS 18
        compute_precision=ct.precision.FLOAT16,
        compute_units=ct.ComputeUnit.ALL,  # Core ML picks CPU / GPU / Neural Engine per op
        skip_model_load=True,  # loading needs the macOS runtime
    )
    mlmodel.save(str(out))


def write_package(model, contexts: list[int], out: str | Path) -> None:
    """One .mlpackage with a function per context length (weights stored once); default: the first."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    with tempfile.TemporaryDirectory(prefix="slimtune-coreml-") as tmp:
        for c in contexts:
            convert(model, c, Path(tmp) / f"{c}.mlpackage")
            desc.add_function(str(Path(tmp) / f"{c}.mlpackage"), src_function_name="main",
                              target_function_name=function_name(c))
        desc.default_function_name = function_name(contexts[0])
        ct.utils.save_multifunction(desc, str(out))


def read_back(path: str | Path) -> dict:
    """What coremltools reads from the package: per function its inputs (dtype, shape ranges),
    outputs and states (shape, dtype); the weight file's bytes; the spec version."""
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2 as ft

    spec = ct.utils.load_spec(str(path))
    dtype = {v: k for k, v in ft.ArrayFeatureType.ArrayDataType.items()}

    def array(t):
        a = t.multiArrayType
        ranges = [[r.lowerBound, r.upperBound] for r in a.shapeRange.sizeRanges]
        return {"dtype": dtype[a.dataType], "shape": ranges or list(a.shape)}

    functions = {}
    for f in spec.description.functions:
        functions[f.name] = {
            "inputs": {i.name: array(i.type) for i in f.input},
            "outputs": {o.name: array(o.type) for o in f.output},
            "states": {s.name: {"dtype": dtype[s.type.stateType.arrayType.dataType],
                                "shape": list(s.type.stateType.arrayType.shape)} for s in f.state}}
    weights = sum(p.stat().st_size for p in Path(path).rglob("weights/*.bin"))
    return {"spec_version": spec.specificationVersion, "default_function": spec.description.defaultFunctionName,
            "functions": functions, "weight_bytes": weights}


def prompt_format(tokenizer, stops: list[int]) -> dict:
    """What the Swift prompt wrapper needs: the template's family (chatml / llama3, matched as the
    Ollama Modelfile matches it), the text it writes before the first turn, its default system
    prompt, and the stop ids. family None: the template is neither, use the Jinja fallback."""

    matched = match_template(tokenizer, add_bos=False) if tokenizer.chat_template else None
    fmt = {"family": None, "prefix": "", "default_system": None, "stop_ids": stops,
           "chat_template": tokenizer.chat_template}
    if matched:
        go, system = matched
        fmt.update(family="chatml" if "<|im_start|>" in go else "llama3", prefix=go[:go.index("{{")],
                   default_system=system)
    return fmt


def check_traced(model, tokenizer, chats, stops, context: int, n_new: int) -> dict:
    """The module that is converted, traced, against transformers: logits on the first prompt with
    float32 caches (the graph itself: must be ~0) and with fp16 caches as Core ML keeps them (the
    cost of fp16 storage, reported); greedy answers (the Swift loop's, in torch) with fp16 caches."""

    pairs = [(c, render_prompt(c, tokenizer)) for c in chats]
    pairs = [(c, i) for c, i in pairs if len(i) + n_new <= context]  # prompts that fit the context
    chats, ids = [c for c, _ in pairs], [i for _, i in pairs]
    ref = all_logits(model, ids[:1])[0]
    res, traced = {}, None
    for key, dtype in (("traced_max_abs_logit_diff", torch.float32), ("traced_fp16_cache_max_abs_logit_diff", torch.float16)):
        with torch.no_grad():
            traced = torch.jit.trace(StatefulLM(model, context, dtype).eval(),
                                     (torch.zeros(1, 2, dtype=torch.int32), causal_mask(2, 5)))
            got = traced(torch.tensor([ids[0]], dtype=torch.int32), causal_mask(len(ids[0]), len(ids[0])))[0]
        res[key] = float((ref - got).abs().max())
    answers = [torch_greedy(model, i, n_new, stops) for i in ids]
    res["traced_greedy_equal"] = sum(stateful_greedy(traced, i, n_new, stops) == a for i, a in zip(ids, answers))
    res["traced_prompts"] = len(ids)
    res["reference"] = [{"messages": c, "prompt_ids": i, "greedy_ids": a} for c, i, a in zip(chats, ids, answers)]
    return res


def copy_swift(dst: Path) -> None:
    """The Swift package and the Mac check script shipped as package data."""
    src = resources.files("slimtune.ship") / "swift"
    shutil.copytree(str(src), dst / "SlimtuneChat", ignore=shutil.ignore_patterns("check_on_mac.py", "__pycache__"))
    shutil.copy(str(src / "check_on_mac.py"), dst / "check_on_mac.py")


def export_coreml(run: str, out: str, contexts: list[int] | None = None, verify: bool = True,
                  n_prompts: int = 4, n_new: int = 32, log=None) -> dict:
    """Merge RUN and write DIR (see the module note). Returns {out, bytes, weight_bytes, functions,
    seconds_convert, traced_max_abs_logit_diff, traced_greedy_equal, prompts, ...}."""

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    contexts = contexts or [2048, 4096]
    out_p = Path(out)
    if out_p.exists() and any(out_p.iterdir()) and not (out_p / PACKAGE).exists():
        raise SlimtuneError(f"{out} exists and is not an earlier Core ML export: choose a new --out folder")
    m = merge_in_memory(run, log)
    if m.model.config.model_type not in ARCHS:
        raise SlimtuneError(f"Core ML export supports the Llama family, Qwen2 and Qwen3; this model is "
                            f"'{m.model.config.model_type}'")
    if any(c < 16 or c > m.model.config.max_position_embeddings for c in contexts):
        raise SlimtuneError(f"--context {contexts}: each between 16 and the model's "
                            f"{m.model.config.max_position_embeddings} positions")
    stops = stop_ids(m.tokenizer, m.model)
    res = {"out": str(out), "format": "coreml", "parity_merged": m.parity, "contexts": contexts}
    chats = load_prompts("builtin:eval_prompts", n_prompts, m.cfg.data.system_prompt)
    if verify:
        res.update(check_traced(m.model, m.tokenizer, chats, stops, min(contexts), n_new))
        log(f"traced stateful module vs transformers: max |logit difference| {res['traced_max_abs_logit_diff']:.2e} "
            f"(fp16 KV cache: {res['traced_fp16_cache_max_abs_logit_diff']:.2e}), greedy answers (fp16 cache) equal on "
            f"{res['traced_greedy_equal']} of {res['traced_prompts']} prompts")
        if res["traced_max_abs_logit_diff"] > TRACE_TOL:
            raise SlimtuneError("the traced Core ML module does not compute the merged model "
                                f"({res['traced_max_abs_logit_diff']:.2e}); please report this")
    reference = res.pop("reference", None)
    t0 = time.time()
    with atomic_dir(out) as tmp:
        log(f"converting with coremltools: {len(contexts)} function(s), contexts {contexts} ...")
        write_package(m.model, contexts, tmp / PACKAGE)
        m.tokenizer.save_pretrained(tmp)  # tokenizer.json for swift-transformers, chat template
        fmt = prompt_format(m.tokenizer, stops)
        (tmp / "prompt_format.json").write_text(json.dumps(fmt, indent=2) + "\n")
        if reference:
            (tmp / "reference.json").write_text(json.dumps({"function": function_name(min(contexts)),
                                                            "stop_ids": stops, "answers": reference}) + "\n")
        copy_swift(tmp)
        (tmp / "README.md").write_text(readme(Path(str(run).rstrip("/")).name, contexts, fmt))
    open_permissions(out)
    res["seconds_convert"] = round(time.time() - t0, 1)
    res.update(read_back(out_p / PACKAGE))
    res["bytes"] = sum(f.stat().st_size for f in (out_p / PACKAGE).rglob("*") if f.is_file())
    n_params = sum(p.numel() for p in m.model.parameters())  # tied embeddings counted once
    res["weight_bytes_per_param"] = round(res["weight_bytes"] / n_params, 3)
    log(f"wrote {out}/{PACKAGE} ({res['bytes'] / 2**20:.1f} MiB, {res['weight_bytes_per_param']} bytes a "
        f"parameter) in {res['seconds_convert']} s; functions {list(res['functions'])}. Core ML predictions "
        f"need macOS: run {out}/check_on_mac.py there")
    return res


def readme(name: str, contexts: list[int], fmt: dict) -> str:
    ctx = ", ".join(f"`{function_name(c)}` ({c} tokens)" for c in contexts)
    wrapper = (f"`{fmt['family']}` (matched against the training chat template)" if fmt["family"] else
               "none matched: the template is neither ChatML nor Llama-3 shaped, so render prompts with "
               "swift-transformers' `applyChatTemplate` (Jinja) instead of `PromptWrapper`")
    return f"""# {name} for Core ML (written by `slimtune export --format coreml`)

- `{PACKAGE}`: ML program, fp16 weights, KV cache as model state (macOS 15 / iOS 18 or later).
  Functions, one per context length, sharing the weights: {ctx}; default `{function_name(contexts[0])}`.
  Inputs `inputIds` (1, T) int32 and `causalMask` (1, 1, T, END) fp16; output `logits` (1, T, vocab);
  states `keyCache`, `valueCache`. Compute units are left to Core ML (`.all`).
- `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`: the training tokenizer.
- `prompt_format.json`: the prompt wrapper's family {wrapper}; its stop ids.
- `SlimtuneChat/`: a Swift package (loader, prompt wrapper, greedy generate loop, `slimtune-chat` CLI).
- `check_on_mac.py` + `reference.json`: the on-Mac check (transformers' greedy answers, made at export).

## Run it

    cd SlimtuneChat && swift run -c release slimtune-chat .. "What is the capital of France?"

In an app: add `SlimtuneChat` as a local package, then

    let chat = try await SlimtuneChat(folder: url)          // compiles Model.mlpackage once
    let answer = try await chat.reply(to: [["role": "user", "content": "Hi"]], maxNewTokens: 128)

## Check it (on a Mac, Python with coremltools and numpy)

    python check_on_mac.py .        # Core ML greedy answers vs transformers' (reference.json)

Greedy answers of the fp16 program may part from transformers' fp32 ones where two tokens are
nearly tied; the script prints how many agree, where the first difference is, and the logits' gap.
"""
