"""Distillation from hidden states at the trained positions: the student's CE plus a divergence
from a teacher, a chunk of rows at a time (never (N, V) logits for all rows at once).

    loss = (alpha * sum_i CE_i + (1 - alpha) * tau^2 * sum_i D(teacher_i || student_i)) / normaliser

Direction convention (p = teacher, q = student; the same as losses.sft.token_kl and TRL's GKD):
forward = KL(p || q) (TRL beta = 0), reverse = KL(q || p) (TRL beta = 1), jsd = TRL's generalised
JSD for 0 < beta < 1. Both softened by tau, the divergence times tau^2 (TRL omits the tau^2).

Online (the teacher in memory) needs nothing new: it is `losses.sft.chunked_loss` with the
teacher's final hidden states and output matrix as the reference. For alpha > 0,
    chunked_loss(hidden, weight, targets, ref_hidden=teacher_hidden, ref_weight=teacher_weight,
                 ref_bias=teacher_bias, kl_lambda=(1 - alpha) / alpha, normaliser=n / alpha,
                 direction=..., temperature=tau, jsd_beta=beta)
since (CE + (1 - a) / a * D) / (n / a) = (a * CE + (1 - a) * D) / n. (alpha = 0: targets all -100
and kl_mask = the trained rows; CE is then not measured.)

On-policy batches (GKD; the student's own answers, train/objectives/distill.py) are the same call
with alpha = 0 and direction reverse: tau^2 * sum_i KL(student_i || teacher_i) / normaliser.

Stored (top-k teacher log-probs written by slimtune.teacher): `topk_distill_loss`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import CHUNK_SIZE
from ..data.render import IGNORE
from .head import (check_shapes, head_backward, head_grad_buffers, matmul_dtype, project, run_chunks,
                   scale_stored_grads, tempered_log_softmax)
from .sft import DIRECTIONS, LossOut, kl_terms

TAILS = ("bucket", "renorm")
# Teacher log-probs are floored here: a zero-probability category (a tail the stored top k covers
# to fp32 rounding, a -inf logit) would make p * log p NaN. 1e-30 is far below anything that moves
# a loss, and exp(LOG_FLOOR) is still a normal fp32 number.
LOG_FLOOR = math.log(1e-30)


def topk_distill_loss(hidden: Tensor, weight: Tensor, targets: Tensor, teacher_ids: Tensor,
                      teacher_logps: Tensor, *, alpha: float = 0.5, temperature: float = 1.0,
                      direction: str = "forward", jsd_beta: float = 0.5, tail: str = "bucket",
                      chunk_size: int = CHUNK_SIZE, normaliser: float | int | Tensor | None = None,
                      bias: Tensor | None = None, logit_scale: float | None = None,
                      logit_softcap: float | None = None) -> LossOut:
    """alpha * CE + (1 - alpha) * tau^2 * D(teacher || student) from a stored teacher's top k.

    hidden: (N, H) student final hidden states at the trained positions (shifted: the row for
    position t predicts token t+1); weight: (V, H), bias: (V,) or None; logit_scale /
    logit_softcap: the head's transforms, as in `losses.sft.chunked_loss`. targets: (N,) long,
    -100 = no CE on that row (every row gets the divergence: the store has a row per trained position).
    teacher_ids: (N, K) integer, K distinct ids per row, 1 <= K <= V. teacher_logps: (N, K) fp32,
    the teacher's log softmax(teacher_logits / temperature) at those ids, i.e. already at this
    loss's temperature (slimtune.teacher writes them at the temperature it is given). The student
    is softened by `temperature` here; CE always uses tau = 1.

    The teacher's distribution beyond its top k is not stored; `tail` says how the k ids stand in
    for the vocabulary:
      bucket: k + 1 categories. The teacher's tail mass 1 - sum_k exp(teacher_logps) is one extra
              category, against the student's mass on every id outside the same k. Nothing is
              renormalised; with K = V there is no tail and this is the full-vocabulary divergence.
      renorm: k categories. Both distributions are renormalised over the k ids; the student's
              mass outside them gets no gradient.
    D is forward, reverse or jsd (beta = jsd_beta) over those categories (kl_terms in sft.py).

    normaliser divides both sums, default the number of CE rows (as chunked_loss). Returns LossOut:
    loss = (alpha * ce_sum + (1 - alpha) * kl_sum) / normaliser, kl_sum = tau^2 * sum of D
    (detached), n_tokens = CE rows, n_kl_tokens = N. Gradients reach hidden, and weight / bias when
    they require grad, in their own dtypes. Peak extra memory: a few (chunk_size, V) fp32 buffers.
    """
    _check(hidden, weight, targets, teacher_ids, teacher_logps, alpha, temperature, direction,
           jsd_beta, tail, chunk_size)
    device = hidden.device
    targets = targets.to(device)
    teacher_ids = teacher_ids.to(device, torch.long)  # gather / scatter index with int64
    teacher_logps = teacher_logps.to(device)
    n_ce = int((targets != IGNORE).sum())
    norm = float(normaliser) if normaliser is not None else float(max(n_ce, 1))
    track = torch.is_grad_enabled()  # ctx.needs_input_grad ignores no_grad, so decide here
    needs = tuple(track and t is not None and t.requires_grad for t in (hidden, weight, bias))
    opts = dict(alpha=float(alpha), tau=float(temperature), direction=direction, beta=float(jsd_beta),
                tail=tail, transform=(logit_scale, logit_softcap), norm=norm)
    loss, ce_sum, kl_sum = _TopKLoss.apply(hidden, weight, bias, targets, teacher_ids, teacher_logps,
                                           int(chunk_size), opts, needs)
    return LossOut(loss, ce_sum, kl_sum, n_ce, hidden.shape[0])


class _TopKLoss(torch.autograd.Function):
    """Forward walks the chunks computing loss and grads; backward scales the stored grads
    (the scheme of sft._ChunkedLoss)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ids, logps, chunk, o, needs):
        need_h, need_w, need_b = needs
        w = weight.detach().to(matmul_dtype(hidden))
        b = None if bias is None else bias.detach().to(matmul_dtype(hidden))
        v = weight.shape[0]
        grads = head_grad_buffers(hidden, v, need_h, need_w, need_b)
        ce_sum, kl_sum = run_chunks(ctx, hidden, weight, bias, w, chunk, grads,
                                    lambda s, e, h: _chunk(h, w, b, targets[s:e], ids[s:e], logps[s:e], o, any(needs)))
        return (o["alpha"] * ce_sum + (1 - o["alpha"]) * kl_sum) / o["norm"], ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        return (*scale_stored_grads(ctx, grad_loss), None, None, None, None, None, None)


