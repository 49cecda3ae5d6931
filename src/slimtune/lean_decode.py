"""A lean decoding step for Llama-family models: one new token per row with fewer operators.

At batch 1 on a CPU a decoding step through transformers' forward costs about twice its weight
reads (BENCHMARKS.md, "Generation against its limits": ~33 ms against ~17 ms for SmolLM2-135M in
fp32); part of the rest is per-operator dispatch: the causal-mask builder, Cache objects, hooks,
output classes. `LeanDecoder.step` computes what
`model(input_ids=(B, 1), attention_mask, position_ids, past_key_values=cache)` computes with

- the rotary angles (the model's own `rotary_emb`) and the padding mask built once per step,
- attention writing into generate.py's preallocated KV buffers directly (PyTorch's SDPA for one
  token, transformers' SDPA function for a prefill),
- under bf16 generation no autocast: each weight is cast to bf16 once per generation and, on a CPU
  with oneDNN, packed in its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
  torch.compile's CPU freezing does) with q/k/v and gate/up each one matmul. A plain bf16 `F.linear`
  re-lays the weight out at every call: at batch 24 the packed matmul takes 0.7x the time of the
  plain one for a layer's projections and 0.35x for the 49k-row head (BENCHMARKS.md). Packed
  weights are bitwise the plain bf16 matmul's results. A packed decoder also runs the prefill
  (`step` with T > 1: causal and padding masks; norms, projections and MLP on the real positions
  only, the padding's rows left out), so generation needs no other bf16 copy, and
  trims operators (`step`, packed or not, fp32 included):
  RMSNorm in five operators (`F.rms_norm` is a dozen on the CPU), gate SiLU and the up-projection's
  product as oneDNN post-ops, and for one new token q and k rotated by one (B, D, D) matmul, attention
  through SDPA's grouped-query path, the padding mask made additive once per step; logits returned
  in the step's dtype (no float copy of a (B, 49k) row per step). Generation runs in inference mode
  (`generate._decode`). bf16 packed, batch 1: 37 -> 24 ms a step, batch 32: ~43 ms (BENCHMARKS.md).
  (Fusing q/k/v in fp32 gave no measurable gain at batch 1, so fp32 keeps transformers' layout.)

`LeanDecoder.build(net, dtype)` returns None for anything it does not cover: a model type outside
Llama / Mistral / Qwen2, a sliding window in use, a non-SiLU MLP, adapter layers that are not
merged, prompt or prefix tuning, a norm other than an RMSNorm. Those decode through transformers'
forward, as before. An unpacked decoder's prefill goes through transformers' forward in generation
(it fills the KV buffers the lean step continues); `step` computes it too.
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
    active adapter is merged into it or its adapters are switched off with none merged (its forward
    then is the base layer's)."""
    if type(m) is nn.Linear:
        return m
    base = getattr(m, "base_layer", None)
    if type(base) is nn.Linear:
        merged = set(getattr(m, "merged_adapters", []) or [])
        if getattr(m, "disable_adapters", False):  # switched off: the base layer's forward, if nothing is merged in
            return None if merged else base
        active = set(getattr(m, "active_adapters", []) or [])
        if active and active <= merged:
            return base
    return None


_PACKS: dict[str, bool] = {}


def can_pack(device: torch.device | str) -> bool:
    """oneDNN's packed bf16 linear works here (a CPU torch with mkldnn and native bf16 matmuls), with
    the SiLU ("swish") and multiply post-ops the packed MLP uses; probed once per process on a small
    matmul against F.linear (its own generator: the global one is left alone)."""
    kind = torch.device(device).type
    if kind not in _PACKS:
        ok = False
        if kind == "cpu" and torch.backends.mkldnn.is_available():
            try:
                ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
                g = torch.Generator().manual_seed(0)
                w, x = torch.randn(8, 16, generator=g).bfloat16(), torch.randn(3, 16, generator=g).bfloat16()
                pw, ref = torch.ops.mkldnn._reorder_linear_weight(w, 3), F.linear(x, w).float()
                got = torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], "")
                act = torch.ops.mkldnn._linear_pointwise(x, pw, None, "swish", [], "")
                mul = torch.ops.mkldnn._linear_pointwise.binary(x, act, pw, None, "mul")
                ok = ok and torch.allclose(got.float(), ref, atol=1e-2) and torch.allclose(
                    act.float(), F.silu(ref), atol=2e-2) and torch.allclose(mul.float(), ref * F.silu(ref), atol=5e-2,
                                                                            rtol=2e-2)
            except (AttributeError, RuntimeError):
                ok = False
        _PACKS[kind] = ok
    return _PACKS[kind]


