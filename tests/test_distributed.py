"""`accelerate launch` runs the same loop data-parallel: 2 CPU processes (gloo DDP) with batch 4
each end with the same adapter as 1 process accumulating 2 micro-batches of 4."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_train import chats


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
