"""Held-out loss, perplexity and KL to the base model, over rendered examples."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..config import LossCfg
from ..data.batching import collate, length_grouped_batches
from ..data.render import IGNORE
from ..generate import merged
from ..losses.sft import chunked_loss
from ..utils import eval_mode
from .base_states import batch_key
from .forward import KLTerm, batch_loss, output_layer, reference_states


@torch.inference_mode()
def heldout_metrics(model, examples: list[dict], pad_id: int, loss_cfg: LossCfg | None = None,
                    batch_size: int = 8, max_examples: int | None = None, kl: bool = True,
                    ref_model=None, ref_cache: dict | None = None, base_loss: bool = False,
                    merge: bool = False) -> dict:
    """Mean CE per trained token, its perplexity, and mean KL(base || tuned) per trained token.

    The KL metric is always the forward direction at temperature 1 on trained (assistant) tokens,
    whatever the training objective, so runs are comparable. Pass the same `ref_cache` dict to
    every evaluation of one example set: the base's hidden states are then computed only once
    (keyed by the batch's content; a `base_states.BaseStates` keeps them on disk).

    base_loss (with kl): also the base's own loss and perplexity ("base_loss", "base_ppl") from the
    hidden states the KL takes from the base anyway, so the base runs once, not twice.
    merge: the tuned pass runs with the adapter folded into the weights (`generate.merged`; the base
    pass runs first, adapters off). For evaluation of a finished run: merging and unmerging leaves
    float rounding in the base weights, which training must not accumulate.
    """
    if not examples:
        return {}
    examples = examples[:max_examples] if max_examples else examples
    term = KLTerm.metric() if kl else None
    chunk = (loss_cfg or LossCfg()).chunk_size
    ce = kl_sum = base_ce = 0.0
    n = 0
    cache = ref_cache if ref_cache is not None else {}
    with eval_mode(model):
        batches, keys = _batches(examples, pad_id, batch_size, term)
        if kl:  # the base first, adapters off (before any merge)
            for key, batch in zip(keys, batches):
                if key not in cache:
                    cache[key] = reference_states(model, batch, term, ref_model)
            if hasattr(cache, "flush"):  # base_states.BaseStates: kept on disk for later evaluations
                cache.flush()
        with merged(model) if merge else nullcontext():
            for key, batch in zip(keys, batches):
                out = batch_loss(model, batch, term, normaliser=1.0, ref_model=ref_model,
                                 ref_cache=cache if kl else None, key=key, chunk_size=chunk)
                ce += float(out.ce_sum)
                kl_sum += float(out.kl_sum)
                n += out.n_tokens
        if kl and base_loss:
            base_ce = _base_ce(model, ref_model, batches, keys, cache, chunk)
    loss = ce / max(1, n)
    res = {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": n}
    if kl:
        res["kl"] = kl_sum / max(1, n)
        if base_loss:
            res["base_loss"] = base_ce / max(1, n)
            res["base_ppl"] = math.exp(min(res["base_loss"], 50))
    return res


def _batches(examples: list[dict], pad_id: int, batch_size: int, term) -> tuple[list[dict], list[str]]:
    """The evaluation batches of `examples` and their cache keys (the same for training and eval)."""
    groups = length_grouped_batches([len(e["input_ids"]) for e in examples], batch_size, seed=0)
    batches = [collate([examples[i] for i in idx], pad_id) for idx in groups]
    return batches, [batch_key(batch, repr(term)) for batch in batches]


def _base_ce(model, ref_model, batches, keys, cache, chunk: int) -> float:
    """Summed CE of the base over the trained tokens, from its cached hidden states (the metric KL's
    positions are the trained ones, so the cache rows line up with the targets)."""
    head = output_layer(ref_model if ref_model is not None else model)
    total = 0.0
    for key, batch in zip(keys, batches):
        targets = batch["labels"][:, 1:]
        total += float(chunked_loss(cache[key], head.weight, targets[targets != IGNORE], normaliser=1.0,
                                    chunk_size=chunk, **head.kwargs()).ce_sum)
    return total


@torch.inference_mode()
def base_loss_from_states(model, examples: list[dict], pad_id: int, loss_cfg: LossCfg | None, batch_size: int,
                          max_examples: int | None, cache, ref_model=None) -> dict | None:
    """The base's held-out loss and perplexity from hidden states a previous evaluation stored in
    `cache` (training's, for `slimtune eval`), with no forward pass; None if any batch is missing."""
    examples = examples[:max_examples] if max_examples else examples
    if not examples:
        return None
    batches, keys = _batches(examples, pad_id, batch_size, KLTerm.metric())
    if not all(key in cache for key in keys):
        return None
    n = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    loss = _base_ce(model, ref_model, batches, keys, cache, (loss_cfg or LossCfg()).chunk_size) / max(1, n)
    return {"base_loss": loss, "base_ppl": math.exp(min(loss, 50)), "tokens": n}
