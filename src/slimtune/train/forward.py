"""From a batch to the loss, without full-vocabulary logits for the batch.

The model is run for its final hidden states (a hook on the decoder; the LM head is asked for
one position only), the positions that are trained are picked, and `losses.chunked_loss`
applies the output projection chunk by chunk. Train and eval share this path.
"""

from __future__ import annotations

import torch

from ..config import LossCfg
from ..data.render import IGNORE
from ..losses import LossOut, chunked_loss
from ..methods import adapters_disabled, base_of


def decoder_of(model):
    base = base_of(model)
    get = getattr(base, "get_decoder", None)
    dec = get() if get else None
    return dec if dec is not None else base.model


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H) aligned with batch['input_ids'] (B, T).

    Soft-prompt positions that prompt tuning prepends are cut off.
    """
    captured = {}

    def hook(_mod, _args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    handle = decoder_of(model).register_forward_hook(hook)
    try:
        kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        model(**kw, use_cache=False, logits_to_keep=1)  # the LM head on one position: cheap
    finally:
        handle.remove()
    h = captured["h"]
    extra = h.shape[1] - batch["input_ids"].shape[1]  # soft-prompt positions (0 with adapters off)
    return h[:, extra:] if extra else h


def output_layer(model):
    """(weight (V, H), bias (V,) or None, final logit softcap or None) of the LM head."""
    base = base_of(model)
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return head.weight, head.bias, softcap


def kl_positions(batch: dict, targets: torch.Tensor, cfg: LossCfg) -> torch.Tensor:
    """(B, T-1) bool: which shifted positions carry the KL term."""
    trained = targets != IGNORE
    if cfg.kl_positions == "trained":
        return trained
    if "attention_mask" in batch:
        valid = batch["attention_mask"][:, 1:].bool()
    elif "position_ids" in batch:  # packed: padding sits after the last trained token of a row
        last = (trained.float().flip(-1).cumsum(-1).flip(-1) > 0)
        valid = last & (batch["position_ids"][:, 1:] > 0)
    else:
        valid = torch.ones_like(trained)
    if cfg.kl_positions == "all":
        return valid
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 at the last valid position
    return valid & (from_end <= cfg.kl_last_n)


def batch_loss(model, batch: dict, cfg: LossCfg, kl_lambda: float = 0.0, normaliser: float | None = None,
               ref_model=None, want_kl: bool = False, ref_cache: dict | None = None, key=None) -> LossOut:
    """CE (+ kl_lambda x KL to the base) over the batch's trained tokens.

    The reference is the same model with adapters switched off, or `ref_model` (full fine-tuning).
    want_kl computes the KL even when kl_lambda is 0 (for metrics). The base never changes, so
    evaluation passes `ref_cache` (a dict) and a `key` per batch: the base's hidden states at the
    selected positions are computed once and reused at every later evaluation.
    """
    targets = batch["labels"][:, 1:]
    need_kl = kl_lambda > 0 or want_kl
    sel = targets != IGNORE
    kw = {}
    if need_kl:
        kmask = kl_positions(batch, targets, cfg)
        sel = sel | kmask
        # The base runs first, while no autograd graph is held, so its activations never add to
        # the tuned forward's peak.
        if ref_cache is not None and key in ref_cache:
            ref_sel = ref_cache[key]
        else:
            ref_sel = base_hidden(model, batch, ref_model)[:, :-1][sel]
            if ref_cache is not None:
                ref_cache[key] = ref_sel
        ref_w, ref_b, _ = output_layer(ref_model if ref_model is not None else model)
        kw = dict(ref_hidden=ref_sel, ref_weight=ref_w.detach(), ref_bias=None if ref_b is None else ref_b.detach(),
                  kl_mask=kmask[sel], kl_lambda=kl_lambda, temperature=cfg.kl_temperature,
                  direction=cfg.kl_direction, jsd_beta=cfg.jsd_beta)
    h = hidden_states(model, batch)[:, :-1]  # position t predicts token t+1
    weight, bias, softcap = output_layer(model)
    # KL holds about twice the (chunk, V) buffers of CE: halve the chunk to keep the same peak.
    chunk = max(1, cfg.chunk_size // 2) if need_kl else cfg.chunk_size
    return chunked_loss(h[sel], weight, targets[sel], bias=bias, normaliser=normaliser,
                        chunk_size=chunk, logit_softcap=softcap, **kw)


@torch.no_grad()
def base_hidden(model, batch: dict, ref_model=None) -> torch.Tensor:
    """(B, T, H) hidden states of the base: `ref_model`, or `model` with its adapters switched off."""
    if ref_model is not None:
        return hidden_states(ref_model, batch)
    with adapters_disabled(model):
        return hidden_states(model, batch)
