"""GRPO and its variants (Dr. GRPO, DAPO, BNPO): group advantages and the clipped policy loss.

Pure functions of per-token log-probs at completion positions, (N, T) with N = B prompts x G
completions, right-padded; `mask` (N, T) marks the tokens that count. The numbers are TRL 1.16's
GRPOTrainer (`_generate_and_score_completions` for the advantages, `_compute_loss` for the loss,
importance_sampling_level "token"), checked against it in tests/losses/test_grpo.py.

    A_i    = (r_i - mean_group(r)) / (std + 1e-4)     std: the group's, the batch's, or none (no division)
    ratio  = exp(logp - old_logp)                      per token; old = logp.detach() on-policy
    l_t    = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta kl_t
    kl_t   = (exp(ref - logp) - (ref - logp) - 1) x ratio    k3 estimator, times the ratio (TRL's
                                                             use_bias_correction_kl, on by default)
    grpo     mean over sequences of (sum_t l_t m_t / sum_t m_t)       (Shao et al. 2024, eq. 3)
    bnpo     sum l m / sum m over this micro-batch
    dr_grpo  sum l m / (N x max_completion_length)                  (Liu et al. 2025, "Dr. GRPO")
    dapo     sum l m / num_items, num_items = the completion tokens of the whole generation batch
             (every micro-batch and rank), so micro-batch losses add up to one token mean (Yu et al. 2025)

With gradient accumulation TRL divides grpo, bnpo and dr_grpo by the accumulation steps; dapo is
already divided by the whole batch's tokens and is only summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL adds this to the std before dividing


def _std(x: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std (as TRL's nanstd); NaN for a single value."""
    return x.std(dim=dim, unbiased=True) if dim is not None else x.std(unbiased=True)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group") -> Tensor:
    """Advantages (B*G,) from rewards (B*G,), the G completions of each prompt adjacent.

    Each reward minus its group's mean; divided by the group's std + 1e-4 ("group"), by the std
    of all B*G rewards + 1e-4 ("batch"), or not divided ("none"). A group whose rewards are all
    equal gets advantage 0 (no signal). G = 1 has no baseline: its advantage is 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards (B*G,) with G = {group_size} expected, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)                          # (B, G)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = _std(grouped, 1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    else:
        std = _std(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return centred / (std + STD_EPS)


def no_signal_share(rewards: Tensor, group_size: int) -> float:
    """Share of the B groups (rewards (B*G,)) whose G rewards are all equal: zero advantage, no gradient."""
    grouped = rewards.view(-1, group_size)
    return float((grouped == grouped[:, :1]).all(1).float().mean())


def completion_mask(completion_ids: Tensor, eot_ids, mask_truncated: bool = False) -> tuple[Tensor, Tensor]:
    """(mask (N, T) long, ended (N,) bool) for generated `completion_ids` (N, T).

    mask keeps every token up to and including the first end-of-turn id (any of `eot_ids`), and
    drops what follows (padding, or tokens generated past the end). ended: the row has an
    end-of-turn token. `mask_truncated` also drops every token of a row that never ended (cut by
    max_new_tokens), so a truncated answer is neither rewarded nor punished.
    """
    is_eot = torch.isin(completion_ids, torch.as_tensor(list(eot_ids), device=completion_ids.device))
    ended = is_eot.any(1)
    first = torch.where(ended, is_eot.int().argmax(1), completion_ids.shape[1])   # (N,)
    pos = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (pos[None, :] <= first[:, None]).long()
    if mask_truncated:
        mask = mask * ended[:, None].long()
    return mask, ended


@dataclass
class GRPOOut:
    loss: Tensor
    """Scalar, differentiable through logps (see the module docstring for each loss_type's divisor)."""
    kl: float
    """Mean per-token KL estimate (k3 x ratio) over masked tokens; 0.0 with beta = 0 (TRL logs none)."""
    clip_low: float
    """Share of masked tokens with ratio < 1 - eps_low and A < 0 (the clip is active)."""
    clip_high: float
    """Share with ratio > 1 + eps_high and A > 0."""
    clip_region: float
    """Share of either."""
    clip_low_min: float
    """Smallest per-sequence share of low-clipped tokens (TRL's clip_ratio/low_min)."""
    clip_high_max: float
    """Largest per-sequence share of high-clipped tokens (TRL's clip_ratio/high_max)."""
    tokens: int
    """Masked tokens in this micro-batch."""


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def _seq_means(x: Tensor, mask: Tensor) -> Tensor:
    """(N,) per-sequence masked mean; NaN for a row with no tokens (ignored by min / max)."""
    return (x * mask).sum(-1) / mask.sum(-1)


def grpo_loss(logps: Tensor, old_logps: Tensor | None, advantages: Tensor, mask: Tensor,
              ref_logps: Tensor | None = None, *, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo",
              max_completion_length: int | None = None, num_items: float | Tensor | None = None,
              bias_correction_kl: bool = True) -> GRPOOut:
    """The clipped policy-gradient loss of one micro-batch.

    logps (N, T): log pi(token) under the policy being trained (differentiable).
    old_logps (N, T): log-probs when the completions were sampled (no grad); None = on-policy
        (old = logps.detach(): ratio 1 in value, its gradient is the policy gradient).
    advantages (N,); mask (N, T) 0/1; ref_logps (N, T) the reference's log-probs, needed when beta > 0.
    epsilon_high: None = epsilon_low (symmetric clip); DAPO's clip-higher uses e.g. 0.28.
    max_completion_length: dr_grpo's constant divisor (the generation's max_new_tokens).
    num_items: dapo's divisor, the completion tokens of the whole generation batch; None = mask.sum().
    bias_correction_kl: multiply the KL estimate by the ratio (TRL's default).
    Defaults are TRL 1.16's GRPOConfig: loss_type "dapo", beta 0, epsilon 0.2.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logps.dim() != 2 or mask.shape != logps.shape or advantages.shape != logps.shape[:1]:
        raise ValueError(f"logps and mask (N, T), advantages (N,) expected, got {tuple(logps.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("dr_grpo needs max_completion_length")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.to(logps.dtype)[:, None]                       # (N, 1)
    ratio = torch.exp(logps - old)                                   # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1                                    # k3: unbiased, >= 0
        if bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    else:
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logps.dtype)
        loss = (per_token * mask).sum() / n.clamp(min=1.0)

    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        region = torch.maximum(low, high)
        low_seq, high_seq = _seq_means(low, mask), _seq_means(high, mask)
        return GRPOOut(
            loss=loss, kl=0.0 if kl is None else _masked_mean(kl, mask),
            clip_low=_masked_mean(low, mask), clip_high=_masked_mean(high, mask),
            clip_region=_masked_mean(region, mask),
            clip_low_min=_ignoring_nan(torch.min, low_seq), clip_high_max=_ignoring_nan(torch.max, high_seq),
            tokens=int(mask.sum()))


def _ignoring_nan(reduce, x: Tensor) -> float:
    """reduce(x) over its non-NaN values; NaN when there are none (TRL's nanmin / nanmax)."""
    x = x[~x.isnan()]
    return float(reduce(x)) if x.numel() else float("nan")
