"""The output layer inside the losses, once: projection, logit transforms, shape checks, and the
chunk loop of losses that compute their gradients in forward.

    logits = transform(hidden @ weight.T + bias),  transform = (scale or None, cap or None):
             z * scale (Cohere's logit_scale, Granite's 1 / logits_scaling), then cap * tanh(z / cap)
             (Gemma 2's soft-cap), as the models apply them; computed in fp32 a chunk of rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_shapes(hidden: Tensor, weight: Tensor, targets: Tensor, ref_hidden: Tensor | None = None,
                 ref_weight: Tensor | None = None) -> None:
    """hidden (N, H), weight (V, H), targets (N,); ref_hidden (N, H_ref) with ref_weight (V, H_ref)
    (a teacher of another width brings its own output matrix; H_ref = H without one). ValueError
    otherwise."""
    n = hidden.shape[0]
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H) and weight (V, H) expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != (n,):
        raise ValueError(f"targets must be ({n},), got {tuple(targets.shape)}")
    ref_h = hidden.shape[1] if ref_weight is None else ref_weight.shape[1]
    if ref_hidden is not None and ref_hidden.shape != (n, ref_h):
        raise ValueError(f"ref_hidden {tuple(ref_hidden.shape)} must be ({n}, {ref_h}): a row per row of hidden, "
                         "as wide as ref_weight (or hidden)")
    if ref_weight is not None and ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has {ref_weight.shape[0]} rows, weight {weight.shape[0]}: one vocabulary")


def matmul_dtype(t: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in for input `t`: autocast's where it is on (it would cast
    both operands anyway), else `t`'s. A loss casts its weight to it once, not at every chunk."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def project(h: Tensor, w: Tensor, b: Tensor | None, transform: tuple, keep_tanh: bool = False):
    """(c, H) @ (V, H).T (+ b) in the input dtype (autocast's under autocast), then fp32 (c, V), times `scale`, soft-capped by `cap`
    (transform = (scale or None, cap or None))."""
    scale, cap = transform
    dt = matmul_dtype(h)
    z = F.linear(h.to(dt), w.to(dt), None if b is None else b.to(dt)).float()
    if scale is not None:
        z = z * scale
    tanh_z = None
    if cap is not None:
        if keep_tanh:
            tanh_z = (z / cap).tanh_()
            z = tanh_z * cap
        else:
            z = torch.tanh(z / cap) * cap
    return (z, tanh_z) if keep_tanh else z


def head_backward(g: Tensor, tanh_z: Tensor | None, transform: tuple) -> Tensor:
    """d loss / d (hidden @ weight.T + bias), in place, from g = d loss / d logits (c, V) fp32:
    back through the soft-cap (`tanh_z` as `project(..., keep_tanh=True)` returned it; overwritten)
    and the scale of `transform` = (scale or None, cap or None)."""
    scale, softcap = transform
    if softcap is not None:  # z = cap * tanh(s / cap): d z / d s = 1 - tanh^2
        g.mul_(1.0 - tanh_z.square_())
    if scale is not None:  # s = scale * raw
        g.mul_(scale)
    return g


def tempered_log_softmax(logits: Tensor, tau: float) -> Tensor:
    """log softmax(logits / tau) over the last dim, in fp32 at least (fp64 stays fp64)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return (x / tau).log_softmax(-1) if tau != 1.0 else x.log_softmax(-1)


def head_grad_buffers(hidden: Tensor, v: int, need_h: bool, need_w: bool, need_b: bool):
    """(grad_h (N, H) in hidden's dtype, grad_w (V, H) fp32, grad_b (V,) fp32), None where not needed."""
    return (torch.empty_like(hidden) if need_h else None,
            torch.zeros(v, hidden.shape[1], device=hidden.device) if need_w else None,
            torch.zeros(v, device=hidden.device) if need_b else None)


def add_head_grads(g: Tensor, h: Tensor, w: Tensor, s: int, grads: tuple) -> None:
    """Add rows s..s+c's share of d loss / d (hidden, weight, bias), from g = d loss / d logits (c, V)."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        grad_h[s:s + len(h)] = g.to(w.dtype) @ w                        # (c, H)
    if grad_w is not None:
        grad_w.addmm_(g.t(), h.float())                                 # (V, H) += (V, c) @ (c, H)
    if grad_b is not None:
        grad_b += g.sum(0)


def run_chunks(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, w: Tensor, chunk: int, grads: tuple,
               one) -> tuple[Tensor, Tensor]:
    """The chunk loop of a loss whose forward computes its gradients: `one(s, e, h)` gives rows
    s..e's (ce sum, divergence sum, d loss / d logits (c, V) or None); their head gradients are added
    to `grads` and saved on `ctx` for `scale_stored_grads`. Returns (ce sum, divergence sum)."""
    ce_sum = torch.zeros((), device=hidden.device)
    kl_sum = torch.zeros((), device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk].detach()                                  # (c, H)
        ce, kl, g = one(s, s + len(h), h)
        ce_sum += ce
        kl_sum += kl
        add_head_grads(g, h, w, s, grads)
        del g
    ctx.save_for_backward(*grads)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(ce_sum, kl_sum)
    return ce_sum, kl_sum


def scale_stored_grads(ctx, grad_loss: Tensor) -> list:
    """Backward of a loss whose forward stored its gradients (ctx.saved_tensors, ctx.dtypes): each
    times the incoming scalar gradient, in its input's dtype."""
    grads = []
    for g, dt in zip(ctx.saved_tensors, ctx.dtypes):
        if g is not None:
            g = g if torch.equal(grad_loss, torch.ones_like(grad_loss)) else g * grad_loss
            g = g.to(dt)
        grads.append(g)
    return grads
