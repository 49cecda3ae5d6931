"""Chunked CE and KL-to-base from hidden states at the trained positions.

The loop gathers the final hidden states at the positions that are trained, already shifted
(hidden at position t predicts token t+1), so the loss sees `hidden: (N, H)`, `targets: (N,)`.
The output projection `weight: (V, H)` is applied here, `chunk_size` rows at a time. Forward
computes each chunk's loss AND its gradients (Liger's "fused linear cross entropy" idea), so
full (N, V) logits never exist and backward only rescales the stored gradients.

    loss = (sum_i CE_i + kl_lambda * sum_j KL_j) / normaliser

KL rows j come from the base model (adapters off, no_grad): `ref_hidden @ ref_weight.T`.
With a teacher's hidden states and output matrix as the reference this is online distillation
(losses/distill.py says how); the helpers below the autograd function are shared with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import CHUNK_SIZE
from ..data.render import IGNORE  # one definition: the label of untrained positions
from .head import (check_shapes, head_backward, head_grad_buffers, matmul_dtype, project, run_chunks,
                   scale_stored_grads, tempered_log_softmax)

DIRECTIONS = ("forward", "reverse", "jsd")


@dataclass
class LossOut:
    loss: Tensor
    """Scalar to backward: (ce_sum + kl_lambda * kl_sum) / normaliser."""
    ce_sum: Tensor
    """Detached fp32 scalar: CE summed over the rows with a target (!= -100)."""
    kl_sum: Tensor
    """Detached fp32 scalar: tau^2 * KL summed over the KL rows (0 when there are none)."""
    n_tokens: int
    """Rows with a target (CE-trained); N when no target is -100."""
    n_kl_tokens: int
    """Rows that got a KL term."""


def token_kl(p_logits: Tensor, q_logits: Tensor, direction: str = "forward",
             temperature: float = 1.0, jsd_beta: float = 0.5) -> Tensor:
    """Per-row divergence between base logits `p_logits` and tuned logits `q_logits`, both (N, V).

    Both are softened by `temperature` tau: p = softmax(p_logits / tau), q = softmax(q_logits / tau),
    and the result is multiplied by tau^2 (Hinton et al. 2015) so gradients keep their scale.
      forward: KL(p || q) = sum_v p (log p - log q)      (base || tuned, mass-covering)
      reverse: KL(q || p) = sum_v q (log q - log p)      (tuned || base, mode-seeking)
      jsd:     beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q
               (TRL GKD's generalised JSD with p the teacher; beta = jsd_beta in (0, 1)).
    Returns (N,) fp32 (fp64 for fp64 input). Differentiable through both arguments (plain autograd).

    Against TRL (tests/losses/test_distill.py pins it to 1e-5): with p = teacher, q = student,
    `GKDTrainer.generalized_jsd_loss(q_logits, p_logits, labels, beta, temperature, "batchmean")`
    is the mean over rows with labels != -100 of token_kl(...) / tau^2 for
      beta = 0 -> forward, beta = 1 -> reverse, 0 < beta < 1 -> jsd with jsd_beta = beta.
    TRL divides logits by tau but does not multiply by tau^2; its beta = 0 and 1 are special
    cases (its JSD tends to 0, not to a KL, at either end). Its "batchmean" without labels divides
    by the first dimension only; its "mean" also divides by V.
    """
    logp = tempered_log_softmax(p_logits, temperature)
    logq = tempered_log_softmax(q_logits, temperature)
    kl, _ = kl_terms(logp, logq, direction, jsd_beta, want_grad=False)
    return kl * temperature**2


def chunked_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                 normaliser: float | int | Tensor | None = None, ref_hidden: Tensor | None = None,
                 ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                 kl_mask: Tensor | None = None, kl_lambda: float = 0.0, temperature: float = 1.0,
                 direction: str = "forward", jsd_beta: float = 0.5, chunk_size: int = CHUNK_SIZE,
                 logit_softcap: float | None = None, logit_scale: float | None = None) -> LossOut:
    """CE (+ KL to the base) over N rows without building (N, V) logits.

    hidden: (N, H) tuned final hidden states (fp32 or bf16); weight: (V, H), bias: (V,) or None.
    targets: (N,) long, -100 = no CE on that row. ref_hidden: (N, H) base hidden states (treated as
    constant; a teacher of another width: (N, H_ref) with its own ref_weight (V, H_ref)); ref_weight
    defaults to `weight` (and then ref_bias to `bias`). kl_mask: (N,) bool,
    rows that get KL, default `targets != -100`. normaliser: divides CE and KL sums, default the
    number of CE rows (pass the whole accumulated batch's count for gradient accumulation).
    Softmax math is fp32 in chunks of `chunk_size` rows; grads come back in the input dtypes.
    `weight`/`bias` grads are computed only when they require grad (frozen in LoRA: skipped).
    With kl_lambda == 0 the KL is still reported (kl_sum) but adds nothing to loss or grads.
    The head's output transforms, in the order models apply them: logits = (hidden @ weight.T + bias)
    * logit_scale (Cohere's logit_scale, Granite's 1 / logits_scaling), then logit_softcap * tanh(z /
    logit_softcap) (Gemma 2); both apply to the base's logits too.
    Peak extra memory: a few (chunk_size, V) fp32 buffers (+ a (V, H) fp32 grad if weight trains).
    """
    _check(hidden, weight, targets, ref_hidden, kl_mask, direction, jsd_beta, temperature, chunk_size, ref_weight)
    targets = targets.to(hidden.device)
    n_ce = int((targets != IGNORE).sum())
    if ref_hidden is None:
        if kl_lambda:
            raise ValueError("kl_lambda > 0 needs ref_hidden (the base model's hidden states)")
        kl_mask = None
    elif kl_mask is None:
        kl_mask = targets != IGNORE
    n_kl = int(kl_mask.sum()) if kl_mask is not None else 0
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias
    norm = float(normaliser) if normaliser is not None else float(max(n_ce, 1))
    track = torch.is_grad_enabled()  # ctx.needs_input_grad ignores no_grad, so decide here
    needs = tuple(track and t is not None and t.requires_grad for t in (hidden, weight, bias))
    opts = (float(kl_lambda), float(temperature), direction, float(jsd_beta), int(chunk_size),
            (logit_scale, logit_softcap), norm, needs)
    loss, ce_sum, kl_sum = _ChunkedLoss.apply(hidden, weight, bias, targets, ref_hidden, ref_weight,
                                              ref_bias, kl_mask, opts)
    return LossOut(loss, ce_sum, kl_sum, n_ce, n_kl)


def reference_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                   normaliser: float | int | Tensor | None = None, ref_hidden: Tensor | None = None,
                   ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                   kl_mask: Tensor | None = None, kl_lambda: float = 0.0, temperature: float = 1.0,
                   direction: str = "forward", jsd_beta: float = 0.5, chunk_size: int = CHUNK_SIZE,
                   logit_softcap: float | None = None, logit_scale: float | None = None) -> LossOut:
    """The naive path: full (N, V) logits and plain autograd. Same arguments and result as
    `chunked_loss` (chunk_size is ignored); used by tests and benchmarks."""
    _check(hidden, weight, targets, ref_hidden, kl_mask, direction, jsd_beta, temperature, chunk_size, ref_weight)
    targets = targets.to(hidden.device)
    n_ce = int((targets != IGNORE).sum())
    norm = float(normaliser) if normaliser is not None else float(max(n_ce, 1))
    logits = project(hidden, weight, bias, (logit_scale, logit_softcap))  # (N, V) fp32
    ce_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    kl_sum, n_kl = logits.new_zeros(()), 0
    if ref_hidden is not None:
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias
        if kl_mask is None:
            kl_mask = targets != IGNORE
        with torch.no_grad():
            ref_logits = project(ref_hidden, ref_weight, ref_bias, (logit_scale, logit_softcap))
        kl_sum = token_kl(ref_logits[kl_mask], logits[kl_mask], direction, temperature, jsd_beta).sum()
        n_kl = int(kl_mask.sum())
    elif kl_lambda:
        raise ValueError("kl_lambda > 0 needs ref_hidden (the base model's hidden states)")
    loss = (ce_sum + kl_lambda * kl_sum) / norm if kl_lambda else ce_sum / norm
    return LossOut(loss, ce_sum.detach(), kl_sum.detach(), n_ce, n_kl)


class _ChunkedLoss(torch.autograd.Function):
    """Forward walks the chunks computing loss and grads; backward scales the stored grads."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, kl_mask, opts):
        lam, tau, direction, beta, chunk, transform, norm, (need_h, need_w, need_b) = opts
        v = weight.shape[0]
        w = weight.detach().to(matmul_dtype(hidden))  # once (autocast's dtype under autocast)
        b = None if bias is None else bias.detach().to(matmul_dtype(hidden))
        rw = rb = None
        if ref_hidden is not None:
            ref_hidden = ref_hidden.detach()
            rw = ref_weight.detach().to(matmul_dtype(ref_hidden))
            rb = None if ref_bias is None else ref_bias.detach().to(matmul_dtype(ref_hidden))
        grads = head_grad_buffers(hidden, v, need_h, need_w, need_b)
        any_grad = need_h or need_w or need_b
        kl_grad = any_grad and ref_hidden is not None and lam != 0.0

        def one(s, e, h):
            rh = None if ref_hidden is None else ref_hidden[s:e]
            m = None if kl_mask is None else kl_mask[s:e]
            return _chunk(h, w, b, targets[s:e], rh, rw, rb, m, lam, tau, direction, beta, transform, norm,
                          any_grad, kl_grad)

        ce_sum, kl_sum = run_chunks(ctx, hidden, weight, bias, w, chunk, grads, one)
        loss = (ce_sum + lam * kl_sum) / norm if lam else ce_sum / norm
        return loss, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        return (*scale_stored_grads(ctx, grad_loss), None, None, None, None, None, None)


def _chunk(h, w, b, t, rh, rw, rb, m, lam, tau, direction, beta, transform, norm, want_grad, kl_grad):
    """One chunk of c rows: (ce sum, tau^2 * kl sum, d loss / d logits (c, V) fp32 or None).

    A function of its own so its (c, V) buffers are freed before the next chunk allocates.
    """
    valid = t != IGNORE                                               # (c,)
    z, tanh_z = project(h, w, b, transform, keep_tanh=True)          # (c, V) fp32
    logq1 = z.log_softmax(-1)                                         # CE uses tau = 1
    tgt = t.clamp_min(0)[:, None]                                     # (c, 1)
    ce = -(logq1.gather(1, tgt).squeeze(1) * valid).sum()
    kl, g_kl = torch.zeros((), device=h.device), None
    if rh is not None:
        logp = tempered_log_softmax(project(rh, rw, rb, transform), tau)  # base, (c, V)
        logq = logq1 if tau == 1.0 else tempered_log_softmax(z, tau)
        del z
        kl_rows, g_kl = kl_terms(logp, logq, direction, beta, want_grad=kl_grad)
        del logp, logq
        kl = (kl_rows * m).sum() * tau**2
    else:
        del z
    if not want_grad:
        return ce, kl, None
    # d CE / d z = softmax(z) - onehot(target), on rows with a target
    g = logq1.exp_()                                                  # reuses the buffer
    g.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=g.dtype))
    g.mul_(valid[:, None])
    if kl_grad:  # d (tau^2 KL(z / tau)) / d z = tau * (d KL / d (z / tau))
        g.add_(g_kl.mul_((m * (lam * tau))[:, None]))
        del g_kl
    g.div_(norm)
    return ce, kl, head_backward(g, tanh_z, transform)


