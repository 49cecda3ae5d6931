"""Preference losses (DPO, IPO, ORPO, SimPO, KTO) and chunked per-token log-probs.

Sequence log-probs come from the final hidden states at completion positions only, already
shifted (hidden at position t predicts token t+1): `hidden: (N, H)`, `targets: (N,)`. The output
projection `weight: (V, H)` is applied `chunk_size` rows at a time, so at most a few
(chunk, V) fp32 buffers exist, never (B, T, V). Per-sequence sums are then an `index_add` of the
per-token values (plain autograd).

The losses are pure functions of per-sequence log-probs, one value per pair (or per example for
KTO); the objective sums them and divides by the step's pairs.

    DPO    -(1-eps) log s(beta d) - eps log s(-beta d),  d = (pi_c - ref_c) - (pi_r - ref_r)
    IPO    (d_c / |y_c| - d_r / |y_r| - 1 / (2 beta))^2                  (TRL's length-normalised form)
    ORPO   -mean_t log pi(y_c) - lambda log s(log odds(y_c) - log odds(y_r)),  odds(y) = p / (1 - p),
           p = exp(mean_t log pi(y))                                       (no reference)
    SimPO  -(1-eps) log s(beta (a_c - a_r) - gamma) - eps log s(-(...)),  a = mean_t log pi(y)
    KTO    w_d (1 - s(beta (r - z))) for desirable, w_u (1 - s(beta (z - r))) for undesirable,
           r = pi - ref, z = max(0, mean over the batch of pi - ref on mismatched pairs), detached
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import CHUNK_SIZE
from .head import check_shapes, head_backward, project


@dataclass
class TokenLogps:
    logps: Tensor
    """(N,) fp32 log pi(target) per token; differentiable through hidden (and weight, bias)."""
    ref_logps: Tensor | None
    """(N,) fp32 log pi_ref(target), no grad; None without ref_hidden."""
    kl: Tensor | None
    """(N,) fp32 KL(ref || pi) over the vocabulary at each position, no grad; None without ref_hidden."""
    entropy: Tensor | None = None
    """(N,) fp32 entropy of pi over the vocabulary at each position, no grad; with entropy=True only."""


def token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None,
                ref_bias: Tensor | None = None, chunk_size: int = CHUNK_SIZE,
                logit_softcap: float | None = None, logit_scale: float | None = None,
                entropy: bool = False) -> TokenLogps:
    """Log-probs of `targets` (N,) under `hidden` (N, H) @ `weight` (V, H).T (+ bias), in chunks.

    With `ref_hidden` (N, H) (the base's hidden states at the same positions; `ref_weight`
    defaults to `weight`) the same chunk loop also returns the reference log-probs and the
    per-token KL(ref || pi), for free next to the logits it already builds; `entropy` adds the
    policy's entropy at each position the same way (GRPO logs it).
    Forward stores d log pi_t / d hidden_t (N, H) when hidden needs a grad, so backward is a
    scale; a trainable weight/bias (full fine-tuning) recomputes each chunk's logits in backward.
    Logits are transformed as the model does: z = cap * tanh(raw * logit_scale / cap).
    Peak extra memory: a few (chunk_size, V) fp32 buffers.
    """
    check_shapes(hidden, weight, targets, ref_hidden)
    if ref_hidden is not None and ref_weight is None:
        ref_weight, ref_bias = weight, bias
    track = torch.is_grad_enabled()
    needs = tuple(track and t is not None and t.requires_grad for t in (hidden, weight, bias))
    opts = (int(chunk_size), (logit_scale, logit_softcap), needs, entropy)
    logps, ref_logps, kl, ent = _TokenLogps.apply(hidden, weight, bias, targets.to(hidden.device),
                                                  ref_hidden, ref_weight, ref_bias, opts)
    return TokenLogps(logps, ref_logps if ref_hidden is not None else None, kl if ref_hidden is not None else None,
                      ent if entropy else None)


def _dlogp_dz(z: Tensor, lse: Tensor, t: Tensor, tanh: Tensor | None, transform: tuple) -> Tensor:
    """d log softmax(z)[t] / d raw logits, (c, V): onehot(t) - softmax(z), back through the head's
    transform (`head.head_backward`)."""
    g = z.sub_(lse[:, None]).exp_().neg_()                         # reuses z's buffer
    g.scatter_add_(1, t[:, None], torch.ones_like(t[:, None], dtype=g.dtype))
    return head_backward(g, tanh, transform)


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, opts):
        chunk, tf, (need_h, need_w, need_b), want_ent = opts
        n = hidden.shape[0]
        w = weight.detach()
        b = None if bias is None else bias.detach()
        logps = torch.empty(n, device=hidden.device)
        ref_logps = torch.empty(n if ref_hidden is not None else 0, device=hidden.device)
        kl = torch.empty_like(ref_logps)
        ent = torch.empty(n if want_ent else 0, device=hidden.device)
        jac = torch.empty_like(hidden) if need_h else None         # d logp_t / d hidden_t
        affine = tf[1] is None  # no soft-cap: z = scale * (w . h + b), so sum_v p_v z_v and p @ w share one matmul
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            t = targets[s:e]
            z, tanh = project(hidden[s:e].detach(), w, b, tf, keep_tanh=True)     # (c, V)
            lse = z.logsumexp(-1)
            logps[s:e] = z.gather(1, t[:, None]).squeeze(1) - lse
            if ref_hidden is not None:
                rz = project(ref_hidden[s:e].detach(), ref_weight.detach(), None if ref_bias is None
                             else ref_bias.detach(), tf)
                rlog = rz.log_softmax(-1)
                ref_logps[s:e] = rlog.gather(1, t[:, None]).squeeze(1)
                # KL(ref || pi) = sum_v p_ref (log p_ref - log pi)
                kl[s:e] = (rlog.exp() * (rlog - z + lse[:, None])).sum(-1)
                del rz, rlog
            if affine and (need_h or want_ent):
                # softmax once, in z's buffer: d logp_t / d h = scale (w_t - p @ w) and
                # H = lse - sum_v p_v z_v = lse - scale (h . (p @ w) + p . b); no second (c, V) pass
                sc = 1.0 if tf[0] is None else tf[0]
                p = z.sub_(lse[:, None]).exp_()
                pw = p.to(w.dtype) @ w                                          # (c, H)
                if want_ent:
                    dot = (hidden[s:e].detach().float() * pw.float()).sum(-1)
                    ent[s:e] = lse - sc * (dot if b is None else dot + p @ b.float())
                if need_h:
                    jac[s:e] = ((w[t] - pw) * sc).to(hidden.dtype)
                del p, pw
            else:
                if want_ent:  # H = lse - sum_v p_v z_v; one (c, V) buffer (a (c, 1, V) x (c, V, 1) bmm was 10x slower on a CPU)
                    p = (z - lse[:, None]).exp_()
                    ent[s:e] = lse - p.mul_(z).sum(-1)
                    del p
                if need_h:
                    g = _dlogp_dz(z, lse, t, tanh, tf)
                    jac[s:e] = (g.to(w.dtype) @ w).to(hidden.dtype)
                    del g
            del z, tanh
        ctx.save_for_backward(jac, hidden if (need_w or need_b) else None, weight, bias, targets)
        ctx.opts = opts
        ctx.mark_non_differentiable(ref_logps, kl, ent)
        return logps, ref_logps, kl, ent

    @staticmethod
    def backward(ctx, g_logps, _g_ref, _g_kl, _g_ent):
        jac, hidden, weight, bias, targets = ctx.saved_tensors
        chunk, tf, (need_h, need_w, need_b), _ = ctx.opts
        grad_h = grad_w = grad_b = None
        if need_h:
            grad_h = jac * g_logps[:, None].to(jac.dtype)
        if need_w or need_b:  # full fine-tuning: recompute each chunk's logits
            gw = torch.zeros(weight.shape, device=weight.device) if need_w else None
            gb = torch.zeros(weight.shape[0], device=weight.device) if need_b else None
            w = weight.detach()
            b = None if bias is None else bias.detach()
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].detach()
                z, tanh = project(h, w, b, tf, keep_tanh=True)
                g = _dlogp_dz(z, z.logsumexp(-1), targets[s:s + chunk], tanh, tf).mul_(g_logps[s:s + chunk, None])
                if need_w:
                    gw.addmm_(g.t(), h.float())                      # (V, H) += (V, c) @ (c, H)
                if need_b:
                    gb += g.sum(0)
            grad_w = gw.to(weight.dtype) if need_w else None
            grad_b = gb.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def sequence_sums(values: Tensor, seq_index: Tensor, n_seq: int) -> Tensor:
    """(n_seq,) sums of per-token `values` (N,) grouped by `seq_index` (N,) long (differentiable)."""
    return values.new_zeros(n_seq).index_add(0, seq_index, values)


# --- the losses: pure functions of per-sequence log-probs, one row per pair (or example)


@dataclass
class PrefOut:
    losses: Tensor
    """(n,) per pair (KTO: per example), to be summed and divided by the step's pairs."""
    chosen_rewards: Tensor
    """(n,) detached implicit reward of the chosen answer (KTO: of desirable rows, NaN elsewhere)."""
    rejected_rewards: Tensor
    """(n,) detached implicit reward of the rejected answer (KTO: of undesirable rows, NaN elsewhere)."""


