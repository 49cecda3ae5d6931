"""Core ML export, opt-in (`pytest -m apple tests/ship/test_coreml.py`; needs coremltools).
On Linux coremltools converts and reads packages back but cannot run them: these tests check the
traced module against transformers and the package's functions, inputs, outputs, states and
weight size. The last test runs the package with Core ML and only runs on macOS."""

import json
import sys

import pytest

pytest.importorskip("coremltools")
pytestmark = pytest.mark.apple

from tiny import make_qwen, make_tokenizer  # noqa: E402

from slimtune.ship.coreml import PACKAGE, export_coreml, read_back  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("coreml") / "export"
    return out, export_coreml(tiny_dir, str(out), [64, 128], n_prompts=3, n_new=12, log=lambda m: None)


def test_package_reads_back_with_the_documented_interface(exported):
    out, res = exported
    assert res["default_function"] == "ctx_64" and set(res["functions"]) == {"ctx_64", "ctx_128"}
    for ctx in (64, 128):
        f = res["functions"][f"ctx_{ctx}"]
        assert f["inputs"]["inputIds"] == {"dtype": "INT32", "shape": [[1, 1], [1, ctx]]}
        assert f["inputs"]["causalMask"] == {"dtype": "FLOAT16", "shape": [[1, 1], [1, 1], [1, ctx], [1, ctx]]}
        assert list(f["outputs"]) == ["logits"] and f["outputs"]["logits"]["dtype"] == "FLOAT16"
        # (layers, batch, kv heads, context, head dim) of the tiny Llama: 2 layers, 2 kv heads, 32 / 4
        assert f["states"] == {n: {"dtype": "FLOAT16", "shape": [2, 1, 2, ctx, 8]} for n in ("keyCache", "valueCache")}
    # fp16 weights, stored once for both functions: 2 bytes a parameter plus alignment
    assert 2.0 <= res["weight_bytes_per_param"] < 2.5
    assert res == {**res, **read_back(out / PACKAGE)}


def test_traced_module_answers_like_transformers_and_the_mac_side_is_shipped(exported):
    out, res = exported
    assert res["traced_max_abs_logit_diff"] < 1e-3 and res["traced_greedy_equal"] == res["traced_prompts"] == 3
    ref = json.loads((out / "reference.json").read_text())
    assert ref["function"] == "ctx_64" and len(ref["answers"]) == 3 and ref["stop_ids"]
    fmt = json.loads((out / "prompt_format.json").read_text())
    assert fmt["family"] == "chatml" and fmt["stop_ids"] == ref["stop_ids"]
    for f in ("SlimtuneChat/Package.swift", "SlimtuneChat/Sources/SlimtuneChat/Generator.swift",
              "SlimtuneChat/Sources/slimtune-chat/main.swift", "check_on_mac.py", "README.md", "tokenizer.json"):
        assert (out / f).is_file(), f
    assert "ctx_128" in (out / "README.md").read_text()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_models_convert(tmp_path, arch):
    tok = make_tokenizer("chatml", split="qwen2")
    make_qwen(tok, arch).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    res = export_coreml(str(tmp_path / "m"), str(tmp_path / "out"), [256], n_prompts=2, n_new=8, log=lambda m: None)
    head_dim = 128 if arch == "qwen3" else 8
    assert res["functions"]["ctx_256"]["states"]["keyCache"]["shape"] == [2, 1, 2, 256, head_dim]
    assert res["traced_greedy_equal"] == 2 and res["traced_max_abs_logit_diff"] < 1e-3


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS 15+")
def test_on_mac_core_ml_answers_like_transformers(exported):
    """The converted program itself: its greedy answers (fp16) against transformers' (fp32)."""
    import importlib.util

    out, _ = exported
    spec = importlib.util.spec_from_file_location("check_on_mac", out / "check_on_mac.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for units in ("cpu", "all"):
        res = mod.check(out, units)
        assert res["inputs"] == ["inputIds", "causalMask"] and res["states"] == ["keyCache", "valueCache"]
        assert res["greedy_equal"] >= res["prompts"] - 1, res  # fp16 may part at one near-tie
