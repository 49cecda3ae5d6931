"""FSDP2 (`train.fsdp=true`): 2 CPU processes over gloo, each holding half of every decoder layer,
end with the same fully fine-tuned model as 1 process accumulating 2 micro-batches, on a model
with tied embeddings (the LM head the loss reads outside the forward is the embedding). The
checkpoint it writes holds full tensors."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_loop import chats
from tiny import save_tiny

from slimtune.config import build_config
from slimtune.train.loop import train


def test_fsdp_two_processes_equal_one_process_accumulating(tmp_path):
    model = save_tiny(tmp_path / "tied", tie=True)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats(24, seed=1)))
    common = [f"model.name={model}", f"data.train={data}", "train.max_steps=3", "data.general_prompts=",
              "train.progress=false", "train.batch_size=4", "data.group_by_length=false", "train.lr=1e-3",
              "data.max_length=64", "eval.max_examples=2", "method.name=full", "eval.kl=false"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "slimtune.cli", "train"]
    p = subprocess.run(launch + common + [f"train.output_dir={tmp_path / 'fsdp'}", "train.fsdp=true",
                                          "train.save_every=2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FSDP2: 2 decoder layers" in p.stderr and p.stderr.count("== slimtune summary ==") == 1

    one = tmp_path / "one"
    train(build_config({}, common + [f"train.output_dir={one}", "train.grad_accum=2"]), log=lambda *a: None)
    a = load_file(str(one / "model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)

    # the checkpoint holds full tensors gathered from the shards (resume under FSDP cuts them again)
    ckpt = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert ckpt.keys() == a.keys() and all(ckpt[k].shape == a[k].shape for k in a)
    opt = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-000002" / "optimizer.safetensors"))
    assert sorted(t.numel() for k, t in opt.items() if k.endswith("exp_avg")) == sorted(t.numel() for t in a.values())


def test_fsdp_refuses_what_it_cannot_shard():
    import pytest

    from slimtune.errors import ConfigError
    from slimtune.train.distributed import check_fsdp

    with pytest.raises(ConfigError, match="qlora"):
        check_fsdp(build_config({}, ["method.name=qlora", "train.fsdp=true"]), 2)
    with pytest.raises(ConfigError, match="bf16"):
        check_fsdp(build_config({}, ["train.mixed_precision=fp16", "train.fsdp=true"]), 2)
    check_fsdp(build_config({}, ["train.fsdp=true", "method.name=full"]), 2)