def _smoothed(x: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log s(x) - eps log s(-x): the conservative (cDPO) form; eps = 0 is plain."""
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> PrefOut:
    """DPO (Rafailov et al. 2023, eq. 7). All inputs (n,) summed completion log-probs."""
    rc, rr = chosen - ref_chosen, rejected - ref_rejected
    losses = _smoothed(beta * (rc - rr), label_smoothing)
    return PrefOut(losses, beta * rc.detach(), beta * rr.detach())


def ipo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             len_chosen: Tensor, len_rejected: Tensor, beta: float = 0.1) -> PrefOut:
    """IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL computes it (lengths (n,))."""
    rc, rr = chosen - ref_chosen, rejected - ref_rejected
    delta = rc / len_chosen.clamp(min=1) - rr / len_rejected.clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return PrefOut(losses, beta * rc.detach(), beta * rr.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(mean_chosen: Tensor, mean_rejected: Tensor, lam: float = 0.1) -> PrefOut:
    """ORPO (Hong et al. 2024, eqs. 4-7): NLL of the chosen answer + lam x odds-ratio term.

    mean_*: (n,) mean per-token log-probs of each completion. The NLL is per pair (mean over the
    chosen answer's tokens), so the loss stays a sum over pairs. Rewards = lam x mean log-prob.
    """
    log_odds = (mean_chosen - mean_rejected) - (_log1mexp(mean_chosen) - _log1mexp(mean_rejected))
    losses = -mean_chosen - lam * F.logsigmoid(log_odds)
    return PrefOut(losses, lam * mean_chosen.detach(), lam * mean_rejected.detach())


def simpo_loss(mean_chosen: Tensor, mean_rejected: Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> PrefOut:
    """SimPO (Meng et al. 2024, eq. 6): length-normalised, a target margin gamma, no reference."""
    losses = _smoothed(beta * (mean_chosen - mean_rejected) - gamma, label_smoothing)
    return PrefOut(losses, beta * mean_chosen.detach(), beta * mean_rejected.detach())


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0: mean of pi - ref over mismatched (prompt, completion) pairs,
    clamped at 0 and detached (TRL's estimate). Inputs (m,); returns a scalar."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PrefOut:
    """KTO (Ethayarajh et al. 2024, eq. 7). logps, ref_logps: (n,); desirable: (n,) bool; kl: scalar."""
    r = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    reward = beta * r.detach()
    nan = torch.full_like(reward, float("nan"))
    return PrefOut(losses, torch.where(desirable, reward, nan), torch.where(desirable, nan, reward))
