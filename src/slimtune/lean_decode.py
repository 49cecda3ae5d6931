"""A lean decoding step for Llama-family models: one new token per row with fewer operators.

At batch 1 on a CPU a decoding step through transformers' forward costs about twice its weight
reads (BENCHMARKS.md, "Generation against its limits": ~33 ms against ~17 ms for SmolLM2-135M in
fp32); part of the rest is per-operator dispatch: the causal-mask builder, Cache objects, hooks,
output classes. `LeanDecoder.step` computes what
`model(input_ids=(B, 1), attention_mask, position_ids, past_key_values=cache)` computes with

- the rotary angles (the model's own `rotary_emb`) and the padding mask built once per step,
- attention through transformers' own SDPA function, writing into generate.py's preallocated KV
  buffers directly,
- under bf16 generation no autocast: the weights `generate._cast_once` cast once are used as they
  are. (Fusing q/k/v and gate/up into one matmul each was tried: no measurable gain at batch 1 for a
  second copy of the body's weights, so it is not done.)

`LeanDecoder.build(net, dtype)` returns None for anything it does not cover: a model type outside
Llama / Mistral / Qwen2, a sliding window in use, a non-SiLU MLP, adapter layers that are not
merged, prompt or prefix tuning. Those decode through transformers' forward, as before. Prefill
always goes through transformers' forward (it fills the KV buffers the lean step continues).
dtype bfloat16: matmuls in bf16, the residual stream, norms and rotary in fp32 (what autocast
does, without its per-call casts); not bitwise autocast's rounding, so bf16 answers can
differ from autocast's as two bf16 runs may. fp32: the same logits as transformers' forward to
float rounding (tests/test_lean_decode.py), the same greedy ids.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = {"llama", "mistral", "qwen2"}


def _plain(m) -> nn.Linear | None:
    """The nn.Linear a projection computes with: itself, or a PEFT layer's base layer when every
    active adapter is merged into it (its forward then is the base layer's)."""
    if type(m) is nn.Linear:
        return m
    base = getattr(m, "base_layer", None)
    if type(base) is nn.Linear and not getattr(m, "disable_adapters", False):
        active = set(getattr(m, "active_adapters", []) or [])
        if active and active <= set(getattr(m, "merged_adapters", [])):
            return base
    return None


def _weights(linear: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a projection in `dtype` (no copy where it already is)."""
    return linear.weight.detach().to(dtype), None if linear.bias is None else linear.bias.detach().to(dtype)


def _rope_of(net):
    """The model family's own `apply_rotary_pos_emb(q, k, cos, sin)` (its modeling module's)."""
    return getattr(sys.modules.get(type(net).__module__), "apply_rotary_pos_emb", None)


class _Layer:
    """One decoder layer: its projections in the step's dtype (no copy where they already are: under bf16
    generation `generate._cast_once` has swapped bf16 weights in) and its own norm modules."""

    def __init__(self, layer, dtype):
        a, m = layer.self_attn, layer.mlp
        self.attn, self.ln1, self.ln2 = a, layer.input_layernorm, layer.post_attention_layernorm
        self.q, self.k, self.v, self.o, self.g, self.u, self.d = (
            _weights(_plain(x), dtype) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                                                  m.down_proj))


class LeanDecoder:
    """See the module docstring. `step(tokens, positions, mask, cache)` -> (B, V) float32 logits."""

    def __init__(self, net, dtype: torch.dtype):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        cfg, body = net.config, net.model
        self.dtype, self.attention, self.rope = dtype, sdpa_attention_forward, _rope_of(net)
        self.embed, self.rotary, self.norm = body.embed_tokens, body.rotary_emb, body.norm
        self.head = _weights(_plain(net.lm_head), dtype)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [_Layer(layer, dtype) for layer in body.layers[:cfg.num_hidden_layers]]

    @classmethod
    def build(cls, net, dtype: torch.dtype = torch.float32) -> LeanDecoder | None:
        """A decoder for `net` (a transformers CausalLM, adapters merged or none), or None."""
        cfg = getattr(net, "config", None)
        body = getattr(net, "model", None)
        if cfg is None or body is None or getattr(cfg, "model_type", None) not in SUPPORTED:
            return None
        if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            return None
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", cfg.model_type == "mistral"):
            return None  # a window would hide old keys that this step attends to
        if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", "slimtune_sdpa"):
            return None
        if any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "attn_logit_softcapping")):
            return None
        if not all(hasattr(body, n) for n in ("embed_tokens", "rotary_emb", "layers", "norm")):
            return None
        for layer in body.layers:
            a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if a is None or m is None or hasattr(a, "q_norm") or hasattr(a, "sinks"):
                return None
            names = [getattr(a, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            names += [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            if any(x is None or _plain(x) is None for x in names):
                return None
        if _plain(getattr(net, "lm_head", None)) is None or _rope_of(net) is None:
            return None
        return cls(net, dtype)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """tokens, positions (B, 1); mask (B, L): 1 for every position attended, this token's
        included; cache: generate._Cache, its layers' buffers filled to L - 1. Returns (B, V)."""
        B = tokens.shape[0]
        h = self.embed(tokens).float()                                   # (B, 1, H) residual, fp32
        cos, sin = self.rotary(h, positions)                             # (B, 1, D), fp32
        attend = mask.bool()[:, None, None, :]                           # (B, 1, 1, L)
        D, nq, nkv = self.head_dim, self.heads, self.kv_heads
        for i, lay in enumerate(self.layers):
            x = lay.ln1(h).to(self.dtype)  # the model's own norms, on the fp32 residual
            q, k, v = F.linear(x, *lay.q), F.linear(x, *lay.k), F.linear(x, *lay.v)
            # the model's own rotary, in fp32 as transformers computes it under autocast, then the attention dtype
            q, k = self.rope(q.view(B, 1, nq, D).transpose(1, 2).float(), k.view(B, 1, nkv, D).transpose(1, 2).float(),
                             cos, sin)                                   # (B, nq / nkv, 1, D)
            keys, values = cache.layers[i].update(k.to(self.dtype), v.view(B, 1, nkv, D).transpose(1, 2))
            out, _ = self.attention(lay.attn, q.to(self.dtype), keys, values, attend, scaling=lay.attn.scaling,
                                    is_causal=False)
            h = h + F.linear(out.reshape(B, 1, nq * D), *lay.o).float()
            x = lay.ln2(h).to(self.dtype)
            h = h + F.linear(F.silu(F.linear(x, *lay.g)) * F.linear(x, *lay.u), *lay.d).float()
        x = self.norm(h).to(self.dtype)
        return F.linear(x[:, -1], *self.head).float()


__all__ = ["LeanDecoder", "SUPPORTED"]
