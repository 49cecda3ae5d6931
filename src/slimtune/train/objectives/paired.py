"""Preference objectives on pairs: DPO, IPO, ORPO, SimPO (KTO, unpaired, is kto.py).

A batch of n pairs is ONE forward pass over 2n rows, chosen first then rejected:

    input_ids  (2n, T)   prompt_i + chosen_i  for i < n,  prompt_i + rejected_i  for i >= n
    labels     (2n, T)   completion tokens (content + end-of-turn), -100 on prompt and padding

Sequence log-probs are sums over completion positions only (`losses.preference.token_logps`, chunked:
never (2n, T, V) logits). The reference is the base (adapters off, or `ref_model` for full
fine-tuning); its hidden states go through the same chunk loop, which also yields the per-token
KL(base || tuned) logged as `kl`. With `loss.precompute_reference` the reference log-probs are
computed once before training (`before_training`) and read from the rows.

The loss of a step is the sum of per-pair losses over the step's pairs (KTO: examples).
"""

from __future__ import annotations

import torch

from ...config import CHUNK_SIZE
from ...data.preference import prepare_preferences
from ...data.render import IGNORE
from ...losses import preference as L
from ...utils import eval_mode
from ..forward import chunk_with_reference, hidden_states, output_layer, reference_at, reference_head
from .base import Objective, StepOut


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def to_device(model, batch: dict) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def collate_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Rows prompt + completion, right-padded: input_ids, attention_mask, labels (B, T)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE] * len(p) + c for p, c in zip(prompts, completions)]
    input_ids = _pad(seqs, pad_id)
    return {"input_ids": input_ids, "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
            "labels": _pad(labels, IGNORE)}


def score(model, batch: dict, ref_model=None, want_ref: bool = True, chunk_size: int = CHUNK_SIZE,
          ref_cache: dict | None = None, key=None) -> dict:
    """Per-row completion log-probs of `batch` (B rows): logps (B,) with grad, ref_logps (B,) and
    kl_sum (B,) (None without the reference), lengths (B,) completion tokens.

    The base never changes: evaluation passes `ref_cache` (a dict) and a `key` per batch, and the
    base's hidden states at the completion positions are computed once.
    """
    targets = batch["labels"][:, 1:]                       # position t predicts token t+1
    sel = targets != IGNORE                                 # (B, T-1) completion positions
    seq = sel.nonzero()[:, 0]                               # (N,) row of each position
    n_rows = targets.shape[0]
    kw = {}
    if want_ref:  # the base first, while no autograd graph is held
        kw = dict(ref_hidden=reference_at(model, batch, sel, ref_model, ref_cache, key), **reference_head(model, ref_model))
    h = hidden_states(model, batch)[:, :-1][sel]            # (N, H)
    head = output_layer(model)
    chunk = chunk_with_reference(chunk_size) if want_ref else chunk_size
    tl = L.token_logps(h, head.weight, targets[sel], bias=head.bias, chunk_size=chunk, logit_softcap=head.softcap,
                       logit_scale=head.scale, **kw)
    out = {"logps": L.sequence_sums(tl.logps, seq, n_rows), "lengths": sel.sum(1).float(),
           "ref_logps": None, "kl_sum": None}
    if want_ref:
        out["ref_logps"] = L.sequence_sums(tl.ref_logps, seq, n_rows)
        out["kl_sum"] = L.sequence_sums(tl.kl, seq, n_rows)
    return out


