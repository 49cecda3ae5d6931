"""Device choice (cuda > mps > cpu, or the user's), MPS guards and what bitsandbytes supports,
with the machine's availability flags monkeypatched."""

import os

import pytest
import torch

from slimtune import machine
from slimtune.errors import ConfigError, SlimtuneError


@pytest.mark.parametrize("cuda,mps,want,got", [
    (True, True, "auto", "cuda"), (False, True, "auto", "mps"), (False, False, "auto", "cpu"),
    (True, False, "cpu", "cpu"), (True, True, "mps", "mps"), (True, False, "cuda", "cuda"),
])
def test_pick_device(monkeypatch, cuda, mps, want, got):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(machine, "mps_available", lambda: mps)
    assert machine.pick_device(want) == got


@pytest.mark.parametrize("want,match", [("cuda", "no CUDA"), ("mps", "MPS is not available"), ("tpu", "train.device")])
def test_unavailable_device_is_refused(monkeypatch, want, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "mps_available", lambda: False)
    with pytest.raises(ConfigError, match=match):
        machine.pick_device(want)


def test_mps_guards(monkeypatch):
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    machine.prepare_mps()
    assert os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"


def test_four_bit_support(monkeypatch):
    pytest.importorskip("bitsandbytes")
    assert machine.four_bit_support("cpu") == torch.float32  # bitsandbytes quantises on this CPU
    monkeypatch.setattr(machine, "_quantises", lambda kind: False)
    with pytest.raises(SlimtuneError, match="method.name=lora"):
        machine.four_bit_support("mps")


def test_config_fields():
    from slimtune.config import build_config

    cfg = build_config({}, ["train.device=cpu", "train.report_to=[tensorboard]", "train.mixed_precision=bf16"])
    assert (cfg.train.device, cfg.train.report_to, cfg.train.mixed_precision) == ("cpu", ["tensorboard"], "bf16")
    with pytest.raises(ConfigError, match="report_to"):
        build_config({}, ["train.report_to=[neptune]"])


def test_available_memory_reads_meminfo(monkeypatch, tmp_path):
    import builtins

    from slimtune.machine import available_memory

    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       24683664 kB\nMemFree:        16151336 kB\nMemAvailable:   23961152 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(fake if f == "/proc/meminfo" else f, *a, **k))
    assert available_memory() == 23961152 * 1024
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert available_memory() is None