def room_to_pack(net, share: float = 0.5, nbytes: int = 2) -> bool:
    """A packed copy of `net`'s weights (`nbytes` a parameter: 2 for bf16, 4 for MKL's fp32) fits
    in `share` of the memory still available: a model stored in bf16 would otherwise hold its
    weights twice while it generates (an 8B model: 16 GB more). Unknown free memory (not Linux):
    assume it fits."""
    from .machine import available_memory

    free = available_memory()
    return free is None or nbytes * sum(p.numel() for p in net.parameters()) <= share * free


MKL_MIN_ROWS = 8
"""fp32 decoding of at least this many rows packs its weights for MKL (`can_mkl_pack`): 0.67x the
matmul time at 8 rows, 0.8x at 24-64; none at 1 (bench/results/decode_step_mkl.json)."""
_MKL: dict[str, bool] = {}


def can_mkl_pack(device: torch.device | str) -> bool:
    """MKL's packed fp32 sgemm works here (`torch.ops.mkl._mkl_linear`, what torch.compile's CPU
    freezing uses for fp32 linears) and gives F.linear's output bit for bit (the same kernel with
    the weight laid out once instead of at every call); probed once per process."""
    kind = torch.device(device).type
    if kind not in _MKL:
        ok = False
        if kind == "cpu" and torch.backends.mkl.is_available():
            try:
                g = torch.Generator().manual_seed(0)
                w, b, x = (torch.randn(*s, generator=g) for s in ((40, 24), (40,), (9, 24)))
                ok = torch.equal(torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 9), w, b, 9),
                                 F.linear(x, w, b))
            except (AttributeError, RuntimeError):
                ok = False
        _MKL[kind] = ok
    return _MKL[kind]


class _Scratch:
    """One buffer that a packed decoder's weights are cast into, one projection after another, before
    oneDNN lays each out in its own copy: a fresh bf16 tensor per weight was a page-faulting
    allocation of the whole model's size again on every build (GRPO builds one per step)."""

    def __init__(self, dtype: torch.dtype):
        self.buf, self.dtype = None, dtype

    def filled(self, linears: list[nn.Linear]) -> torch.Tensor:
        """The weights of `linears` stacked (rows, in), in the buffer's dtype."""
        rows, cols = sum(m.weight.shape[0] for m in linears), linears[0].weight.shape[1]
        if self.buf is None or self.buf.numel() < rows * cols:
            self.buf = None
            self.buf = torch.empty(rows * cols, dtype=self.dtype, device=linears[0].weight.device)
        w, at = self.buf[:rows * cols].view(rows, cols), 0
        for m in linears:
            w[at:at + m.weight.shape[0]].copy_(m.weight.detach())
            at += m.weight.shape[0]
        return w