class Scored(Objective):
    """Objectives on completion log-probs (`score`): the reference precomputed or scored per step,
    evaluation batches in eval mode. Subclasses: PairedObjective (here), KTO (kto.py)."""

    def prepare_data(self, tokenizer, seed: int = 0, log=None):
        return prepare_preferences(self.cfg.data, tokenizer, self.spec.rows, seed)

    def before_training(self, model, rows: list[dict], pad_id: int, ref_model=None) -> None:
        """loss.precompute_reference: the base's log-probs of every training row, once."""
        if self.uses_reference and self.cfg.loss.precompute_reference:
            self.reference_logps(model, rows, pad_id, self.cfg.eval.batch_size, ref_model)

    def units(self, rows: list[dict]) -> float:
        """Pairs (KTO: examples): the loss of a step is the mean of per-pair losses."""
        return float(len(rows))

    def forward(self, model, batch: dict, ref_model=None) -> tuple[L.PrefOut, dict]:
        """(per-pair losses and rewards, the scores they came from)."""
        raise NotImplementedError

    def _sums(self, out: L.PrefOut, sc: dict) -> dict[str, float]:
        raise NotImplementedError

    def __call__(self, model, batch, normaliser, step, ref_model=None) -> StepOut:
        out, sc = self.forward(model, batch, ref_model)
        return StepOut(out.losses.sum() / normaliser, self._sums(out, sc))

    def reference_batches(self, rows: list[dict], pad_id: int) -> dict:
        """The batch whose completion log-probs are the rows' reference (no KL side, no labels)."""
        raise NotImplementedError

    def store_reference(self, rows: list[dict], ref_logps: list[float]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reference_logps(self, model, rows: list[dict], pad_id: int, batch_size: int = 8, ref_model=None) -> None:
        """Store each row's base log-probs in row["ref_logps"]: computed once."""
        with eval_mode(model):
            for s in range(0, len(rows), batch_size):
                part = rows[s:s + batch_size]
                batch = to_device(model, self.reference_batches(part, pad_id))
                self.store_reference(part, score(model, batch, ref_model, True, self.cfg.loss.chunk_size)["ref_logps"].tolist())

    def _eval_batches(self, model, rows, pad_id, batch_size, max_examples=None):
        """(rows, collated batch on the model's device) in turn, the model in eval mode meanwhile;
        the reference is always scored fresh (a precomputed `ref_logps` is training's)."""
        rows = rows[:max_examples] if max_examples else rows
        with eval_mode(model):
            for s in range(0, len(rows), batch_size):
                part = rows[s:s + batch_size]
                batch = to_device(model, self.collate(part, pad_id))
                batch.pop("ref_logps", None)
                yield part, batch


class PairedObjective(Scored):
    """Shared by DPO, IPO, ORPO and SimPO: rows {prompt_ids, chosen_ids, rejected_ids}."""

    def length(self, row: dict) -> int:
        # two rows (chosen, rejected) padded to the longer one: pairs are never split
        return 2 * (len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])))

    def tokens(self, rows: list[dict]) -> int:
        """Scored completion tokens, chosen and rejected."""
        return sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_ids"] for r in rows] * 2
        batch = collate_sequences(prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad_id)
        if all("ref_logps" in r for r in rows):  # precomputed reference: (2n,) chosen then rejected
            batch["ref_logps"] = torch.tensor([r["ref_logps"][0] for r in rows] + [r["ref_logps"][1] for r in rows],
                                              dtype=torch.float32)
        return batch

    def pair_loss(self, sc: dict) -> L.PrefOut:
        raise NotImplementedError

    def reference_batches(self, rows, pad_id):
        batch = self.collate(rows, pad_id)
        batch.pop("ref_logps", None)
        return batch

    def store_reference(self, rows, ref_logps):
        n = len(rows)
        for i, r in enumerate(rows):
            r["ref_logps"] = (ref_logps[i], ref_logps[i + n])  # chosen, rejected

    def forward(self, model, batch: dict, ref_model=None) -> tuple[L.PrefOut, dict]:
        want_ref = self.uses_reference and "ref_logps" not in batch
        sc = score(model, batch, ref_model, want_ref, self.cfg.loss.chunk_size)
        if "ref_logps" in batch:
            sc["ref_logps"] = batch["ref_logps"]
        n = batch["input_ids"].shape[0] // 2
        sc["n"] = n
        return self.pair_loss(sc), sc

    def _sums(self, out: L.PrefOut, sc: dict) -> dict[str, float]:
        n, lp, ln = sc["n"], sc["logps"].detach(), sc["lengths"]
        margin = out.chosen_rewards - out.rejected_rewards
        sums = {"loss": float(out.losses.detach().sum()), "pairs": float(n),
                "rewards_chosen": float(out.chosen_rewards.sum()), "rewards_rejected": float(out.rejected_rewards.sum()),
                "margin": float(margin.sum()), "correct": float((margin > 0).sum()),
                "logps_chosen": float(lp[:n].sum()), "logps_rejected": float(lp[n:].sum())}
        if sc["kl_sum"] is not None:
            sums["kl"], sums["kl_tokens"] = float(sc["kl_sum"].sum()), float(ln.sum())
        # the model's own preference, no reference: mean per-token log-prob of chosen > rejected
        mean = lp / ln.clamp(min=1)
        sums["pref_correct"] = float((mean[:n] > mean[n:]).sum())
        sums["pref_margin"] = float((mean[:n] - mean[n:]).sum())
        return sums

    def summarize(self, sums: dict[str, float], units: float, step: int) -> dict[str, float]:
        n = max(sums.get("pairs", units), 1.0)
        row = {"loss": sums["loss"] / n, "rewards_chosen": sums["rewards_chosen"] / n,
               "rewards_rejected": sums["rewards_rejected"] / n, "margin": sums["margin"] / n,
               "accuracy": sums["correct"] / n, "logps_chosen": sums["logps_chosen"] / n,
               "logps_rejected": sums["logps_rejected"] / n,
               "kl": sums["kl"] / max(sums["kl_tokens"], 1.0) if "kl" in sums else None}
        return row

    @torch.no_grad()
    def evaluate(self, model, rows: list[dict], pad_id: int, batch_size: int, ref_model=None,
                 max_examples: int | None = None, kl: bool = True, ref_cache: dict | None = None) -> dict:
        """Held-out: eval_loss (mean pair loss), reward accuracy and margin, the model's own
        preference accuracy and margin (mean per-token log-prob, chosen vs rejected, no reference),
        chosen / rejected log-probs and KL(base || tuned) per completion token."""
        if not rows:
            return {}
        sums: dict[str, float] = {}
        for part, batch in self._eval_batches(model, rows, pad_id, batch_size, max_examples):
            key = tuple(r["where"] for r in part)
            sc = score(model, batch, ref_model, self.uses_reference or kl, self.cfg.loss.chunk_size, ref_cache, key)
            sc["n"] = len(part)
            for k, v in self._sums(self.pair_loss(sc), sc).items():
                sums[k] = sums.get(k, 0.0) + v
        n = max(sums["pairs"], 1.0)
        row = self.summarize(sums, n, 0)
        ev = {f"eval_{k}": v for k, v in row.items()}
        ev["eval_pref_accuracy"] = sums["pref_correct"] / n
        ev["eval_pref_margin"] = sums["pref_margin"] / n
        if not kl:
            ev["eval_kl"] = None
        return ev