def kl_terms(logp: Tensor, logq: Tensor, direction: str, beta: float, want_grad: bool):
    """Per-row divergence of base log-probs `logp` and tuned `logq`, both (c, C) over any C
    categories (the vocabulary here; a teacher's top k + a tail bucket in losses/distill.py).

    Returns (kl (c,), grad (c, C) of kl w.r.t. the tuned logits y with logq = log_softmax(y), or
    None). Entries need logp > -inf (0 * -inf is NaN): callers floor zero probabilities.
    """
    grad = None
    if direction == "forward":       # KL(p||q); d/dz = q - p
        p = logp.exp()
        kl = torch.sub(logp, logq).mul_(p).sum(-1)
        if want_grad:
            grad = logq.exp().sub_(p)
    elif direction == "reverse":     # KL(q||p); d/dz = q * (log q - log p - KL)
        q = logq.exp()
        d = logq - logp
        kl = (d * q).sum(-1)
        if want_grad:
            grad = d.sub_(kl[:, None]).mul_(q)
    else:                            # d JSD / d q_v = (1 - beta) log(q_v / m_v), then softmax
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        kl_p = torch.sub(logp, logm).mul_(logp.exp()).sum(-1)
        q = logq.exp()
        d = logq - logm
        kl_q = (d * q).sum(-1)
        kl = beta * kl_p + (1 - beta) * kl_q
        if want_grad:
            grad = d.sub_(kl_q[:, None]).mul_(q).mul_(1 - beta)
    return kl, grad


def _check(hidden, weight, targets, ref_hidden, kl_mask, direction, jsd_beta, temperature, chunk, ref_weight=None):
    check_shapes(hidden, weight, targets, ref_hidden, ref_weight)
    n = hidden.shape[0]
    if kl_mask is not None and (kl_mask.shape != (n,) or kl_mask.dtype != torch.bool):
        raise ValueError(f"kl_mask must be a ({n},) bool tensor")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose one of: {', '.join(DIRECTIONS)}")
    if direction == "jsd" and not 0 < jsd_beta < 1:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
    if temperature <= 0 or chunk < 1:
        raise ValueError("temperature must be > 0 and chunk_size >= 1")
