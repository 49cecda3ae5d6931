"""Held-out loss, perplexity and KL to the base model, over rendered examples."""

from __future__ import annotations

import math

import torch

from ..config import LossCfg
from ..data.batching import collate, length_grouped_batches
from ..train.forward import KLTerm, batch_loss


@torch.inference_mode()
def heldout_metrics(model, examples: list[dict], pad_id: int, loss_cfg: LossCfg | None = None,
                    batch_size: int = 8, max_examples: int | None = None, kl: bool = True,
                    ref_model=None, ref_cache: dict | None = None) -> dict:
    """Mean CE per trained token, its perplexity, and mean KL(base || tuned) per trained token.

    The KL metric is always the forward direction at temperature 1 on trained (assistant) tokens,
    whatever the training objective, so runs are comparable. Pass the same `ref_cache` dict to
    every evaluation of one example set: the base's hidden states are then computed only once.
    """
    if not examples:
        return {}
    examples = examples[:max_examples] if max_examples else examples
    term = KLTerm.metric() if kl else None
    chunk = (loss_cfg or LossCfg()).chunk_size
    was_training = model.training
    model.eval()
    ce = kl_sum = 0.0
    n = 0
    try:
        batches = length_grouped_batches([len(e["input_ids"]) for e in examples], batch_size, seed=0)
        for b, idx in enumerate(batches):
            out = batch_loss(model, collate([examples[i] for i in idx], pad_id), term, normaliser=1.0,
                             ref_model=ref_model, ref_cache=ref_cache, key=b, chunk_size=chunk)
            ce += float(out.ce_sum)
            kl_sum += float(out.kl_sum)
            n += out.n_tokens
    finally:
        model.train(was_training)
    loss = ce / max(1, n)
    res = {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": n}
    if kl:
        res["kl"] = kl_sum / max(1, n)
    return res
