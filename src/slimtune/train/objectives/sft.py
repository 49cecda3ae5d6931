"""Supervised fine-tuning: cross-entropy on the assistant tokens, optionally anchored to the base.

    sft      loss = sum_i CE_i / N over the N trained target tokens of the whole step
    kl_sft   loss = (sum_i CE_i + lambda(t) sum_j tau^2 KL_j) / N   (loss.kl_lambda > 0)
"""

from __future__ import annotations

from ...data.batching import count_trained
from ...data.prepare import prepare
from ..forward import KLTerm, batch_loss
from ..heldout import heldout_metrics
from .base import Objective, StepOut


class SFT(Objective):
    """Cross-entropy on the trained (assistant) tokens, per trained token.

    loss = sum_i CE_i / N over the N trained target tokens of the whole step.
    """

    name = "sft"

    def prepare_data(self, tokenizer, seed: int = 0, log=None):
        """cfg.data -> rendered chats (trained tokens marked), split into train / val."""
        return prepare(self.cfg.data, tokenizer, seed, log=log)

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
        ev = heldout_metrics(model, rows, pad_id, self.cfg.loss, batch_size, max_examples, kl=kl,
                             ref_model=ref_model, ref_cache=ref_cache)
        return {"eval_loss": ev.get("loss"), "eval_ppl": ev.get("ppl"), "eval_kl": ev.get("kl")} if ev else {}


class KLSFT(SFT):
    """SFT anchored to the base: CE + lambda(t) x KL(base || tuned) (or reverse / JSD, tau).

    loss = (sum_i CE_i + lambda(t) sum_j tau^2 KL_j) / N; lambda(t) = kl_lambda x min(1, t / W)
    for the 0-based step t and W = kl_warmup_steps, so the first step trains on CE alone.
    """

    name = "kl_sft"

    def kl_weight(self, step: int) -> float:
        lc = self.cfg.loss
        return lc.kl_lambda * min(1.0, step / lc.kl_warmup_steps) if lc.kl_warmup_steps else lc.kl_lambda

    def _kl(self, step):
        return KLTerm.from_cfg(self.cfg.loss, self.kl_weight(step))

    def summarize(self, sums, units, step):
        n = max(units, 1.0)
        return {**super().summarize(sums, units, step), "kl": sums["kl"] / n, "kl_lambda": self.kl_weight(step)}

OBJECTIVES = {c.name: c for c in (SFT, KLSFT)}