class _Proj:
    """One or more projections of the same input as one matmul: `proj(x)` -> their outputs (a
    tuple when several; split=False: the one concatenated output). Packed (oneDNN's bf16 blocked
    layout) or F.linear on (weight, bias)."""

    def __init__(self, linears: list[nn.Linear], dtype: torch.dtype, pack: bool, batch: int = 32, split: bool = True,
                 post: str = "none", scratch: _Scratch | None = None):
        sizes = [m.weight.shape[0] for m in linears]
        self.sizes = sizes if split else [sum(sizes)]
        self.pack = pack
        bs = [None if m.bias is None else m.bias.detach().to(dtype) for m in linears]
        b = bs[0] if len(bs) == 1 else None if all(x is None for x in bs) else torch.cat(
            [x if x is not None else linears[0].weight.new_zeros(n, dtype=dtype) for n, x in zip(sizes, bs)])
        if pack and scratch is not None:  # cast into the shared buffer: the packed copy is the only new tensor
            w = scratch.filled(linears)
        else:  # in `dtype`, no copy where a single weight already is
            ws = [m.weight.detach().to(dtype) for m in linears]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, batch) if pack else w
        self.b, self.post = b, post
        self.mkl, self.rows = None, 0

    def fit(self, rows: int):
        """fp32: lay the weight out for MKL's packed sgemm at `rows` rows (its output is F.linear's
        bit for bit; any other row count falls back to F.linear inside the call); 0: drop that copy."""
        self.mkl = None                                  # the old copy goes before the new one is made
        self.mkl = torch.ops.mkl._mkl_reorder_linear_weight(self.w, rows) if rows else None
        self.rows = rows

    def __call__(self, x: torch.Tensor):
        if self.pack:
            y = torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, self.post, [], "")
        elif self.mkl is not None:
            y = torch.ops.mkl._mkl_linear(x, self.mkl, self.w, self.b, self.rows)
        else:
            y = F.linear(x, self.w, self.b)
        return y if len(self.sizes) == 1 else y.split(self.sizes, dim=-1)

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """proj(x) * other in one oneDNN call (packed only; other: proj(x)'s shape and dtype)."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.w, self.b, "mul")


def _rope_of(net):
    """The model family's own `apply_rotary_pos_emb(q, k, cos, sin)` (its modeling module's)."""
    return getattr(sys.modules.get(type(net).__module__), "apply_rotary_pos_emb", None)


def _rms(module):
    """(weight, eps) of a Llama / Mistral / Qwen2-style RMSNorm (x * rsqrt(mean(x^2) + eps) * weight),
    or None for any other norm."""
    w, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if w is None or eps is None or not type(module).__name__.endswith("RMSNorm"):
        return None
    return w.detach(), float(eps)


def rms_norms(net) -> bool:
    """Every norm of `net` is an RMSNorm the decoder computes itself (`_normed`)."""
    body = net.model
    return _rms(body.norm) is not None and all(
        _rms(x.input_layernorm) is not None and _rms(x.post_attention_layernorm) is not None for x in body.layers)


def _normed(h: torch.Tensor, norm: tuple[torch.Tensor, float], dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm of the fp32 residual h over its last dim, in `dtype`: the model's computation in
    five small operators (F.rms_norm is a dozen on the CPU)."""
    w, eps = norm
    return (h * torch.rsqrt((h * h).mean(-1, keepdim=True) + eps) * w).to(dtype)


class _Layer:
    """One decoder layer: its projections in the step's dtype and its own norms (plain: no copy
    where the weights already are in the dtype); packed: q/k/v one matmul, gate with SiLU and up
    with the multiply as oneDNN post-ops. `joined(x)`: q, k, v as one (B, T, (nq + 2 nkv) D) tensor;
    `mlp(x)`: down(silu(gate(x)) * up(x)). (Methods, not lambdas on self: a cycle would keep the
    packed weights alive until the garbage collector runs, 0.3 GB more at GRPO's peak.)"""

    def __init__(self, layer, dtype, pack, scratch: _Scratch | None = None):
        a, m = layer.self_attn, layer.mlp
        self.attn, self.scaling, self.pack = a, a.scaling, pack
        self.rms1, self.rms2 = _rms(layer.input_layernorm), _rms(layer.post_attention_layernorm)
        kw = {"scratch": scratch}
        self.o, self.d = _Proj([_plain(a.o_proj)], dtype, pack, **kw), _Proj([_plain(m.down_proj)], dtype, pack, **kw)
        if pack:
            self.q = _Proj([_plain(x) for x in (a.q_proj, a.k_proj, a.v_proj)], dtype, pack, split=False, **kw)
            self.gate = _Proj([_plain(m.gate_proj)], dtype, pack, post="swish", **kw)
        else:
            self.q, self.k, self.v = (_Proj([_plain(x)], dtype, pack) for x in (a.q_proj, a.k_proj, a.v_proj))
            self.gate = _Proj([_plain(m.gate_proj)], dtype, pack)
        self.up = _Proj([_plain(m.up_proj)], dtype, pack, **kw)

    def joined(self, x):
        return self.q(x) if self.pack else torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def mlp(self, x):
        if self.pack:
            return self.d(self.up.times(x, self.gate(x)))
        return self.d(F.silu(self.gate(x)) * self.up(x))


def _half_turn(D: int) -> torch.Tensor:
    """(D, D) P with x @ P = rotate_half(x) = cat(-x[D/2:], x[:D/2]) for a row vector x."""
    P, n = torch.zeros(D, D), D // 2
    P[torch.arange(n) + n, torch.arange(n)] = -1.0
    P[torch.arange(n), torch.arange(n) + n] = 1.0
    return P