def _chunk(h, w, b, t, ids, tlogp, o, want_grad):
    """One chunk of c rows: (ce sum, tau^2 * D sum, d loss / d raw logits (c, V) fp32 or None).
    A function of its own so its (c, V) buffers are freed before the next chunk allocates."""
    alpha, tau = o["alpha"], o["tau"]
    valid = t != IGNORE                                               # (c,)
    z, tanh_z = project(h, w, b, o["transform"], keep_tanh=True)      # (c, V) fp32
    logq1 = z.log_softmax(-1)                                         # CE uses tau = 1
    tgt = t.clamp_min(0)[:, None]                                     # (c, 1)
    ce = -(logq1.gather(1, tgt).squeeze(1) * valid).sum()
    logq = logq1 if tau == 1.0 else tempered_log_softmax(z, tau)      # student at tau, (c, V)
    del z
    cat_p, cat_q, share = _categories(logq, ids, tlogp, o["tail"])
    del logq
    d, g_cat = kl_terms(cat_p, cat_q, o["direction"], o["beta"], want_grad and alpha != 1.0)
    kl = d.sum() * tau**2
    if not want_grad:
        return ce, kl, None
    g = logq1.exp_()                                                  # d CE / d z = softmax - onehot
    g.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=g.dtype))
    g.mul_((valid * alpha)[:, None])
    if g_cat is not None:
        # g_cat is d D / d y_c for category logits y_c = logsumexp of s = z / tau over the category,
        # so d D / d s_v = g_c * q_v / Q_c: g_c itself at a stored id (a category of one), g_tail
        # times v's share of the tail elsewhere; d (tau^2 D) / d z = tau * d D / d s.
        k = ids.shape[1]
        g_kd = share.mul_(g_cat[:, k:]) if share is not None else torch.zeros_like(g)
        g_kd.scatter_(1, ids, g_cat[:, :k])
        g.add_(g_kd, alpha=(1 - alpha) * tau)
        del g_kd
    g.div_(o["norm"])
    return ce, kl, head_backward(g, tanh_z, o["transform"])


