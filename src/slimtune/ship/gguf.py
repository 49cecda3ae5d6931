"""`slimtune export RUN --format gguf --type f32|f16|q8_0 --out model.gguf`: one file for
llama.cpp, Ollama and LM Studio.

    run --merge_in_memory (parity printed)--> merged fp32 model + training tokenizer
        --> GGUF: architecture keys, tensors under llama.cpp's names, tokenizer + chat template
        --> Modelfile beside it (Ollama)
        --> check: transformers' own GGUF reader loads the file; its logits vs the merged model's

What follows llama.cpp's convert_hf_to_gguf.py (the reference writer):
- Llama q/k weights are permuted from Hugging Face's rotate-half RoPE layout to the interleaved
  one llama.cpp's `llama` architecture uses (LlamaModel.permute); Qwen2/3 use NEOX RoPE, which is
  rotate-half already, so they are written as they are.
- Tied embeddings: only token_embd is written; llama.cpp uses it as the output matrix when
  output.weight is absent, and transformers' reader sets tie_word_embeddings from that absence.
- f16 / q8_0 apply to matrices; norms, biases and vectors stay f32. A matrix whose rows do not
  split into q8_0 blocks of 32 falls back to f16, as in convert_hf_to_gguf.py.
- Llama-3.1-style RoPE scaling is carried as the `rope_freqs` tensor of per-frequency divisors.
  transformers' GGUF reader ignores that tensor, so the read-back check gives the reloaded model
  the source's RoPE config back (the tensor itself is checked against transformers' own scaling).
"""

from __future__ import annotations

import copy
import math
import sys
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers.modeling_gguf_pytorch_utils as reader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import SlimtuneError
from ..utils import atomic_file
from .gguf_vocab import add_vocab, vocab_metadata
from .merge import all_logits, max_abs_diff, merge_in_memory
from .modelfile import write_modelfile

TYPES = ("f32", "f16", "q8_0")
ARCHS = ("llama", "qwen2", "qwen3")  # transformers model_type == llama.cpp architecture name
# Read back, the file's logits must equal those of the merged model with the same rounding applied
# in torch to this bound; the difference from the unrounded model is the cost of f16 / q8_0 (reported).
READ_BACK_TOL = 1e-3


def check_supported(config) -> None:
    """Raise SlimtuneError unless llama.cpp's llama / qwen2 / qwen3 graph computes this model."""
    mt = config.model_type
    if mt not in ARCHS:
        raise SlimtuneError(f"GGUF export supports the Llama family (SmolLM2, Llama 3.x), Qwen2 and Qwen3; "
                            f"this model is '{mt}'. Save it with `slimtune merge` and convert it with "
                            f"llama.cpp's convert_hf_to_gguf.py")
    if mt == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise SlimtuneError("GGUF export: a Llama with attention_bias/mlp_bias is not supported")
    if getattr(config, "use_sliding_window", False):
        raise SlimtuneError("GGUF export: sliding-window attention is not supported")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise SlimtuneError(f"GGUF export: RoPE scaling '{rope.get('rope_type')}' is not supported "
                            "(only none and Llama-3.1 style)")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * head_dim, ...) rotate-half rows -> llama.cpp's interleaved pairs, per head.

    Within each head, rows [0..d/2) and [d/2..d) (the halves HF rotates together) become
    rows 0,2,4.. and 1,3,5..; transformers' GGUF reader undoes exactly this."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config) -> torch.Tensor:
    """(head_dim/2,) divisors of each RoPE frequency for rope_type=llama3 (llama.cpp's rope_freqs)."""
    rope = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, lo, hi = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(model):
    """Yield (llama.cpp name, float32 tensor) for every weight of a llama / qwen2 / qwen3 model."""

    cfg = model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == cfg.model_type)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if cfg.model_type == "llama" and (getattr(cfg, "rope_parameters", None) or {}).get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(cfg)
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # token_embd doubles as the output matrix
        stem, _, suffix = hf_name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise SlimtuneError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        t = t.detach().float().cpu()
        if cfg.model_type == "llama" and stem.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if stem.endswith("q_proj") else cfg.num_key_value_heads
            t = permute_qk(t, heads)
        yield f"{name}.{suffix}", t


def encode(name: str, t: torch.Tensor, kind: str):
    """(array, GGMLQuantizationType) for one tensor in the requested file type."""

    data = t.numpy()
    if kind == "f32" or data.ndim < 2 or name.endswith("_norm.weight"):
        return data.astype(np.float32), Q.F32
    if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0
    return data.astype(np.float16), Q.F16


def add_architecture(writer, cfg, n_vocab: int, kind: str, title: str) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph, and general.*."""

    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    writer.add_name(title)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_gguf(model, tokenizer, out: str | Path, kind: str = "f16", title: str = "slimtune export") -> dict:
    """Write `model` (llama / qwen2 / qwen3, any dtype) and `tokenizer` to one GGUF file at `out`,
    atomically (a temp file beside it, renamed at the end). Returns the tokenizer metadata written."""

    if kind not in TYPES:
        raise SlimtuneError(f"--type {kind}: choose one of {', '.join(TYPES)}")
    cfg = model.config
    check_supported(cfg)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    meta = vocab_metadata(tokenizer, n_vocab)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), cfg.model_type)
        add_architecture(writer, cfg, n_vocab, kind, title)
        add_vocab(writer, meta)
        for name, t in gguf_tensors(model):
            data, qtype = encode(name, t, kind)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return meta


def reload_with_transformers(path: str | Path):
    """(model, tokenizer) read back from the GGUF by transformers' own GGUF loader, float32."""


    if getattr(reader, "tqdm", None) is not None and not isinstance(reader.tqdm, partial):
        reader.tqdm = partial(reader.tqdm, disable=True)  # a bar per file read floods the log
    p = Path(path).resolve()
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


