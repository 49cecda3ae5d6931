"""Mixed precision: a bf16-autocast step gives fp32's loss and gradients within bf16 rounding,
trained weights and optimizer state stay fp32, and fp16 loss scaling skips overflowing steps."""

import pytest
import torch
from test_loop import chats, lora_model, run_args, write_data
from tiny import make_tokenizer

from slimtune.config import build_config
from slimtune.data.batching import count_trained
from slimtune.data.render import render_chat
from slimtune.errors import ConfigError
from slimtune.train.loop import accumulate_grads, train
from slimtune.train.objectives import make_objective
from slimtune.train.precision import Precision, check_precision


@pytest.fixture(scope="module")
def setup_():
    tok = make_tokenizer("chatml")
    examples = [dict(zip(("input_ids", "labels"), render_chat(c, tok))) for c in chats(8)]
    return tok, examples


def step_with(amp, tok, examples, kl_lambda=0.0):
    model = lora_model(tok)
    objective = make_objective(build_config({}, [f"loss.kl_lambda={kl_lambda}"]))
    sums = accumulate_grads(model, [examples[:4], examples[4:]], count_trained(examples), tok.pad_token_id,
                            objective, amp=amp)
    return model, sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kl_lambda", [0.0, 0.1])
def test_bf16_autocast_step_matches_fp32(setup_, kl_lambda):
    tok, examples = setup_
    _, s32, g32 = step_with(None, tok, examples, kl_lambda)
    model, s16, g16 = step_with(Precision("bf16", "cpu"), tok, examples, kl_lambda)
    assert s16["ce"] == pytest.approx(s32["ce"], rel=1e-2)  # bf16 has 8 bits of mantissa
    assert s16["ce"] != s32["ce"]  # autocast did run the matmuls in bf16
    cos = [torch.nn.functional.cosine_similarity(g16[n].flatten(), g32[n].flatten(), dim=0) for n in g32]
    assert min(cos) > 0.98
    # the trained weights, their gradients and the optimizer state stay fp32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    opt.step()
    assert all(t.dtype == torch.float32 for st in opt.state.values() for k, t in st.items() if k != "step")


def test_fp16_scaler_skips_an_overflowing_step():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    amp = Precision("fp16", "cpu", log=lambda m: None)
    amp.backward((p * 2).sum())
    amp.unscale(opt)
    torch.testing.assert_close(p.grad, torch.full((4,), 2.0))  # unscaled: the true gradient
    assert not amp.step(opt)
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.8))
    opt.zero_grad()
    amp.backward((p * float("inf")).sum())
    scale = amp.scaler.get_scale()
    assert amp.step(opt) and amp.skipped == 1
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.8))  # the step was skipped
    assert amp.scaler.get_scale() == scale / 2
    fresh = Precision("fp16", "cpu")
    fresh.load_state_dict(amp.state_dict())
    assert fresh.scaler.get_scale() == amp.scaler.get_scale() and fresh.skipped == 1


def test_refusals(monkeypatch):
    with pytest.raises(ConfigError, match="float32"):
        check_precision("bf16", "cpu", "bfloat16")
    monkeypatch.setattr("slimtune.machine.bf16_supported", lambda d: False)
    with pytest.raises(ConfigError, match="fp16"):
        check_precision("bf16", "cuda", "float32")
    with pytest.raises(ConfigError, match="mixed_precision"):
        build_config({}, ["train.mixed_precision=fp8"])


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_loop_trains_under_autocast(tiny_dir, tmp_path, mode):
    data = write_data(tmp_path / "d.jsonl")
    summary = train(build_config({}, run_args(tiny_dir, data, tmp_path / "run", **{
        "train.mixed_precision": mode, "train.max_steps": 3})), log=lambda *a: None)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert ("skipped_steps" in summary["last_train"]) == (mode == "fp16")
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "run" / "adapter_model.safetensors")).values())


def test_auto_is_bf16_only_where_native_and_applicable():
    from slimtune.config import auto_precision

    assert auto_precision("cpu", "float32", native_bf16=True) == "bf16"
    assert auto_precision("cuda:0", "float32", native_bf16=True) == "bf16"
    assert auto_precision("cpu", "float32", native_bf16=False) == "no"      # emulated: slower than fp32
    assert auto_precision("cpu", "bfloat16", native_bf16=True) == "no"      # autocast needs fp32 weights
    assert auto_precision("cpu", "float32", True, four_bit=True) == "no"    # bitsandbytes computes fp32 on CPU
    assert auto_precision("mps", "float32", native_bf16=True) == "no"
    assert build_config({}, []).train.mixed_precision == "auto"              # the default


