"""MLX export, opt-in (`pytest -m apple tests/ship/test_mlx.py`; needs mlx-lm and, on Linux,
`pip install "mlx[cpu]"`): mlx-lm loads what slimtune wrote, and its greedy answers equal
transformers' on the merged model. Tolerances on tiny random models (logits ~1): f32 exact
answers and logits to 1e-4; f16 logits to 1e-2, q8 to 5e-2 of the f32 model (q4 is reported,
not bounded); for every type, mlx-lm run in float32 gives the logits of the merged model carrying
the export's own rounded / de-quantised weights to 1e-4, and the same greedy answers."""

import json

import pytest
import torch

pytest.importorskip("mlx_lm")
pytestmark = pytest.mark.apple

from test_run import make_run  # noqa: E402
from tiny import make_model, make_qwen, make_tokenizer  # noqa: E402

from slimtune.cli import main  # noqa: E402
from slimtune.data.render import render_prompt  # noqa: E402
from slimtune.errors import SlimtuneError  # noqa: E402
from slimtune.data.prompts import load_prompts  # noqa: E402
from slimtune.ship import mlx as ship_mlx  # noqa: E402
from slimtune.ship.mlx import check_mlx, export_mlx, write_mlx_model  # noqa: E402

CHATS = load_prompts("builtin:eval_prompts", 4)


def build(arch, family="chatml", hidden=64):
    """hidden 64: mlx-lm quantises only layers whose input width is a multiple of its group (64)."""
    tok = make_tokenizer(family, split=None if arch == "llama" else "qwen2")
    model = make_model(tok, hidden=hidden) if arch == "llama" else make_qwen(tok, arch, hidden=hidden)
    if arch == "llama":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    return model, tok


def check(tmp_path, model, tok, kind="f32", quantize=None, n_new=16):
    out = tmp_path / f"{kind}-{quantize}"
    write_mlx_model(model, tok, out, kind, quantize)
    return check_mlx(out, model, tok, CHATS, [render_prompt(CHATS[0], tok)], n_new), out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_export_answers_like_transformers(tmp_path, arch):
    model, tok = build(arch)
    res, out = check(tmp_path, model, tok)
    assert res["greedy_equal"] == res["prompts"] == 4 and res["max_abs_logit_diff"] < 1e-4
    assert res["tokenizer_match"]  # the training chat template and the stop ids travel with it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch and "rope_theta" in cfg


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f16_and_q8_stay_close_and_hold_what_was_written(tmp_path, arch):
    model, tok = build(arch)
    sizes = {}
    for kind, quantize, tol in (("f16", None, 1e-2), ("f16", "q8", 5e-2), ("f16", "q4", None)):
        res, out = check(tmp_path, model, tok, kind, quantize)
        if tol:
            assert res["max_abs_logit_diff"] < tol, (kind, quantize, res)
        assert res["max_abs_logit_diff_file"] < 1e-4 and res["greedy_equal_file"] == 4, (kind, quantize, res)
        sizes[quantize or kind] = (out / "model.safetensors").stat().st_size
    assert sizes["q4"] < sizes["q8"] < sizes["f16"]
    cfg = json.loads((tmp_path / "f16-q8" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}


def test_llama3_end_of_turn_stops_mlx_lm(tmp_path):
    model, tok = build("llama", "llama3")
    res, out = check(tmp_path, model, tok)
    from mlx_lm import load
    _, mtok = load(str(out))
    assert tok.convert_tokens_to_ids("<|eot_id|>") in mtok.eos_token_ids and res["tokenizer_match"]
    assert res["greedy_equal"] == 4


def test_rope_theta_left_nested_is_caught_by_the_check(tmp_path, monkeypatch):
    """mlx-lm's llama reads rope_theta only at the top of config.json: SmolLM2's 100,000 left in
    rope_parameters becomes 10,000 there. The check compares logits and fails on it."""
    tok = make_tokenizer()
    model = make_model(tok, hidden=64)
    model.config.rope_parameters["rope_theta"] = 100000.0
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    with torch.no_grad():  # sharp attention, so that positions move the logits
        for n, p in model.named_parameters():
            if "q_proj" in n or "k_proj" in n:
                p.mul_(20)
    res, _ = check(tmp_path, model, tok)
    assert res["max_abs_logit_diff"] < 1e-4
    monkeypatch.setattr(ship_mlx, "mlx_config", lambda c, stops: dict(c, eos_token_id=stops[0]))
    res, _ = check(tmp_path / "nested", model, tok)
    assert res["max_abs_logit_diff_file"] > 1e-3


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_adapter_only_on_the_base_answers_like_the_merged_run(tmp_path, tiny_dir, method):
    run = make_run(tmp_path, tiny_dir, method)
    res = export_mlx(run, str(tmp_path / "adapter"), adapter_only=True, n_prompts=4, n_new=16, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "slimtune_export.json"]
    assert res["greedy_equal"] == 4 and res["max_abs_logit_diff"] < 1e-4 and res["tokenizer_match"]
    assert res["adapter_config"]["fine_tune_type"] == ("dora" if method == "dora" else "lora")


def test_export_command_writes_a_merged_lora_run_and_refuses_mixed_options(tmp_path, tiny_dir, capsys):
    run = make_run(tmp_path, tiny_dir, "lora")
    assert main(["export", run, "--format", "mlx", "--type", "f32", "--out", str(tmp_path / "m")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "mlx" and res["greedy_equal"] == res["prompts"] == 24
    assert res["parity_merged"] < 1e-4 and res["max_abs_logit_diff"] < 1e-4
    assert main(["export", run, "--quantize", "q8", "--out", str(tmp_path / "m.gguf")]) == 2
    assert main(["export", run, "--format", "mlx", "--type", "q8_0", "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(SlimtuneError, match="not an earlier slimtune export"):
        export_mlx(run, str(tmp_path), log=lambda m: None)
