"""A lean decoding step for Llama-family models: one new token per row with fewer operators.

At batch 1 on a CPU a decoding step through transformers' forward costs about twice its weight
reads (BENCHMARKS.md, "Generation against its limits": ~33 ms against ~17 ms for SmolLM2-135M in
fp32); part of the rest is per-operator dispatch: the causal-mask builder, Cache objects, hooks,
output classes. `LeanDecoder.step` computes what
`model(input_ids=(B, 1), attention_mask, position_ids, past_key_values=cache)` computes with

- the rotary angles (the model's own `rotary_emb`) and the padding mask built once per step,
- attention through transformers' own SDPA function, writing into generate.py's preallocated KV
  buffers directly,
- under bf16 generation no autocast: each weight is cast to bf16 once per generation and, on a CPU
  with oneDNN, packed in its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
  torch.compile's CPU freezing does) with q/k/v and gate/up each one matmul. A plain bf16 `F.linear`
  re-lays the weight out at every call: at batch 24 the packed matmul takes 0.7x the time of the
  plain one for a layer's projections and 0.35x for the 49k-row head (BENCHMARKS.md). Packed
  weights are bitwise the plain bf16 matmul's results. A packed decoder also runs the prefill
  (`forward` with T > 1: causal and padding masks), so generation needs no other bf16 copy.
  (Fusing q/k/v in fp32 gave no measurable gain at batch 1, so fp32 keeps transformers' layout.)

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


_PACKS: dict[str, bool] = {}


def can_pack(device: torch.device | str) -> bool:
    """oneDNN's packed bf16 linear works here (a CPU torch with mkldnn and native bf16 matmuls);
    probed once per process on a small matmul against F.linear."""
    kind = torch.device(device).type
    if kind not in _PACKS:
        ok = False
        if kind == "cpu" and torch.backends.mkldnn.is_available():
            try:
                ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
                w, x = torch.randn(8, 16).bfloat16(), torch.randn(3, 16).bfloat16()
                got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None,
                                                         "none", [], "")
                ok = ok and torch.allclose(got.float(), F.linear(x, w).float(), atol=1e-2)
            except (AttributeError, RuntimeError):
                ok = False
        _PACKS[kind] = ok
    return _PACKS[kind]


class _Proj:
    """One or more projections of the same input as one matmul: `proj(x)` -> their outputs (a
    tuple when several). Packed (oneDNN's bf16 blocked layout) or F.linear on (weight, bias)."""

    def __init__(self, linears: list[nn.Linear], dtype: torch.dtype, pack: bool, batch: int = 32):
        ws = [_weights(m, dtype) for m in linears]
        self.sizes = [w.shape[0] for w, _ in ws]
        self.pack = pack
        if len(ws) == 1:
            w, b = ws[0]
        else:
            w = torch.cat([w for w, _ in ws])
            b = None if all(x is None for _, x in ws) else torch.cat(
                [x if x is not None else w.new_zeros(w.shape[0]) for w, x in ws])
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, batch) if pack else w
        self.b = b

    def __call__(self, x: torch.Tensor):
        y = (torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "none", [], "") if self.pack
             else F.linear(x, self.w, self.b))
        return y if len(self.sizes) == 1 else y.split(self.sizes, dim=-1)


def _rope_of(net):
    """The model family's own `apply_rotary_pos_emb(q, k, cos, sin)` (its modeling module's)."""
    return getattr(sys.modules.get(type(net).__module__), "apply_rotary_pos_emb", None)


