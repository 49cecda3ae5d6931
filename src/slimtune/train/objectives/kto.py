"""KTO (Kahneman-Tversky optimisation) on unpaired rows {prompt_ids, completion_ids, label}.

One forward pass scores the rows' completions and, without grad, mismatched (prompt, completion)
pairs that estimate the reference point z0; the loss is `losses.preference.kto_loss`.
"""

from __future__ import annotations

import zlib

import torch

from ...losses import preference as L
from .paired import Scored, collate_sequences, score


class KTO(Scored):
    """Kahneman-Tversky optimisation on unpaired rows {prompt_ids, completion_ids, label}.

    The reference point z0 is TRL's estimate: each micro-batch also scores mismatched pairs
    (prompt_i, completion_{i-1}) under the model and the base (no grad); z0 = max(0, mean of
    their log-ratios). A micro-batch of one row (a small micro_batch_tokens splits a step into
    rows) pairs its prompt with another training row's completion instead, picked from the
    prompt's content (so the same after a resume); TRL refuses a batch of one.
    """

    name = "kto"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._pool: list[list[int]] = []
        """The training rows' completions (one-row micro-batches draw their mismatched one here)."""

    def before_training(self, model, rows, pad_id, ref_model=None) -> None:
        super().before_training(model, rows, pad_id, ref_model)
        self._pool = [r["completion_ids"] for r in rows]

    def _mismatched(self, rows) -> list[list[int]]:
        comps = [r["completion_ids"] for r in rows]
        if len(rows) > 1 or len(self._pool) < 2:
            return comps[-1:] + comps[:-1]  # (x_i, y_{i-1}), as TRL
        i = zlib.crc32(str(rows[0]["prompt_ids"]).encode()) % len(self._pool)
        if self._pool[i] == comps[0]:
            i = (i + 1) % len(self._pool)
        return [self._pool[i]]

    def length(self, row):
        return len(row["prompt_ids"]) + len(row["completion_ids"])

    def tokens(self, rows):
        return sum(len(r["completion_ids"]) for r in rows)

    def collate(self, rows, pad_id):
        prompts = [r["prompt_ids"] for r in rows]
        comps = [r["completion_ids"] for r in rows]
        batch = collate_sequences(prompts, comps, pad_id)
        kl = collate_sequences(prompts, self._mismatched(rows), pad_id)  # (x_i, y_{i-1})
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
        if all("ref_logps" in r for r in rows):
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows], dtype=torch.float32)
        return batch

    def forward(self, model, batch, ref_model=None, ref_cache=None, key=None):
        """ref_cache / key: as `score` (evaluation: the base's side of both batches computed once)."""
        lc = self.cfg.loss
        kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        with torch.no_grad():
            klsc = score(model, kl_batch, ref_model, True, lc.chunk_size, ref_cache, ("kl", key))
            z0 = L.kto_kl(klsc["logps"], klsc["ref_logps"])
        main = {k: v for k, v in batch.items() if not k.startswith("kl_") and k not in ("label", "ref_logps")}
        want_ref = "ref_logps" not in batch
        sc = score(model, main, ref_model, want_ref, lc.chunk_size, ref_cache, ("main", key))
        if not want_ref:
            sc["ref_logps"] = batch["ref_logps"]
        out = L.kto_loss(sc["logps"], sc["ref_logps"], batch["label"], z0, lc.beta,
                         lc.kto_desirable_weight, lc.kto_undesirable_weight)
        sc.update(n=len(batch["label"]), label=batch["label"], z0=float(z0))
        return out, sc

    def _sums(self, out, sc):
        lab, lp, ln = sc["label"], sc["logps"].detach(), sc["lengths"]
        n_d, n_u = float(lab.sum()), float((~lab).sum())
        sums = {"loss": float(out.losses.detach().sum()), "pairs": float(sc["n"]), "desirable": n_d,
                "undesirable": n_u, "rewards_chosen": float(out.chosen_rewards.nansum()),
                "rewards_rejected": float(out.rejected_rewards.nansum()),
                "logps_chosen": float(lp[lab].sum()), "logps_rejected": float(lp[~lab].sum()),
                "z0": sc["z0"] * sc["n"]}
        if sc["kl_sum"] is not None:
            sums["kl"], sums["kl_tokens"] = float(sc["kl_sum"].sum()), float(ln.sum())
        return sums

    def summarize(self, sums, units, step):
        n = max(sums.get("pairs", units), 1.0)
        nd, nu = max(sums["desirable"], 1.0), max(sums["undesirable"], 1.0)
        rc, rr = sums["rewards_chosen"] / nd, sums["rewards_rejected"] / nu
        return {"loss": sums["loss"] / n, "rewards_chosen": rc, "rewards_rejected": rr, "margin": rc - rr,
                "logps_chosen": sums["logps_chosen"] / nd, "logps_rejected": sums["logps_rejected"] / nu,
                "kto_z0": sums["z0"] / n,
                "kl": sums["kl"] / max(sums["kl_tokens"], 1.0) if "kl" in sums else None}

    def reference_batches(self, rows, pad_id):
        return collate_sequences([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad_id)

    def store_reference(self, rows, ref_logps):
        for r, v in zip(rows, ref_logps):
            r["ref_logps"] = v

    @torch.no_grad()
    def evaluate(self, model, rows, pad_id, batch_size, ref_model=None, max_examples=None, kl=True, ref_cache=None):
        """Held-out: eval_loss, rewards, KL; and the model's own preference accuracy on the pairs
        that both rows of a source pair give (mean per-token log-prob, desirable > undesirable)."""
        if not rows:
            return {}
        sums: dict[str, float] = {}
        means: dict[str, dict[bool, float]] = {}
        for part, batch in self._eval_batches(model, rows, pad_id, batch_size, max_examples):
            key = tuple((r["where"], r["label"]) for r in part)
            out, sc = self.forward(model, batch, ref_model, ref_cache, key)
            for k, v in self._sums(out, sc).items():
                sums[k] = sums.get(k, 0.0) + v
            for r, m in zip(part, (sc["logps"] / sc["lengths"].clamp(min=1)).tolist()):
                means.setdefault(r["where"], {})[r["label"]] = m
        ev = {f"eval_{k}": v for k, v in self.summarize(sums, sums["pairs"], 0).items()}
        pairs = [d for d in means.values() if len(d) == 2]
        ev["eval_pref_accuracy"] = sum(d[True] > d[False] for d in pairs) / len(pairs) if pairs else None
        ev["eval_pref_margin"] = sum(d[True] - d[False] for d in pairs) / len(pairs) if pairs else None
        if not kl:
            ev["eval_kl"] = None
        return ev


OBJECTIVES = {KTO.name: KTO}
