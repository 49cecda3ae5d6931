"""Loading run folders: adapters onto their base, full models, plain models, clear errors."""

import pytest
import torch

from slimtune.config import Config, MethodCfg, ModelCfg
from slimtune.errors import SlimtuneError
from slimtune.methods import adapters_disabled, peft_config
from slimtune.runfolder import load_run, read_config, run_kind


def make_run(tmp_path, base_dir: str, method: str = "lora", seed: int = 1, scale: float = 0.2) -> str:
    """A run folder as `slimtune train` leaves it, without training: a PEFT adapter whose weights
    are perturbed (LoRA B starts at 0, IA3 at 1: an untouched adapter would be the identity), or
    for method=full the perturbed model; the tokenizer and config.yaml."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / f"run-{method}"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if method == "full":  # a whole model, perturbed
        model = base
    else:
        model = peft.get_peft_model(base, peft_config(base, MethodCfg(name=method, num_virtual_tokens=4)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run)
    Config(model=ModelCfg(name=base_dir), method=MethodCfg(name=method, num_virtual_tokens=4)).save(run / "config.yaml")
    return str(run)


def test_adapter_run_loads_on_its_base(tmp_path, tiny_dir):
    run = make_run(tmp_path, tiny_dir)
    assert run_kind(run) == "adapter"
    model, tok, cfg = load_run(run)
    assert cfg.model.name == tiny_dir and cfg.method.name == "lora"
    assert tok.chat_template and not model.training
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with adapters_disabled(model):
            base = model(input_ids=ids).logits
    assert (tuned - base).abs().max() > 1e-3  # the adapter changes the output


def test_full_run_loads_as_a_plain_model(tmp_path, tiny_dir):
    run = make_run(tmp_path, tiny_dir, "full", scale=0.01)
    assert run_kind(run) == "full"
    model, _, cfg = load_run(run)
    assert cfg.method.name == "full" and not hasattr(model, "disable_adapter")


def test_plain_model_gets_default_config(tiny_dir):
    model, tok, cfg = load_run(tiny_dir)
    assert run_kind(tiny_dir) is None
    assert cfg.model.name == tiny_dir and not hasattr(model, "disable_adapter")


def test_saved_config_round_trips(tmp_path):
    cfg = Config(model=ModelCfg(name="x"))
    cfg.eval.banned_phrases = ["Nope"]
    cfg.save(tmp_path / "config.yaml")
    back = read_config(tmp_path / "config.yaml")
    assert back.eval.banned_phrases == ["Nope"] and back.train.betas == [0.9, 0.999]


def test_incomplete_or_missing_run_is_a_clear_error(tmp_path, tiny_dir):
    run = make_run(tmp_path, tiny_dir)
    (tmp_path / "run-lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(SlimtuneError, match="did not finish"):
        load_run(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    Config().save(empty / "config.yaml")
    with pytest.raises(SlimtuneError, match="no adapter"):
        load_run(str(empty))
    with pytest.raises(SlimtuneError, match="not a run folder"):
        load_run(str(tmp_path / "nowhere" / "run"))


def test_peak_rss_restarts_per_run():
    """A sweep trains many runs in one process: each reports its own peak, not the process's."""
    import sys

    import numpy as np

    from slimtune.utils import peak_rss_mb, reset_peak_rss

    if not sys.platform.startswith("linux"):
        pytest.skip("the high-water mark is reset through /proc (Linux)")
    big = np.ones(40_000_000)  # 305 MiB
    high = peak_rss_mb()
    del big
    reset_peak_rss()
    assert peak_rss_mb() < high - 200
