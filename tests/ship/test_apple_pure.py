"""Always-on checks of the Apple exports' pure parts: no mlx, mlx-lm or coremltools needed.
PEFT -> mlx-lm adapter renaming and scale, the config mlx-lm reads, the Core ML decoder module
against transformers (torch only), the prompt wrapper's format, and the Swift files as package data."""

import fnmatch
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_model, make_qwen, make_tokenizer

from slimtune.errors import SlimtuneError
from slimtune.ship.coreml_model import StatefulLM, causal_mask, stateful_greedy
from slimtune.ship.mlx import adapter_to_mlx, mlx_config, torch_greedy

ROOT = Path(__file__).parents[2]


def peft_tensors(rng, layers=(2, 3), r=4, dora=False):
    out = {}
    for i in layers:
        for mod, (o, n) in {"self_attn.q_proj": (32, 32), "mlp.down_proj": (32, 64)}.items():
            stem = f"base_model.model.model.layers.{i}.{mod}"
            out[f"{stem}.lora_A.weight"] = rng.standard_normal((r, n)).astype(np.float32)  # (r, in)
            out[f"{stem}.lora_B.weight"] = rng.standard_normal((o, r)).astype(np.float32)  # (out, r)
            if dora:
                out[f"{stem}.lora_magnitude_vector"] = rng.standard_normal(o).astype(np.float32)
    return out


def test_adapter_keys_are_transposed_and_renamed_and_the_delta_is_peft_s():
    rng = np.random.default_rng(0)
    t = peft_tensors(rng)
    w, cfg = adapter_to_mlx(t, {"peft_type": "LORA", "r": 4, "lora_alpha": 8}, n_layers=4)
    a = w["model.layers.2.self_attn.q_proj.lora_a"]
    b = w["model.layers.2.self_attn.q_proj.lora_b"]
    assert a.shape == (32, 4) and b.shape == (4, 32)  # mlx-lm: (in, r), (r, out)
    stem = "base_model.model.model.layers.2.self_attn.q_proj"
    # mlx-lm adds scale * (x @ a) @ b; PEFT adds alpha/r * x @ A^T @ B^T: the same for any x
    x = rng.standard_normal((3, 32)).astype(np.float32)
    peft = 8 / 4 * x @ t[f"{stem}.lora_A.weight"].T @ t[f"{stem}.lora_B.weight"].T
    assert np.allclose(cfg["lora_parameters"]["scale"] * (x @ a) @ b, peft, atol=1e-5)
    assert cfg == {"fine_tune_type": "lora", "num_layers": 2,  # layers 2 and 3 of 4: the last two
                   "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                       "keys": ["mlp.down_proj", "self_attn.q_proj"]}}
    assert len(w) == 8


def test_rslora_scale_dora_magnitude_and_what_is_refused():
    rng = np.random.default_rng(1)
    _, cfg = adapter_to_mlx(peft_tensors(rng, r=16), {"r": 16, "lora_alpha": 32, "use_rslora": True}, 4)
    assert cfg["lora_parameters"]["scale"] == 32 / 4  # alpha / sqrt(r)
    w, cfg = adapter_to_mlx(peft_tensors(rng, layers=(0, 3), dora=True), {"r": 4, "lora_alpha": 4, "use_dora": True}, 4)
    assert cfg["fine_tune_type"] == "dora" and cfg["num_layers"] == 4
    assert w["model.layers.0.mlp.down_proj.m"].shape == (32,)
    for bad in ({"rank_pattern": {"q_proj": 8}}, {"modules_to_save": ["lm_head"]}, {"bias": "all"}):
        with pytest.raises(SlimtuneError, match="adapter-only"):
            adapter_to_mlx(peft_tensors(rng), {"r": 4, "lora_alpha": 4, **bad}, 4)
    with pytest.raises(SlimtuneError, match="no mlx-lm name"):
        adapter_to_mlx({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 4))}, {"r": 4, "lora_alpha": 4}, 4)


def test_mlx_config_lifts_rope_out_of_rope_parameters_and_stops_on_every_end_of_turn():
    hf = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "eos_token_id": 2}
    c = mlx_config(hf, [2])
    assert c["rope_theta"] == 100000.0 and "rope_scaling" not in c and c["eos_token_id"] == 2
    llama31 = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    c = mlx_config(llama31, [128001, 128009])
    assert c["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert c["rope_theta"] == 5e5 and c["eos_token_id"] == [128001, 128009]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_core_ml_decoder_module_equals_transformers(arch):
    """What is traced and converted: prefill + one token a call against the KV cache states."""
    tok = make_tokenizer("chatml", split=None if arch == "llama" else "qwen2")
    model = make_model(tok) if arch == "llama" else make_qwen(tok, arch)
    module = StatefulLM(model, context=64, cache_dtype=torch.float32).eval()
    ids = tok("Hello! How are you today? Tell me a joke.")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0]
        got = module(torch.tensor([ids], dtype=torch.int32), causal_mask(len(ids), len(ids)))[0]
        assert (ref - got).abs().max() < 1e-4
        # the next token against the cache equals the full sequence's last position
        nxt = module(torch.tensor([[5]], dtype=torch.int32), causal_mask(1, len(ids) + 1))[0, -1]
        assert (nxt - model(input_ids=torch.tensor([ids + [5]])).logits[0, -1]).abs().max() < 1e-4
    assert stateful_greedy(module, ids, 12, {tok.eos_token_id}) == torch_greedy(model, ids, 12, {tok.eos_token_id})


def test_causal_mask_lets_each_new_token_see_itself_and_the_past():
    m = causal_mask(2, 4)[0, 0]  # new tokens at positions 2 and 3
    assert (m == 0).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_prompt_format_matches_the_template_family():
    from slimtune.ship.coreml import prompt_format

    f = prompt_format(make_tokenizer("default_system"), [1])
    assert f["family"] == "chatml" and f["default_system"] == "You are a helpful AI assistant named Tiny."
    f = prompt_format(make_tokenizer("llama3"), [3, 4])
    assert f["family"] == "llama3" and f["prefix"] == "<|begin_of_text|>" and f["stop_ids"] == [3, 4]
    assert prompt_format(make_tokenizer("base"), [0])["family"] is None


def test_swift_package_and_mac_check_ship_as_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["slimtune"]
    files = [p.relative_to(ROOT / "src" / "slimtune").as_posix()
             for p in (ROOT / "src/slimtune/ship/swift").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert {"ship/swift/Package.swift", "ship/swift/check_on_mac.py",
            "ship/swift/Sources/SlimtuneChat/Generator.swift"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files