@pytest.mark.parametrize("native", ["0", "1"])
def test_auto_resolves_from_the_cpus_capability(tiny_dir, tmp_path, monkeypatch, native):
    """The CPU's answer mocked both ways: auto trains in bf16 autocast where the CPU has it and in
    float32 where not; the choice is printed and written in config.yaml."""
    import yaml

    from slimtune.train.loop import setup

    monkeypatch.setenv("SLIMTUNE_CPU_BF16", native)
    data = write_data(tmp_path / "d.jsonl")
    lines = []
    s = setup(build_config({}, run_args(tiny_dir, data, tmp_path / "run", **{"train.max_steps": 1})), lines.append)
    want = "bf16" if native == "1" else "no"
    assert s.cfg.train.mixed_precision == want and s.amp.mode == want
    assert s.amp.dtype == (torch.bfloat16 if native == "1" else None)
    assert any(line.startswith(f"precision: {want} ") for line in lines)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["mixed_precision"] == want


def _batch(tok, examples):
    from slimtune.data.batching import collate
    return collate(examples[:4], tok.pad_token_id)


def test_frozen_weights_are_cast_once_and_the_forward_is_autocasts_own(setup_):
    from slimtune.train.precision import frozen_in
    tok, examples = setup_
    model, batch = lora_model(tok), _batch(tok, examples)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cache = {}
        with frozen_in(model, torch.bfloat16, cache):
            inside = {n: p for n, p in model.named_parameters()}
            got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with frozen_in(model, torch.bfloat16, cache):
            again = {n: p for n, p in model.named_parameters()}
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same rounding autocast does
    cast = [n for n in frozen if inside[n].dtype == torch.bfloat16]
    assert any("base_layer" in n for n in cast) and not any("embed" in n for n in cast)
    assert all(p.dtype == torch.float32 for n, p in inside.items() if p.requires_grad)  # trained: untouched
    assert all(again[n] is inside[n] for n in cast)  # the cache: cast once
    assert all(p is frozen[n] for n, p in model.named_parameters() if n in frozen)  # restored


def test_an_unmerged_dora_layer_keeps_its_float32_weight(setup_):
    from slimtune.config import MethodCfg
    from slimtune.methods import apply_method
    from slimtune.train.precision import frozen_in
    from tiny import make_model
    tok, _ = setup_
    model = apply_method(make_model(tok), MethodCfg(name="dora", r=4))
    with frozen_in(model, torch.bfloat16):
        dtypes = {n: p.dtype for n, p in model.named_parameters() if "base_layer" in n}
    assert dtypes and all(d == torch.float32 for d in dtypes.values())


def test_a_bf16_step_with_the_model_equals_autocast_alone_up_to_float32_attention(setup_, tiny_dir):
    """`autocast(model)` (frozen weights cast once, PEFT's input casts off) gives autocast's own
    loss and gradients; fp32 attention moves them only within bf16 rounding, nearer float32's."""
    from slimtune.train.precision import ATTENTION, use_fp32_attention
    tok, examples = setup_
    _, s32, g32 = step_with(None, tok, examples)
    objective = make_objective(build_config({}, []))
    runs = {}
    for name in ("autocast", "model", "model+attention"):
        model = lora_model(tok)
        if name == "model+attention":
            assert use_fp32_attention(model, "bf16", "cpu")
            assert model.get_base_model().config._attn_implementation == ATTENTION
        amp = Precision("bf16", "cpu")
        if name == "autocast":
            amp.autocast = lambda model=None, _a=amp.autocast: _a()  # the plain torch.autocast
        sums = accumulate_grads(model, [examples[:4], examples[4:]], count_trained(examples), tok.pad_token_id,
                                objective, amp=amp)
        runs[name] = sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    (sa, ga), (sm, gm), (sf, gf) = runs["autocast"], runs["model"], runs["model+attention"]
    assert sm["ce"] == pytest.approx(sa["ce"], rel=1e-6)
    for n in ga:
        torch.testing.assert_close(gm[n], ga[n], rtol=1e-3, atol=1e-6)
    assert sf["ce"] != sa["ce"] and sf["ce"] == pytest.approx(s32["ce"], rel=1e-2)
    cos = [torch.nn.functional.cosine_similarity(gf[n].flatten(), g32[n].flatten(), dim=0) for n in g32]
    assert min(cos) > 0.98
    assert abs(sf["ce"] - s32["ce"]) <= abs(sa["ce"] - s32["ce"]) * 1.5


def test_fp32_attention_only_where_it_pays(setup_):
    from slimtune.train.precision import use_fp32_attention
    tok, _ = setup_
    assert not use_fp32_attention(lora_model(tok), "no", "cpu")
    assert not use_fp32_attention(lora_model(tok), "bf16", "cuda")
    model = lora_model(tok)
    model.get_base_model().config._attn_implementation = "eager"
    assert not use_fp32_attention(model, "bf16", "cpu")