def _categories(logq: Tensor, ids: Tensor, tlogp: Tensor, tail: str):
    """Teacher and student log-probs over the categories the top k allow, (c, C) each, and each
    tail id's share q_v / Q_tail of the student's tail (c, V), 0 at the k ids (None: no tail).

    logq: (c, V) student log-probs at tau; ids: (c, K); tlogp: (c, K) teacher log-probs at tau.
    bucket: C = K + 1 (the last is the tail), or C = K when the k ids are the whole vocabulary;
    renorm: C = K, both renormalised over the k ids.
    """
    tlogp = tlogp.float().clamp_min(LOG_FLOOR)
    q_k = logq.gather(1, ids)                                         # (c, K)
    if tail == "renorm":
        return (tlogp - tlogp.logsumexp(-1, keepdim=True), q_k - q_k.logsumexp(-1, keepdim=True), None)
    if ids.shape[1] == logq.shape[1]:
        return tlogp, q_k, None
    # the mass left over, summed in fp64: the stored fp32 top k can cover 1 - 1e-7 of it
    p_tail = (1 - tlogp.double().exp().sum(-1, keepdim=True)).clamp_min(0).log().float()
    rest = logq.scatter(1, ids, float("-inf"))                        # (c, V): outside the k ids
    q_tail = rest.logsumexp(-1, keepdim=True)                         # (c, 1)
    cat_p = torch.cat([tlogp, p_tail.clamp_min(LOG_FLOOR)], 1)
    cat_q = torch.cat([q_k, q_tail], 1)
    return cat_p, cat_q, rest.sub_(q_tail).exp_()


def _check(hidden, weight, targets, ids, logps, alpha, temperature, direction, beta, tail, chunk):
    check_shapes(hidden, weight, targets)
    n, v = hidden.shape[0], weight.shape[0]
    if ids.dim() != 2 or ids.shape[0] != n or not 1 <= ids.shape[1] <= v or logps.shape != ids.shape:
        raise ValueError(f"teacher_ids and teacher_logps must both be (N={n}, K) with 1 <= K <= V={v}, "
                         f"got {tuple(ids.shape)} and {tuple(logps.shape)}")
    if ids.dtype.is_floating_point or not logps.dtype.is_floating_point:
        raise ValueError("teacher_ids must be integer and teacher_logps floating point")
    if n and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"teacher_ids must lie in [0, {v})")
    if n and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("teacher_ids repeat an id within a row; the top k are k distinct ids")
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r}; choose one of: {', '.join(TAILS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose one of: {', '.join(DIRECTIONS)}")
    if direction == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd_beta must be in (0, 1), got {beta}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0 or chunk < 1:
        raise ValueError("temperature must be > 0 and chunk_size >= 1")


@torch.no_grad()
def agreement_sums(hidden: Tensor, weight: Tensor, targets: Tensor, ref_hidden: Tensor | None = None,
                   ref_weight: Tensor | None = None, *, teacher_ids: Tensor | None = None,
                   teacher_logps: Tensor | None = None, bias: Tensor | None = None, ref_bias: Tensor | None = None,
                   logit_scale: float | None = None, logit_softcap: float | None = None,
                   chunk_size: int = CHUNK_SIZE) -> dict[str, float]:
    """Held-out measures of a student against its teacher, as sums over the N rows (tau = 1):

        ce          student CE of the targets (rows with target -100 add 0)
        teacher_ce  the teacher's CE (None from a stored top k: a target outside it has no log-prob)
        kl          KL(teacher || student), full vocabulary; stored: over the top k + one tail bucket
        agree       rows where both models' most likely next token is the same
    hidden / ref_hidden: (N, H) student / teacher final hidden states at the same positions,
    weight / ref_weight: (V, H); or teacher_ids / teacher_logps (N, K) from a store (its
    temperature). Chunks of `chunk_size` rows: never (N, V) logits.
    """
    transform = (logit_scale, logit_softcap)
    out = {"ce": 0.0, "teacher_ce": None if ref_hidden is None else 0.0, "kl": 0.0, "agree": 0.0,
           "n": float(hidden.shape[0])}
    for s in range(0, hidden.shape[0], chunk_size):
        t = targets[s:s + chunk_size].to(hidden.device)
        valid, tgt = t != IGNORE, t.clamp_min(0)[:, None]
        logq = project(hidden[s:s + chunk_size], weight, bias, transform).log_softmax(-1)   # (c, V)
        out["ce"] -= float((logq.gather(1, tgt).squeeze(1) * valid).sum())
        if ref_hidden is None:
            ids = teacher_ids[s:s + chunk_size].to(hidden.device, torch.long)
            cat_p, cat_q, _ = _categories(logq, ids, teacher_logps[s:s + chunk_size].to(hidden.device), "bucket")
            top = ids[:, 0]
        else:
            rw = weight if ref_weight is None else ref_weight
            cat_p = project(ref_hidden[s:s + chunk_size], rw, ref_bias, transform).log_softmax(-1)
            cat_q = logq
            out["teacher_ce"] -= float((cat_p.gather(1, tgt).squeeze(1) * valid).sum())
            top = cat_p.argmax(-1)
        out["kl"] += float(kl_terms(cat_p, cat_q, "forward", 0.5, False)[0].sum())
        out["agree"] += float((logq.argmax(-1) == top).sum())
    return out
