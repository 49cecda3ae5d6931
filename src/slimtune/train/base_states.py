"""The base model's hidden states at evaluated positions, kept on disk between runs.

    held-out / general-prompt batch --content key--> base hidden states (N, H) at its trained positions

The KL to base and the base's own loss need the base's final hidden states at the trained
positions of each evaluation batch. The base never changes, so training's first evaluation
computes them and writes them to <cache>/states/<context>.safetensors ($SLIMTUNE_STATES_CACHE if
set); later evaluations of the same examples (training's last one, `slimtune eval`, every run of a
sweep on the same data) read them instead of running the base again.

The file is chosen by the context: the base model's name, the size and mtime of its files, the
weight dtype, the device type and the 4-bit setting. An entry's key hashes the batch itself (token
ids, labels, mask, positions), so any change of data, template, tokenizer or batching misses.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models import model_files
from ..utils import atomic_file, cache_dir

STATES_VERSION = 1  # bump when what an entry holds changes


class BaseStates(dict):
    """A dict of {batch key: (N, H) tensor} backed by one safetensors file: entries are read from
    the file when first asked for, and `flush()` writes the new ones (atomically).

    Keys that are not strings (batch indices) stay in memory only."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self._new: set[str] = set()
        try:

            with safe_open(str(self.path), "pt") as f:
                self._on_disk = set(f.keys())
        except Exception:  # no file yet, or a broken one (safetensors raises its own error type)
            self._on_disk = set()

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or key in self._on_disk

    def __missing__(self, key):
        if key not in self._on_disk:
            raise KeyError(key)

        with safe_open(str(self.path), "pt") as f:
            value = f.get_tensor(key)
        super().__setitem__(key, value)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if isinstance(key, str):
            self._new.add(key)

    def flush(self) -> None:
        """Write the file again with the entries added since the last write (if any)."""
        if not self._new:
            return

        try:  # the entries already on disk are read back: the file is written whole
            tensors = {k: self[k].detach().to("cpu").contiguous() for k in self._on_disk | self._new}
            with atomic_file(self.path) as tmp:
                save_file(tensors, str(tmp))
            self._on_disk |= self._new
            self._new.clear()
        except Exception:  # a read-only or changed cache only costs time: computed again next time
            pass


def base_states(model_name: str, dtype: str, device: str, four_bit: bool = False) -> BaseStates:
    """The on-disk states of this base in this context (see the module doc)."""

    ident = {"v": STATES_VERSION, "model": model_name, "files": model_files(model_name), "dtype": dtype,
             "device": torch.device(device).type, "four_bit": bool(four_bit)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(os.environ.get("SLIMTUNE_STATES_CACHE") or cache_dir() / "states")
    return BaseStates(folder / f"{key}.safetensors")


def batch_key(batch: dict, what: str) -> str:
    """A key for one collated batch and what is stored for it (e.g. the KL positions)."""
    h = hashlib.sha256(what.encode())
    for name in ("input_ids", "labels", "attention_mask", "position_ids", "example_ids"):
        if name in batch:
            t = batch[name].detach().to("cpu").contiguous()
            h.update(name.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return h.hexdigest()[:32]
