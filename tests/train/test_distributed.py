"""`accelerate launch` runs the same loop data-parallel: 2 CPU processes (gloo DDP) with batch 4
each end with the same adapter as 1 process accumulating 2 micro-batches of 4."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_loop import chats


def test_ddp_two_processes_equal_one_process_accumulating(tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats(24, seed=1)))
    common = [f"model.name={tiny_dir}", f"data.train={data}", "train.max_steps=3", "data.general_prompts=",
              "train.progress=false", "train.batch_size=4", "data.group_by_length=false", "train.lr=1e-2",
              "data.max_length=64", "eval.max_examples=2"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "slimtune.cli", "train"]
    p = subprocess.run(launch + common + [f"train.output_dir={tmp_path / 'ddp'}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("== slimtune summary ==") == 1  # only the main process speaks
    p = subprocess.run([sys.executable, "-m", "slimtune.cli", "train"] + common +
                       [f"train.output_dir={tmp_path / 'one'}", "train.grad_accum=2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(v.abs().max()) for v in a.values()) > 0.01  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "slimtune.cli", "train"]


def _rows(run):
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("stop", ["plateau", "eval", "time"])
def test_ddp_processes_stop_together_and_log_the_whole_batch_loss(tiny_dir, tmp_path, stop):
    """Every process stops at the same step (else the other waits in an all-reduce until the
    timeout), and the logged loss is the whole accumulated batch's: the 1-process run's."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats(32, seed=1)))
    common = [f"model.name={tiny_dir}", f"data.train={data}", "train.max_steps=8", "data.general_prompts=",
              "train.progress=false", "train.batch_size=2", "data.group_by_length=false", "train.lr=1e-2",
              "data.max_length=64", "eval.max_examples=4", "eval.kl=false"]
    common += {"plateau": ["train.plateau_patience=1", "train.plateau_min_delta=0.5"],
               "eval": ["eval.every=1", "train.early_stop_patience=1", "train.lr=1e-9"],
               "time": ["train.max_minutes=0.0001"]}[stop]
    p = subprocess.run(LAUNCH + common + ["train.grad_accum=2", f"train.output_dir={tmp_path / 'ddp'}"],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["stopped"] != "completed" and summary["steps"] < 8, summary["stopped"]
    if stop == "plateau":  # the same run on one process accumulating all four micro-batches
        p = subprocess.run([sys.executable, "-m", "slimtune.cli", "train"] + common +
                           ["train.grad_accum=4", f"train.output_dir={tmp_path / 'one'}"],
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        one = [r["loss"] for r in _rows(tmp_path / "one") if "loss" in r]
        ddp = [r["loss"] for r in _rows(tmp_path / "ddp") if "loss" in r]
        assert ddp == pytest.approx(one, rel=1e-5) and len(one) == summary["steps"]


KILL_MAIN = """
import os, signal, sys
from slimtune.config import build_config
from slimtune.train.callbacks import Callback
from slimtune.train.loop import train

class KillAfter(Callback):  # the main process dies right after checkpoint N; the launcher ends the other
    def on_checkpoint(self, step, path):
        if step == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

train(build_config({}, sys.argv[1:]), log=lambda *a: None, callbacks=[KillAfter()])
"""


def test_ddp_killed_run_resumes_every_process_random_state(tiny_dir, tmp_path):
    """Two processes with LoRA dropout draw different masks (each its own RNG stream); a run killed
    after checkpoint 3 and resumed must restore each process's own state, or its masks for steps
    4-6 differ and so does the adapter."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats(32, seed=1)))
    common = [f"model.name={tiny_dir}", f"data.train={data}", "train.max_steps=6", "data.general_prompts=",
              "train.progress=false", "train.batch_size=2", "data.group_by_length=false", "train.lr=1e-2",
              "data.max_length=64", "eval.max_examples=2", "eval.kl=false", "method.dropout=0.3",
              "train.save_every=1", "method.r=4"]
    p = subprocess.run(LAUNCH + common + [f"train.output_dir={tmp_path / 'ref'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (tmp_path / "killer.py").write_text(KILL_MAIN)
    killer = LAUNCH[:-3] + [str(tmp_path / "killer.py")]
    p = subprocess.run(killer + common + [f"train.output_dir={tmp_path / 'crash'}"], capture_output=True,
                       text=True, timeout=300, env=dict(__import__("os").environ, KILL_AFTER="3"))
    assert p.returncode != 0
    assert (tmp_path / "crash" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert not (tmp_path / "crash" / "adapter_model.safetensors").exists()
    p = subprocess.run(LAUNCH + common + [f"train.output_dir={tmp_path / 'crash'}", "train.resume=true"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "crash" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


def test_ddp_grpo_two_processes_equal_one_process_accumulating(tiny_dir, tmp_path):
    """GRPO under DDP: each process samples its own prompts' completions (seeded by the prompt, not
    the process), the loss is normalised over the whole step's completions: the same adapter as one
    process accumulating both halves."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say something about {w}"}]}) + "\n"
                            for w in ("cats", "rain", "bread", "maps", "tea", "snow", "jazz", "glass")))
    common = [f"model.name={tiny_dir}", f"data.train={data}", "data.val_fraction=0", "loss.objective=grpo",
              "grpo.rewards=[{name: length, min: 2, max: 4}]", "grpo.num_generations=3", "grpo.max_new_tokens=5",
              "grpo.loss_type=dapo", "train.max_steps=2", "data.general_prompts=", "train.progress=false",
              "train.batch_size=2", "train.lr=1e-2", "train.mixed_precision=no", "eval.kl=false",
              "eval.max_examples=2", "method.r=4"]
    p = subprocess.run(LAUNCH + common + [f"train.output_dir={tmp_path / 'ddp'}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "slimtune.cli", "train"] + common +
                       [f"train.output_dir={tmp_path / 'one'}", "train.grad_accum=2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    one, ddp = _rows(tmp_path / "one"), _rows(tmp_path / "ddp")
    for key in ("reward", "completion_length"):  # the whole step's completions, not one process's
        assert [r[key] for r in ddp if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-6)
