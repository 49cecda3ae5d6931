"""What a training step minimises: the objective is a parameter of the loop.

The loop treats data rows as opaque dicts and calls only the methods of `Objective`:

    units(rows)        what the step's loss is normalised by (SFT: trained target tokens)
    collate(rows)      rows -> a batch of tensors
    obj(model, batch, normaliser, step, ref_model) -> StepOut(loss to backward, sums to log)
    summarize(sums)    the step's sums over all micro-batches and processes -> the logged row
    evaluate(...)      held-out metrics on rows of this objective's kind ("eval_loss" for early stop)

Adding a loss = one `Objective` subclass + its `loss.*` config fields + a row in `OBJECTIVES` +
its tests. The reference model (`uses_reference`) is the tuned model with adapters switched off,
or `ref_model`, a frozen copy, for methods whose base cannot be switched back on (full FT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batching import collate, count_trained, row_length
from .forward import KLTerm, batch_loss


@dataclass
class StepOut:
    loss: torch.Tensor
    """Scalar to backward: this micro-batch's loss, already divided by the step's normaliser."""
    sums: dict[str, float]
    """Detached sums, added over micro-batches and processes, then passed to `summarize`."""


class Objective:
    """Base class; see the module docstring for the contract."""

    name = "?"
    packable = True
    """Rows may be packed (data.packing)."""

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def uses_reference(self) -> bool:
        """The loss needs the base model's outputs."""
        return False

    def length(self, row: dict) -> int:
        """Tokens the row costs in one forward pass (length grouping, the token budget)."""
        return row_length(row)

    def prepare_data(self, tokenizer, seed: int = 0, log=None):
        """cfg.data -> Prepared rows of this objective's kind (SFT: rendered chats)."""
        from ..data.prepare import prepare

        return prepare(self.cfg.data, tokenizer, seed, log=log)

    def before_training(self, model, rows: list[dict], pad_id: int, ref_model=None) -> None:
        """Called once after set-up, before the first evaluation (e.g. precompute the reference)."""

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


class SFT(Objective):
    """Cross-entropy on the trained (assistant) tokens, per trained token.

    loss = sum_i CE_i / N over the N trained target tokens of the whole step.
    """

    name = "sft"

    def units(self, rows):
        return count_trained(rows)

    def _kl(self, step: int) -> KLTerm | None:
        return None

    def __call__(self, model, batch, normaliser, step, ref_model=None):
        out = batch_loss(model, batch, self._kl(step), normaliser, ref_model, chunk_size=self.cfg.loss.chunk_size)
        # the objective's own loss, as a sum: loss x normaliser = CE sum (+ lambda x KL sum)
        return StepOut(out.loss, {"loss": float(out.loss.detach()) * normaliser, "ce": float(out.ce_sum),
                                  "kl": float(out.kl_sum)})

    def summarize(self, sums, units, step):
        n = max(units, 1.0)
        return {"loss": sums["loss"] / n, "ce": sums["ce"] / n}

    def evaluate(self, model, rows, pad_id, batch_size, ref_model=None, max_examples=None, kl=True,
                 ref_cache=None):
        from ..evaluate.heldout import heldout_metrics

        ev = heldout_metrics(model, rows, pad_id, self.cfg.loss, batch_size, max_examples, kl=kl,
                             ref_model=ref_model, ref_cache=ref_cache)
        return {"eval_loss": ev.get("loss"), "eval_ppl": ev.get("ppl"), "eval_kl": ev.get("kl")} if ev else {}


class KLSFT(SFT):
    """SFT anchored to the base: CE + lambda(t) x KL(base || tuned) (or reverse / JSD, tau).

    loss = (sum_i CE_i + lambda(t) sum_j tau^2 KL_j) / N; lambda(t) = kl_lambda x min(1, t / W)
    for the 0-based step t and W = kl_warmup_steps, so the first step trains on CE alone.
    """

    name = "kl_sft"

    @property
    def uses_reference(self):
        return True

    def kl_weight(self, step: int) -> float:
        lc = self.cfg.loss
        return lc.kl_lambda * min(1.0, step / lc.kl_warmup_steps) if lc.kl_warmup_steps else lc.kl_lambda

    def _kl(self, step):
        return KLTerm.from_cfg(self.cfg.loss, self.kl_weight(step))

    def summarize(self, sums, units, step):
        n = max(units, 1.0)
        return {**super().summarize(sums, units, step), "kl": sums["kl"] / n, "kl_lambda": self.kl_weight(step)}


from .preference import DPO, IPO, KTO, ORPO, SimPO  # noqa: E402  (they subclass Objective)

OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "kl_sft": KLSFT, "dpo": DPO, "ipo": IPO, "orpo": ORPO,
                                          "simpo": SimPO, "kto": KTO}


def make_objective(cfg) -> Objective:
    """The objective `cfg.loss.objective` names; `sft` with `loss.kl_lambda > 0` is KL-anchored SFT."""
    name = cfg.loss.objective
    if name == "sft" and cfg.loss.kl_lambda > 0:
        name = "kl_sft"
    return OBJECTIVES[name](cfg)