PROBE_CHAT = [{"role": "system", "content": "You answer in one line."},
              {"role": "user", "content": "What is 12 + 30? Surely 42, isn't it?"},
              {"role": "assistant", "content": "Yes: 42.\n\n  Indented `code`, émigré café."}]


def same_chat_ids(tok_a, tok_b, chat=PROBE_CHAT) -> bool:
    """Both tokenizers render the chat (as a prompt, and whole) to the same token ids."""
    def ids(tok, n, gen):
        return tok.apply_chat_template(chat[:n], tokenize=True, add_generation_prompt=gen,
                                       return_dict=True)["input_ids"]
    return all(ids(tok_a, n, gen) == ids(tok_b, n, gen) for n, gen in ((len(chat) - 1, True), (len(chat), False)))


def rounded_like_file(model, kind: str):
    """A copy of `model` whose weights went through the same f16 / q8_0 rounding as the file's
    (quantise, then de-quantise with gguf's own code); the model itself for f32."""


    if kind == "f32":
        return model
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            data, qtype = encode(name, p.detach().float().cpu(), kind)
            p.copy_(torch.from_numpy(dequantize(data, qtype).reshape(p.shape).copy()))
    return twin


def check_export(path: str | Path, merged, tokenizer, inputs: list[list[int]], logits: list[torch.Tensor],
                 kind: str = "f32") -> dict:
    """Read the GGUF back with transformers' loader and compare it with the merged model:
    max_abs_logit_diff: its logits vs the merged model's (`logits`, float32, on `inputs`);
    max_abs_logit_diff_rounded: vs the merged model with the file's rounding applied in torch
        (about 1e-5 when the file holds exactly what was meant to be written);
    top1_agreement: share of positions whose most likely next token is the merged model's;
    tokenizer_match: its tokenizer renders a chat to the same ids as `tokenizer`."""

    model, gtok = reload_with_transformers(path)
    if (getattr(merged.config, "rope_parameters", None) or {}).get("rope_type") == "llama3":
        model.model.rotary_emb = type(model.model.rotary_emb)(config=merged.config)  # see the module note
    got = all_logits(model, inputs)
    del model
    rounded = logits if kind == "f32" else all_logits(rounded_like_file(merged, kind), inputs)
    same_top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, got))
    return {"max_abs_logit_diff": max_abs_diff(logits, got), "max_abs_logit_diff_rounded": max_abs_diff(rounded, got),
            "top1_agreement": same_top1 / sum(len(a) for a in logits),
            "tokenizer_match": same_chat_ids(tokenizer, gtok)}


def export_gguf(run: str, out: str, kind: str = "f16", verify: bool = True, log=None) -> dict:
    """Merge RUN (a run folder or a plain model) and write it as one GGUF file plus an Ollama
    Modelfile beside it; with verify, reload it with transformers and compare logits.

    Returns {out, type, bytes, parity_merged, max_abs_logit_diff, tokenizer_match, modelfile}."""

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if kind not in TYPES:
        raise SlimtuneError(f"--type {kind}: choose one of {', '.join(TYPES)}")
    if not str(out).endswith(".gguf"):
        raise SlimtuneError(f"--out {out}: name the file *.gguf")
    m = merge_in_memory(run, log)
    check_supported(m.model.config)
    log(f"parity on {len(m.inputs)} prompts, max |logit difference| merged vs the run: {m.parity:.2e}")
    meta = write_gguf(m.model, m.tokenizer, out, kind, title=Path(str(run).rstrip("/")).name)
    modelfile = write_modelfile(out, m.tokenizer, meta)
    res = {"out": str(out), "type": kind, "bytes": Path(out).stat().st_size, "parity_merged": m.parity,
           "modelfile": str(modelfile)}
    log(f"wrote {out} ({res['bytes'] / 2**20:.1f} MiB, {kind}) and {modelfile}")
    if verify:
        try:
            res.update(check_export(out, m.model, m.tokenizer, m.inputs, m.logits, kind))
        except (ValueError, RuntimeError, KeyError, OSError) as e:  # the reader's limits, not the file's
            raise SlimtuneError(f"wrote {out}, but transformers' GGUF loader cannot read it back to check it "
                                f"({type(e).__name__}: {str(e)[:200]}); it reads fewer models than llama.cpp "
                                f"(e.g. Qwen3 only with head_dim 128). Export with --no-verify to skip the check")
        log(f"read back by transformers: max |logit difference| vs the merged model {res['max_abs_logit_diff']:.2e}, "
            f"vs the merged model with the same {kind} rounding {res['max_abs_logit_diff_rounded']:.2e}, "
            f"same top token at {res['top1_agreement']:.1%} of positions; "
            f"tokenizer {'gives the same ids' if res['tokenizer_match'] else 'DIFFERS'}")
        if res["max_abs_logit_diff_rounded"] > READ_BACK_TOL or not res["tokenizer_match"]:
            Path(out).unlink()  # a file that does not hold the model must not be shipped by mistake
            raise SlimtuneError(
                f"{out} does not read back as written, so it was removed: read by transformers' GGUF loader, its "
                f"logits differ by {res['max_abs_logit_diff_rounded']:.2e} from the merged model rounded to {kind} "
                f"(tokenizer match: {res['tokenizer_match']}); please report this, or keep the file with --no-verify")
    return res