class DPO(PairedObjective):
    """Direct preference optimisation, sigmoid loss (loss.beta, loss.label_smoothing)."""

    name = "dpo"

    def pair_loss(self, sc):
        n, lp, ref = sc["n"], sc["logps"], sc["ref_logps"]
        return L.dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], self.cfg.loss.beta, self.cfg.loss.label_smoothing)


class IPO(PairedObjective):
    """Identity preference optimisation, per-token log-ratios (loss.beta = tau)."""

    name = "ipo"

    def pair_loss(self, sc):
        n, lp, ref, ln = sc["n"], sc["logps"], sc["ref_logps"], sc["lengths"]
        return L.ipo_loss(lp[:n], lp[n:], ref[:n], ref[n:], ln[:n], ln[n:], self.cfg.loss.beta)


class ORPO(PairedObjective):
    """Odds-ratio preference optimisation: NLL on chosen + loss.orpo_lambda x log odds ratio."""

    name = "orpo"

    def pair_loss(self, sc):
        n, mean = sc["n"], sc["logps"] / sc["lengths"].clamp(min=1)
        return L.orpo_loss(mean[:n], mean[n:], self.cfg.loss.orpo_lambda)


class SimPO(PairedObjective):
    """Simple preference optimisation: length-normalised, margin loss.simpo_gamma, no reference."""

    name = "simpo"

    def pair_loss(self, sc):
        n, mean = sc["n"], sc["logps"] / sc["lengths"].clamp(min=1)
        lc = self.cfg.loss
        return L.simpo_loss(mean[:n], mean[n:], lc.simpo_beta, lc.simpo_gamma, lc.label_smoothing)


OBJECTIVES = {c.name: c for c in (DPO, IPO, ORPO, SimPO)}
