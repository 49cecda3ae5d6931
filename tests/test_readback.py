"""Every file a run reads back that is truncated or corrupt gives one line naming the file and what
to do; resume falls back to the previous complete checkpoint and says so."""

import json
import shutil

import pytest
from test_run import make_run
from test_loop import run_args, write_data

from slimtune.config import build_config
from slimtune.errors import SlimtuneError
from slimtune.readback import check_safetensors, read_json
from slimtune.runfolder import load_run
from slimtune.train.checkpoint import latest_checkpoint
from slimtune.train.loop import train


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_adapter_names_the_file(tmp_path, tiny_dir):
    run = make_run(tmp_path, tiny_dir)
    adapter = tmp_path / "run-lora" / "adapter_model.safetensors"
    truncate(adapter)
    with pytest.raises(SlimtuneError, match=r"adapter_model\.safetensors is truncated or corrupt .*train again"):
        load_run(run)
    adapter.write_bytes(b"\x00" * 7)  # not even a header
    with pytest.raises(SlimtuneError, match="adapter_model.safetensors is truncated or corrupt"):
        check_safetensors(adapter, "x")


def test_corrupt_json_names_the_file(tmp_path):
    p = tmp_path / "eval.json"
    p.write_text('{"samples": [1, 2')
    with pytest.raises(SlimtuneError, match=r"eval\.json is truncated or corrupt \(not valid JSON.*; run it again"):
        read_json(p, "run it again")


def test_resume_falls_back_to_the_previous_complete_checkpoint(tmp_path, tiny_dir):
    data = write_data(tmp_path / "d.jsonl")
    args = run_args(tiny_dir, data, tmp_path / "run", **{"train.max_steps": 4, "train.save_every": 1,
                                                         "train.keep_checkpoints": 3})
    train(build_config({}, args), lambda *a: None)
    ckpts = tmp_path / "run" / "checkpoints"
    newest = latest_checkpoint(tmp_path / "run")
    older = sorted(p for p in ckpts.glob("step-*") if p != newest)[-1]
    truncate(newest / "optimizer.safetensors")
    lines = []
    assert latest_checkpoint(tmp_path / "run", lines.append) == older
    assert any(newest.name in line and "optimizer.safetensors is truncated" in line for line in lines)
    (older / "state.json").write_text("{")
    assert latest_checkpoint(tmp_path / "run") not in (newest, older)
    # a resumed run starts from the fallback and finishes
    shutil.rmtree(newest)
    shutil.rmtree(older)
    log = []
    summary = train(build_config({}, args + ["train.resume=true"]), log.append)
    assert summary["after"]["eval_loss"] is not None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())


def test_truncated_config_yaml_is_refused_not_half_read(tmp_path, tiny_dir):
    """A cut-short config.yaml can still parse as YAML (with defaults where the rest was): the run's
    end line is missing, so loading the run says so instead of training or evaluating on defaults."""
    run = make_run(tmp_path, tiny_dir)
    cfg_file = tmp_path / "run-lora" / "config.yaml"
    text = cfg_file.read_text()
    assert text.startswith("# slimtune run config") and text.rstrip().endswith("# end of slimtune run config")
    cfg_file.write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + "\n")  # whole lines, valid YAML
    with pytest.raises(SlimtuneError, match=r"config\.yaml is truncated"):
        load_run(run)


def test_damaged_rendering_cache_is_rendered_again(tmp_path, tokenizer, capsys):
    from slimtune.data.preprocess import render_source
    from slimtune.data.sources import data_cache, open_source

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                            for i in range(5)))
    first = render_source(open_source(str(data)), tokenizer)
    rows = [dict(r) for r in first.ds]
    for arrow in (data_cache() / "rendered").rglob("*.arrow"):
        truncate(arrow, 0.3)
    again = render_source(open_source(str(data)), tokenizer)
    assert [dict(r) for r in again.ds] == rows and not again.cached
    assert "cannot be read" in capsys.readouterr().err