class LeanDecoder:
    """See the module docstring. `step(tokens, positions, mask, cache)` -> (B, V) logits (its dtype)."""

    def __init__(self, net, dtype: torch.dtype, pack: bool = False):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        cfg, body = net.config, net.model
        self.dtype, self.pack, self.attention, self.rope = dtype, pack, sdpa_attention_forward, _rope_of(net)
        self.embed, self.rotary = body.embed_tokens, body.rotary_emb
        scratch = _Scratch(dtype) if pack else None     # the head first: the largest, so one allocation
        self.head = _Proj([_plain(net.lm_head)], dtype, pack, scratch=scratch)
        self.rms = _rms(body.norm)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [_Layer(layer, dtype, pack, scratch) for layer in body.layers[:cfg.num_hidden_layers]]
        self.turn = _half_turn(self.head_dim)
        self.mkl, self.rows = False, 0   # mkl: fp32 weights laid out for MKL's packed sgemm at `rows` rows

    def _projections(self) -> list[_Proj]:
        return [self.head] + [p for lay in self.layers for p in vars(lay).values() if isinstance(p, _Proj)]

    def fit(self, rows: int):
        """An MKL decoder (`build(..., rows=)`): its weights laid out for `rows` rows (a one-token
        step of that batch), or not at all below MKL_MIN_ROWS. `step` calls it when its batch
        changes (finished rows cut): ~0.1 s for the embedded model against ~10 ms saved a step."""
        rows = rows if rows >= MKL_MIN_ROWS else 0
        if self.mkl and rows != self.rows:
            for proj in self._projections():
                proj.fit(rows)
            self.rows = rows

    @classmethod
    def build(cls, net, dtype: torch.dtype = torch.float32, pack: bool = False, rows: int = 0) -> LeanDecoder | None:
        """A decoder for `net` (a transformers CausalLM, adapters merged or none), or None. pack
        (bf16 only, where `can_pack`): the weights in oneDNN's packed layout (see `_Layer`). rows
        (fp32, where `can_mkl_pack`): a copy of the weights laid out for MKL's packed sgemm at
        that batch size (`fit`; the same logits bit for bit, 0.8x the matmul time at batch 24-32)."""
        if not cls.covers(net, adapters=False):
            return None
        device = next(net.parameters()).device
        pack = pack and dtype == torch.bfloat16 and can_pack(device)
        dec = cls(net, dtype, pack)
        if rows and dtype == torch.float32 and can_mkl_pack(device):
            dec.mkl = True
            dec.fit(rows)
        return dec

    @staticmethod
    def covers(net, adapters: bool = True) -> bool:
        """`net`'s architecture is one this step computes. adapters=True: LoRA-style adapter layers on
        the projections are allowed (merged or switched off they decode here); False: every
        projection must compute as a plain Linear now."""
        cfg = getattr(net, "config", None)
        body = getattr(net, "model", None)
        if cfg is None or body is None or getattr(cfg, "model_type", None) not in SUPPORTED:
            return False
        if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            return False
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", cfg.model_type == "mistral"):
            return False  # a window would hide old keys that this step attends to
        if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", "slimtune_sdpa"):
            return False
        if any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "attn_logit_softcapping")):
            return False
        if not all(hasattr(body, n) for n in ("embed_tokens", "rotary_emb", "layers", "norm")) or not rms_norms(net):
            return False

        def ok(x):
            if x is None:
                return False
            if adapters and type(getattr(x, "base_layer", None)) is nn.Linear:
                return True
            return _plain(x) is not None

        for layer in body.layers:
            a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if a is None or m is None or hasattr(a, "q_norm") or hasattr(a, "sinks"):
                return False
            names = [getattr(a, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            names += [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            if not all(map(ok, names)):
                return False
        return ok(getattr(net, "lm_head", None)) and _rope_of(net) is not None

    def _rotated(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, T, heads, D) q and k rotated, in the step's dtype, as (B, heads, T, D): x cos +
        rotate_half(x) sin computed in the (B, T, heads, D) layout (in the transposed one every
        operator ran on strided memory, a quarter of a batch-32 prefill); the model's own rotary
        where cos is not D wide."""
        x, D = x.float(), x.shape[-1]
        if cos.shape[-1] != D:
            x = x.transpose(1, 2)
            return self.rope(x, x[:, :0], cos, sin)[0].to(self.dtype)
        turned = torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
        return (x * cos[:, :, None]).addcmul_(turned, sin[:, :, None]).to(self.dtype).transpose(1, 2)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """tokens, positions (B, T); mask (B, L): 1 for every position attended, these T tokens'
        included (the last T); cache: generate._Cache, its layers' buffers filled to L - T. T > 1
        (a prefill) attends causally among the T. Returns the last position's (B, V) logits in the
        step's dtype (bf16: the head's own output; a float32 copy of a batch-32 row of 49k logits
        cost 1.4 ms a step, and the argmax is the same)."""
        # RMSNorm in five operators (`_normed`); for one new token (T = 1) the short way: rotary as
        # one (B, D, D) rotation shared by all layers (cos and sin on the diagonal and the half-turn),
        # attention through SDPA's grouped-query path (no key/value repeat; 0.8x the time of each
        # key/value head's query heads passed as its G queries at batch 32); matmul outputs added to
        # the fp32 residual in place
        B, T = tokens.shape
        if self.mkl and T == 1 and B != self.rows:
            self.fit(B)
        D, nq, nkv, dt = self.head_dim, self.heads, self.kv_heads, self.dtype
        h = self.embed(tokens).float()                                   # (B, T, H) residual, fp32
        cos, sin = self.rotary(h, positions)                             # (B, T, D), fp32
        attend = _attend(mask, T)
        one = T == 1 and cos.shape[-1] == D
        if one:  # (B, D, D): x @ turn = x * cos + rotate_half(x) * sin; the mask additive once, not per layer
            turn = torch.diag_embed(cos[:, 0]) + self.turn * sin[:, 0, None, :]
            bias = torch.zeros(attend.shape, dtype=dt, device=h.device).masked_fill_(~attend, float("-inf"))
        nqk = (nq + nkv) * D
        sel = None
        if T > 1:  # a padded prefill: the row-wise work (norms, projections, MLP) on real positions only
            real = mask[:, -T:].reshape(-1).bool()
            if not bool(real.all()):
                sel = real.nonzero().squeeze(1)
                h = h.reshape(B * T, -1).index_select(0, sel)            # (N, H)
        for i, lay in enumerate(self.layers):
            y = lay.joined(_normed(h, lay.rms1, dt))                     # (B, T, (nq + 2 nkv) D) or (N, ...)
            if sel is not None:  # back to (B, T, .) for rotary, cache and attention; padding zeros (masked)
                y = y.new_zeros(B * T, y.shape[-1]).index_copy_(0, sel, y).view(B, T, -1)
            if one:
                qk = torch.bmm(y[:, 0, :nqk].view(B, nq + nkv, D).float(), turn).to(dt)   # (B, nq + nkv, D)
                q, k = qk[:, :nq, None], qk[:, nq:, None]                              # (B, heads, 1, D)
                keys, values = cache.update(k, y[:, 0, nqk:].view(B, nkv, 1, D), i)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=lay.scaling,
                                                     enable_gqa=nq != nkv)
            else:
                qk = self._rotated(y[..., :nqk].reshape(B, T, nq + nkv, D), cos, sin)   # (B, nq + nkv, T, D)
                keys, values = cache.update(qk[:, nq:], y[..., nqk:].reshape(B, T, nkv, D).transpose(1, 2), i)
                out, _ = self.attention(lay.attn, qk[:, :nq], keys, values, attend, scaling=lay.scaling,
                                        is_causal=False)
            out = out.reshape(B, T, nq * D)
            if sel is not None:
                out = out.reshape(B * T, -1).index_select(0, sel)
            h.add_(lay.o(out))                                           # fp32 += bf16, no new tensor
            h.add_(lay.mlp(_normed(h, lay.rms2, dt)))
        # each row's last position is real (padding comes before a row's tokens of this block): in the
        # compact rows, the end of each row's run
        last = h[:, -1] if sel is None else h[real.view(B, T).sum(-1).cumsum(0) - 1]
        return self.head(_normed(last, self.rms, dt))


def _attend(mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, 1, L) bool from a (B, L) 0/1 mask; T > 1: (B, 1, T, L), also causal among the last T
    positions, each attending to itself so a padding row is never empty."""
    L = mask.shape[1]
    attend = mask.bool()[:, None, None, :]
    if T > 1:
        q_at = torch.arange(L - T, L, device=mask.device)[:, None]   # (T, 1) absolute index of each query
        k_at = torch.arange(L, device=mask.device)[None, :]
        attend = (attend & (k_at <= q_at)) | (k_at == q_at)
    return attend


__all__ = ["LeanDecoder", "SUPPORTED", "can_pack"]
