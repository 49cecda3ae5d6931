"""The decoder as Core ML runs it: one torch module whose KV cache lives in two buffers that
coremltools turns into model states, traced once per context length.

    inputIds (1, T) int32, causalMask (1, 1, T, END) fp16  ->  logits (1, T, V)
    states keyCache / valueCache (layers, 1, kv_heads, context, head_dim) fp16

T new tokens sit at positions END - T .. END - 1; their keys and values are written into the cache
there and attention reads positions 0 .. END - 1. A prompt is one call with T = its length and
END = T; each generated token is one call with T = 1 and END one more than before. The caller
keeps END (Swift: `Generator.swift`; Python: `stateful_greedy` below, the same loop).

The weights are the merged transformers model's own modules (embeddings, norms, projections,
MLP), so only attention and RoPE are written here; RoPE takes transformers' inv_freq, which
carries Llama-3.1 scaling. Grouped-query attention folds the query heads of one key head into
the sequence axis instead of repeating keys: (1, H, T, D) -> (1, KV, H/KV * T, D).
"""

from __future__ import annotations

import torch


def _rotate_half(x, half: int):  # half a head, a Python int: a traced size here does not convert
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StatefulLM(torch.nn.Module):
    def __init__(self, model, context: int, cache_dtype=torch.float16):
        super().__init__()
        cfg = model.config
        self.model, self.lm_head = model.model, model.lm_head
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        shape = (cfg.num_hidden_layers, 1, self.kv_heads, context, self.head_dim)
        self.register_buffer("keyCache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("valueCache", torch.zeros(shape, dtype=cache_dtype))
        rope = model.model.rotary_emb
        freqs = torch.outer(torch.arange(context, dtype=torch.float32), rope.inv_freq.float())  # (ctx, D/2)
        emb = torch.cat((freqs, freqs), dim=-1) * getattr(rope, "attention_scaling", 1.0)
        self.register_buffer("cos", emb.cos(), persistent=False)  # (ctx, D)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, input_ids, causal_mask):
        # Sizes taken from inputs stay out of arithmetic (reshapes use -1): coremltools cannot
        # convert a product of traced sizes.
        end = causal_mask.shape[-1]
        start = end - input_ids.shape[1]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[start:end], self.sin[start:end]  # (T, D)
        mask = causal_mask.repeat(1, 1, H // KV, 1)  # (1, 1, H/KV * T, END), rows in q's order below
        x = self.model.embed_tokens(input_ids)  # (1, T, hidden)
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, -1, H, D)
            k = attn.k_proj(h).view(1, -1, KV, D)
            v = attn.v_proj(h).view(1, -1, KV, D).transpose(1, 2)  # (1, KV, T, D)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (1, H, T, D), (1, KV, T, D)
            q = q * cos + _rotate_half(q, D // 2) * sin
            k = k * cos + _rotate_half(k, D // 2) * sin
            self.keyCache[i:i + 1, :, :, start:end, :] = k.to(self.keyCache.dtype).unsqueeze(0)
            self.valueCache[i:i + 1, :, :, start:end, :] = v.to(self.valueCache.dtype).unsqueeze(0)
            keys = self.keyCache[i, :, :, :end, :].to(x.dtype)  # (1, KV, END, D)
            values = self.valueCache[i, :, :, :end, :].to(x.dtype)
            q = q.reshape(1, KV, -1, D)  # (1, KV, H/KV * T, D): query heads of one key head, head-major
            scores = (q @ keys.transpose(-1, -2)) * D ** -0.5 + mask  # (1, KV, H/KV * T, END)
            out = scores.softmax(-1) @ values  # (1, KV, H/KV * T, D)
            out = out.reshape(1, H, -1, D).transpose(1, 2).reshape(1, -1, H * D)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x))


def causal_mask(T: int, end: int, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, T, END): 0 where query t (at position END - T + t) may see key s, -inf-like after it."""
    pos = torch.arange(end - T, end)[:, None]
    return torch.where(torch.arange(end)[None, :] <= pos, 0.0, -1e4).to(dtype)[None, None]


@torch.no_grad()
def stateful_greedy(module, ids: list[int], n: int, stops) -> list[int]:
    """The Swift generate loop in torch: prefill, then one token a call; caches are cleared first."""
    module.keyCache.zero_()
    module.valueCache.zero_()
    logits = module(torch.tensor([ids], dtype=torch.int32), causal_mask(len(ids), len(ids)))
    out, end = [], len(ids)
    for _ in range(n):
        t = int(logits[0, -1].float().argmax())
        out.append(t)
        if t in stops or end >= module.keyCache.shape[3]:
            break
        end += 1
        logits = module(torch.tensor([[t]], dtype=torch.int32), causal_mask(1, end))
    return out
