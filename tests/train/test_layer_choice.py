"""method.layers=auto:K: the K layers with the largest adapter gradient norm, recorded in the run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_loop import run_args, write_data

from slimtune.config import build_config
from slimtune.errors import ConfigError
from slimtune.train.layer_choice import choose_layers
from slimtune.train.loop import train


def test_choose_layers():
    assert choose_layers({0: 0.1, 1: 0.5, 2: 0.3, 3: 0.05}, 2) == [1, 2]
    with pytest.raises(ConfigError, match="1 to 4"):
        choose_layers({0: 0.1, 1: 0.5, 2: 0.3, 3: 0.05}, 5)
    with pytest.raises(ConfigError, match="auto:K"):
        build_config({}, ["method.layers=auto4"])


def test_auto_layers_trains_only_the_chosen_layers(tmp_path):
    from tiny import save_tiny
    model_dir = save_tiny(tmp_path / "m", "chatml", layers=4)
    data = write_data(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "run"
    train(build_config({}, run_args(model_dir, data, out, **{"method.layers": "auto:2", "train.max_steps": 2,
                                                             "method.auto_layers_batches": 2})),
          log=lambda *a: None)
    choice = json.loads((out / "layer_choice.json").read_text())
    scores = {int(k): v for k, v in choice["scores"].items()}
    assert sorted(scores) == [0, 1, 2, 3] and all(v > 0 for v in scores.values())
    best = sorted(sorted(scores, key=lambda k: -scores[k])[:2])
    assert choice["chosen"] == best
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in load_file(str(out / "adapter_model.safetensors"))}
    assert layers == set(best)  # the adapter lives on the chosen layers only
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["layers"] == best  # recorded, reproducible


def test_layer_scores_are_adapter_gradient_norms(tmp_path):
    """The score of a layer is || d loss / d (its LoRA parameters) || at initialisation."""
    from tiny import make_model, make_tokenizer

    from slimtune.data.batching import collate
    from slimtune.data.render import render_chat
    from slimtune.methods import apply_method
    from slimtune.train.layer_choice import layer_scores
    from slimtune.train.objectives import make_objective
    from test_loop import chats

    tok = make_tokenizer("chatml")
    cfg = build_config({}, ["method.r=4", "train.batch_size=4", "method.auto_layers_batches=1"])
    rows = [dict(zip(("input_ids", "labels"), render_chat(c, tok))) for c in chats(4)]
    model = make_model(tok, layers=3)
    torch.manual_seed(5)
    scores = layer_scores(model, cfg, make_objective(cfg), rows, tok.pad_token_id)
    assert not any("lora" in n for n, _ in model.named_parameters())  # the probe adapter is gone
    fresh = make_model(tok, layers=3)
    torch.manual_seed(5)  # the same LoRA init, by hand
    peft_model = apply_method(fresh, cfg.method)
    batch = collate(rows, tok.pad_token_id)
    out = peft_model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out.logits[:, :-1].double()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="mean")
    ce.backward()
    for layer in range(3):
        g = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad and f".layers.{layer}." in n]
        want = float(torch.sqrt(sum((x.double() ** 2).sum() for x in g)))
        assert scores[layer] == pytest.approx(want, rel=1e-4)