class _Layer:
    """One decoder layer: its projections in the step's dtype (packed: q/k/v and gate/up fused; plain:
    no copy where the weights already are in it) and its own norm modules."""

    def __init__(self, layer, dtype, pack):
        a, m = layer.self_attn, layer.mlp
        self.attn, self.ln1, self.ln2 = a, layer.input_layernorm, layer.post_attention_layernorm
        self.o, self.d = _Proj([_plain(a.o_proj)], dtype, pack), _Proj([_plain(m.down_proj)], dtype, pack)
        if pack:
            self.qkv = _Proj([_plain(x) for x in (a.q_proj, a.k_proj, a.v_proj)], dtype, pack)
            self.gu = _Proj([_plain(m.gate_proj), _plain(m.up_proj)], dtype, pack)
        else:
            q, k, v = (_Proj([_plain(x)], dtype, pack) for x in (a.q_proj, a.k_proj, a.v_proj))
            g, u = _Proj([_plain(m.gate_proj)], dtype, pack), _Proj([_plain(m.up_proj)], dtype, pack)
            self.qkv = lambda x: (q(x), k(x), v(x))
            self.gu = lambda x: (g(x), u(x))


class LeanDecoder:
    """See the module docstring. `step(tokens, positions, mask, cache)` -> (B, V) float32 logits."""

    def __init__(self, net, dtype: torch.dtype, pack: bool = False):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        cfg, body = net.config, net.model
        self.dtype, self.pack, self.attention, self.rope = dtype, pack, sdpa_attention_forward, _rope_of(net)
        self.embed, self.rotary, self.norm = body.embed_tokens, body.rotary_emb, body.norm
        self.head = _Proj([_plain(net.lm_head)], dtype, pack)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [_Layer(layer, dtype, pack) for layer in body.layers[:cfg.num_hidden_layers]]

    @classmethod
    def build(cls, net, dtype: torch.dtype = torch.float32, pack: bool = False) -> LeanDecoder | None:
        """A decoder for `net` (a transformers CausalLM, adapters merged or none), or None. pack
        (bf16 only, where `can_pack`): the weights in oneDNN's packed layout, q/k/v and gate/up fused."""
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
        return cls(net, dtype, pack and dtype == torch.bfloat16 and can_pack(next(net.parameters()).device))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """tokens, positions (B, T); mask (B, L): 1 for every position attended, these T tokens'
        included (the last T); cache: generate._Cache, its layers' buffers filled to L - T. T > 1
        (a prefill) attends causally among the T. Returns the last position's (B, V) float32 logits."""
        B, T = tokens.shape
        L = mask.shape[1]
        h = self.embed(tokens).float()                                   # (B, T, H) residual, fp32
        cos, sin = self.rotary(h, positions)                             # (B, T, D), fp32
        attend = mask.bool()[:, None, None, :]                           # (B, 1, 1, L)
        if T > 1:  # causal among the new tokens; each attends to itself, so a padding row is never empty
            q_at = torch.arange(L - T, L, device=mask.device)[:, None]   # (T, 1) absolute index of each query
            k_at = torch.arange(L, device=mask.device)[None, :]
            attend = (attend & (k_at <= q_at)) | (k_at == q_at)           # (B, 1, T, L)
        D, nq, nkv = self.head_dim, self.heads, self.kv_heads
        for i, lay in enumerate(self.layers):
            x = lay.ln1(h).to(self.dtype)  # the model's own norms, on the fp32 residual
            q, k, v = lay.qkv(x)
            # the model's own rotary, in fp32 as transformers computes it under autocast, then the attention dtype
            q, k = self.rope(q.reshape(B, T, nq, D).transpose(1, 2).float(), k.reshape(B, T, nkv, D).transpose(1, 2).float(),
                             cos, sin)                                   # (B, nq / nkv, T, D)
            keys, values = cache.update(k.to(self.dtype), v.reshape(B, T, nkv, D).transpose(1, 2), i)
            out, _ = self.attention(lay.attn, q.to(self.dtype), keys, values, attend, scaling=lay.attn.scaling,
                                    is_causal=False)
            h = h + lay.o(out.reshape(B, T, nq * D)).float()
            x = lay.ln2(h).to(self.dtype)
            g, u = lay.gu(x)
            h = h + lay.d(F.silu(g) * u).float()
        x = self.norm(h[:, -1]).to(self.dtype)
        return self.head(x).float()


__all__ = ["LeanDecoder", "SUPPORTED", "can_pack"]
