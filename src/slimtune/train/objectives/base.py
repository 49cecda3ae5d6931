"""What a training step minimises: the objective is a parameter of the loop.

The loop treats data rows as opaque dicts and calls only the methods of `Objective`:

    units(rows)        what the step's loss is normalised by (SFT: trained target tokens)
    collate(rows)      rows -> a batch of tensors
    obj(model, batch, normaliser, step, ref_model) -> StepOut(loss to backward, sums to log)
    summarize(sums)    the step's sums over all micro-batches and processes -> the logged row
    evaluate(...)      held-out metrics on rows of this objective's kind ("eval_loss" for early stop)

What the rest of slimtune knows of an objective is its row in `specs.SPECS` (rows, packing,
reference, evaluation). The reference model (`uses_reference`) is the tuned model with adapters
switched off, or `ref_model`, a frozen copy, for methods whose base cannot be switched back on
(full FT). An objective keeps no state beyond its instance: one instance serves one run.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import torch

from ...data.batching import collate, row_length, split_by_tokens
from ...specs import SPECS, ObjectiveSpec


def process_place() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sample_seed(*parts) -> int:
    """The sampling seed of one generated answer, from what names it (train.seed, step, which
    prompt, which sample): the same answer whatever the batch, process count or order."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def append_samples(output_dir: str, records: list[dict]) -> None:
    """Append records to OUTPUT_DIR/samples.jsonl in one write (O_APPEND: never interleaved mid-line)."""
    path = os.path.join(output_dir, "samples.jsonl")
    os.makedirs(output_dir or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class StepOut:
    loss: torch.Tensor
    """Scalar to backward: this micro-batch's loss, already divided by the step's normaliser."""
    sums: dict[str, float]
    """Detached sums, added over micro-batches and processes, then passed to `summarize`."""


class Objective:
    """Base class; see the module docstring for the contract."""

    name = "?"

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def spec(self) -> ObjectiveSpec:
        return SPECS[self.name]

    @property
    def packable(self) -> bool:
        """Rows may be packed (data.packing)."""
        return self.spec.packable

    @property
    def generates(self) -> bool:
        """Rows are made during each step (`begin_step`): the spec's flag, unless the objective
        generates only for some settings (distill: distill.on_policy > 0)."""
        return self.spec.generates

    @property
    def uses_reference(self) -> bool:
        """The loss needs the base model's outputs."""
        return self.spec.reference != "none"

    def length(self, row: dict) -> int:
        """Tokens the row costs in one forward pass (length grouping, the token budget)."""
        return row_length(row)

    def split(self, rows: list[dict], max_tokens: int) -> list[list[dict]]:
        """One batch's rows in micro-batches of at most `max_tokens` padded tokens (0: one piece)."""
        return split_by_tokens(rows, max_tokens, self.length)

    def prepare_data(self, tokenizer, seed: int = 0, log=None):
        """cfg.data -> Prepared rows of this objective's kind."""
        raise NotImplementedError

    def before_training(self, model, rows: list[dict], pad_id: int, ref_model=None) -> None:
        """Called once after set-up, before the first evaluation (e.g. precompute the reference)."""

    def begin_step(self, model, rows: list[dict], step: int, ref_model=None) -> list[dict]:
        """Objectives that `generate`: the step's rows (this process's share of one batch)
        -> the rows it trains on, made now from the current model (e.g. sampled completions with
        their rewards); called once per batch, before it is cut into micro-batches."""
        return rows

    def units(self, rows: list[dict]) -> float:
        raise NotImplementedError

    def tokens(self, rows: list[dict]) -> int:
        """Trained tokens of these rows (throughput); the units unless the objective says otherwise."""
        return int(self.units(rows))

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(rows, pad_id)

    def __call__(self, model, batch: dict, normaliser: float, step: int, ref_model=None) -> StepOut:
        raise NotImplementedError

    def summarize(self, sums: dict[str, float], units: float, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, model, rows: list[dict], pad_id: int, batch_size: int, ref_model=None,
                 max_examples: int | None = None, kl: bool = True, ref_cache: dict | None = None) -> dict:
        raise NotImplementedError
