"""Held-out metrics: loss/ppl/KL per trained token; the base's hidden states are reused, not recomputed."""

import math

import pytest
import torch
from tolerance import assert_fp32_close, fp32_atol
from test_methods import CHATS
from tiny import make_model

from slimtune.config import MethodCfg
from slimtune.data.render import render_chat
from slimtune.train.heldout import heldout_metrics
from slimtune.methods import apply_method


def test_metrics_and_base_cache(tokenizer, monkeypatch):
    examples = [dict(zip(("input_ids", "labels"), render_chat(c, tokenizer))) for c in CHATS * 3]
    model = apply_method(make_model(tokenizer), MethodCfg(name="lora", r=4))
    pad = tokenizer.pad_token_id
    cache = {}
    first = heldout_metrics(model, examples, pad, batch_size=2, ref_cache=cache)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7) and first["ppl"] == pytest.approx(math.exp(first["loss"]))
    assert len(cache) == 3
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    import slimtune.train.forward as fw
    calls = []
    real = fw.base_hidden
    monkeypatch.setattr(fw, "base_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = heldout_metrics(model, examples, pad, batch_size=2, ref_cache=cache)
    assert calls == []  # the base was not run again
    fresh = heldout_metrics(model, examples, pad, batch_size=2)
    assert len(calls) == 3
    assert cached["kl"] > 1e-4
    assert cached == pytest.approx(fresh, rel=1e-6)
    assert cached["tokens"] == sum(sum(l != -100 for l in e["labels"][1:]) for e in examples)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_base_loss_from_the_kl_pass_and_merged_tuned_pass(tokenizer, method):
    """base_loss=True gives the adapters-off model's own loss without running it twice; merge=True
    gives the unmerged numbers (to float rounding) and leaves the adapter unmerged."""
    examples = [dict(zip(("input_ids", "labels"), render_chat(c, tokenizer))) for c in CHATS * 3]
    model = apply_method(make_model(tokenizer), MethodCfg(name=method, r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pad = tokenizer.pad_token_id
    plain = heldout_metrics(model, examples, pad, batch_size=2)
    with model.disable_adapter():
        base = heldout_metrics(model, examples, pad, batch_size=2, kl=False)
    both = heldout_metrics(model, examples, pad, batch_size=2, base_loss=True, merge=True)
    assert abs(base["loss"] - plain["loss"]) > 1e-3  # the adapter does change the model
    assert both["base_loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert both["base_ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    # loss, ppl and KL are built from per-token log-probs of size ~loss; merged and unmerged
    # matmuls round differently, so they agree to float32's epsilon times that size (ppl: x ppl)
    assert_fp32_close({k: both[k] for k in plain if k != "ppl"}, {k: v for k, v in plain.items() if k != "ppl"},
                      magnitude=plain["loss"])
    assert both["ppl"] == pytest.approx(plain["ppl"], rel=fp32_atol(plain["loss"]))
    assert not any(getattr(m, "merged", False) for m in model.modules())
