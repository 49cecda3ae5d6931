"""One table over every method that runs on CPU: what trains, what stays frozen, what reloads."""

import copy
import dataclasses

import pytest
import torch
from tiny import make_model, make_tokenizer

from slimtune.config import MethodCfg
from slimtune.data.batching import collate
from slimtune.data.render import render_chat
from slimtune.errors import ConfigError
from slimtune.train.forward import KLTerm, batch_loss, hidden_states
from slimtune.methods import adapters_disabled, apply_method, parse_layers, target_modules, trainable_report

CHATS = [[{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}],
         [{"role": "user", "content": "Hello! How are you today?"},
          {"role": "assistant", "content": "I am fine, thank you."},
          {"role": "user", "content": "Tell me a joke."},
          {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}]]

METHODS = {
    "lora": dict(name="lora", r=4),
    "dora": dict(name="dora", r=4),
    "rslora": dict(name="rslora", r=4),
    "lora_all_linear_layers": dict(name="lora", r=4, targets="all_linear", layers="1"),
    "lora_explicit": dict(name="lora", r=4, targets=["q_proj", "v_proj"]),
    "ia3": dict(name="ia3"),
    "ia3_layers": dict(name="ia3", layers=[1]),
    "prompt_tuning": dict(name="prompt_tuning", num_virtual_tokens=4),
    "prompt_tuning_text": dict(name="prompt_tuning", num_virtual_tokens=4, prompt_init_text="Be brief."),
    "prefix_tuning": dict(name="prefix_tuning", num_virtual_tokens=4),
    "full": dict(name="full"),
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


def batch_of(tok):
    rows = []
    for c in CHATS:
        ids, labels = render_chat(c, tok)
        rows.append({"input_ids": ids, "labels": labels})
    return collate(rows, tok.pad_token_id)


@pytest.mark.parametrize("key", list(METHODS))
def test_method_trains_only_its_parameters_and_reloads(key, tok, tmp_path, tiny_dir):
    import peft
    cfg = MethodCfg(**METHODS[key])
    model = apply_method(make_model(tok), cfg, tokenizer_path=tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable_report(model)["trainable"] > 0
    if cfg.name != "full":
        assert len(trainable) < len(before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_of(tok)
    model.train()
    losses = []
    for _ in range(4):
        out = batch_loss(model, batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"

    model.eval()
    with torch.no_grad():
        expect = hidden_states(model, batch)
    model.save_pretrained(tmp_path / "out")
    base = make_model(tok)  # same seed: the same base weights
    reloaded = base if cfg.name == "full" else peft.PeftModel.from_pretrained(base, tmp_path / "out")
    if cfg.name == "full":
        reloaded = type(base).from_pretrained(tmp_path / "out")
    with torch.no_grad():
        got = hidden_states(reloaded.eval(), batch)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["lora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_kl_is_zero_at_init_and_with_adapters_off(key, tok, tiny_dir):
    model = apply_method(make_model(tok), MethodCfg(**METHODS[key]), tokenizer_path=tiny_dir)
    batch = batch_of(tok)
    if key in ("lora",):  # LoRA B starts at zero: the tuned model IS the base
        out = batch_loss(model, batch, dataclasses.replace(KLTerm.metric(), weight=0.1))
        assert float(out.kl_sum) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():  # move the adapter away from identity, then switch it off
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    out = batch_loss(model, batch, KLTerm.metric())
    assert float(out.kl_sum) > 1e-4
    with adapters_disabled(model):
        base_out = batch_loss(model, batch, KLTerm.metric())
    assert float(base_out.kl_sum) == pytest.approx(0.0, abs=1e-6)


def test_targets_and_layers(tok):
    model = make_model(tok)
    assert target_modules(model, "attn") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert set(target_modules(model, "attn_mlp")) == {"k_proj", "o_proj", "q_proj", "v_proj",
                                                      "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ConfigError, match="no Linear module named"):
        target_modules(model, ["qq_proj"])
    assert parse_layers("10-12,15") == [10, 11, 12, 15]
    with pytest.raises(ConfigError):
        parse_layers("ten")
    lora = apply_method(copy.deepcopy(model), MethodCfg(name="lora", r=2, layers="1"))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
