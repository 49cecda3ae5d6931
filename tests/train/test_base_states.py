"""Base states on disk: written by one evaluation, read (not recomputed) by the next, equal numbers."""

import pytest
import torch
from test_methods import CHATS
from tiny import make_model

from slimtune.config import MethodCfg
from slimtune.data.render import render_chat
from slimtune.train.base_states import BaseStates
from slimtune.train.heldout import heldout_metrics
from slimtune.methods import apply_method


def test_states_survive_on_disk_and_skip_the_base(tokenizer, tmp_path, monkeypatch):
    examples = [dict(zip(("input_ids", "labels"), render_chat(c, tokenizer))) for c in CHATS * 3]
    model = apply_method(make_model(tokenizer), MethodCfg(name="lora", r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pad = tokenizer.pad_token_id
    first = heldout_metrics(model, examples, pad, batch_size=2, ref_cache=BaseStates(tmp_path / "s.safetensors"),
                            base_loss=True)
    assert (tmp_path / "s.safetensors").exists()

    import slimtune.train.forward as fw
    calls = []
    real = fw.base_hidden
    monkeypatch.setattr(fw, "base_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = BaseStates(tmp_path / "s.safetensors")  # a later process
    assert len(dict.keys(again)) == 0  # nothing read until asked for
    second = heldout_metrics(model, examples, pad, batch_size=2, ref_cache=again, base_loss=True)
    assert calls == [] and second == pytest.approx(first, rel=1e-6)
    # other examples miss, are computed and added beside the old entries
    fewer = heldout_metrics(model, examples[:3], pad, batch_size=2, ref_cache=again)
    assert calls and fewer["kl"] > 0
    assert len(BaseStates(tmp_path / "s.safetensors")._on_disk) > 3  # the new batches were added, the old kept


def test_broken_or_read_only_file_only_costs_time(tokenizer, tmp_path):
    examples = [dict(zip(("input_ids", "labels"), render_chat(c, tokenizer))) for c in CHATS]
    model = apply_method(make_model(tokenizer), MethodCfg(name="lora", r=4))
    bad = tmp_path / "s.safetensors"
    bad.write_bytes(b"not a safetensors file")
    ok = heldout_metrics(model, examples, 0, batch_size=2, ref_cache=BaseStates(bad))
    assert ok["kl"] == pytest.approx(0.0, abs=1e-7)
    ro = BaseStates(tmp_path / "no" / "such" / "dir" / "s.safetensors")
    ro.path = tmp_path / "file"  # a parent that is a file: writing fails, evaluation does not
    (tmp_path / "file").write_text("x")
    ro.path = tmp_path / "file" / "s.safetensors"
    assert heldout_metrics(model, examples, 0, batch_size=2, ref_cache=ro)["kl"] == pytest.approx(0.0, abs=1e-7)
