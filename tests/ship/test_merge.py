"""Merging: the saved model equals the adapter model, loads with plain transformers, and the
methods that cannot merge say so."""

import json

import pytest
import torch
from test_run import make_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune.errors import SlimtuneError
from slimtune.ship.merge import merge_run
from slimtune.runfolder import load_run


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_model_matches_adapter(tmp_path, tiny_dir, method):
    run = make_run(tmp_path, tiny_dir, method)
    out = tmp_path / "merged"
    res = merge_run(run, str(out), "float32", log=lambda m: None)
    assert res["max_abs_logit_diff_merged"] < 1e-4 and res["max_abs_logit_diff_saved"] < 1e-4

    # the user's path: plain transformers, no peft, no slimtune
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    adapter, _, _ = load_run(run)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - adapter(input_ids=ids).logits).abs().max()
    assert diff < 1e-4
    assert json.loads((out / "slimtune_merge.json").read_text())["method"] == method


def test_bf16_merge_is_smaller_and_close(tmp_path, tiny_dir):
    run = make_run(tmp_path, tiny_dir, "lora")
    res = merge_run(run, str(tmp_path / "m16"), "bfloat16", log=lambda m: None)
    assert res["max_abs_logit_diff_merged"] < 1e-4 and res["max_abs_logit_diff_saved"] < 0.1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m16").dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_methods_cannot_merge(tmp_path, tiny_dir, method):
    run = make_run(tmp_path, tiny_dir, method)
    with pytest.raises(SlimtuneError, match=f"{method} run cannot be merged.*slimtune chat"):
        merge_run(run, str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_merge_refuses_to_overwrite_a_foreign_folder(tmp_path, tiny_dir):
    run = make_run(tmp_path, tiny_dir, "lora")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(SlimtuneError, match="not an earlier merge"):
        merge_run(run, str(tmp_path / "keep"))
