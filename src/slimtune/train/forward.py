"""From a batch to the loss, without full-vocabulary logits for the batch.

The model is run for its final hidden states (a hook on the decoder; the LM head is asked for
one position only), the positions that are trained are picked, and `losses.chunked_loss`
applies the output layer chunk by chunk, with every transform the model's head applies after it
(`Head`). `check_head` compares that path with the model's own logits once at start-up, so a head
we do not know is refused instead of trained wrongly. Train and eval share this path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import CHUNK_SIZE, LossCfg
from ..data.render import IGNORE
from ..errors import ConfigError
from ..losses.sft import LossOut, chunked_loss
from ..methods import adapters_disabled, base_of
from ..utils import eval_mode


def decoder_of(model):
    base = base_of(model)
    get = getattr(base, "get_decoder", None)
    dec = get() if get else None
    return dec if dec is not None else base.model


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H) aligned with batch['input_ids'] (B, T).

    Soft-prompt positions that prompt tuning prepends are cut off.
    """
    captured = {}

    def hook(_mod, _args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    handle = decoder_of(model).register_forward_hook(hook)
    try:
        kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        model(**kw, use_cache=False, logits_to_keep=1)  # the LM head on one position: cheap
    finally:
        handle.remove()
    h = captured["h"]
    extra = h.shape[1] - batch["input_ids"].shape[1]  # soft-prompt positions (0 with adapters off)
    return h[:, extra:] if extra else h


@dataclass
class Head:
    """The output layer and what the model does to its logits afterwards:
    logits = softcap * tanh((hidden @ weight.T + bias) * scale / softcap)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float | None = None
    softcap: float | None = None

    def kwargs(self) -> dict:
        return dict(bias=self.bias, logit_scale=self.scale, logit_softcap=self.softcap)


def output_layer(model) -> Head:
    """The LM head with the logit transforms known from the model's config: Gemma 2's
    `final_logit_softcapping`, Cohere's `logit_scale` (multiplies), Granite's `logits_scaling`
    (divides). Anything else a model does is caught by `check_head`."""
    base = base_of(model)
    head = base.get_output_embeddings()
    cfg = base.config
    scale = getattr(cfg, "logit_scale", None)
    if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):
        scale = (scale or 1.0) / cfg.logits_scaling
    return Head(head.weight, head.bias, None if scale in (None, 1, 1.0) else float(scale),
                getattr(cfg, "final_logit_softcapping", None))


@dataclass(frozen=True)
class KLTerm:
    """The KL-to-base part of a loss: weight (lambda now; 0 = measured, not trained) and how."""

    weight: float
    temperature: float
    direction: str
    jsd_beta: float
    positions: str
    last_n: int

    @classmethod
    def from_cfg(cls, cfg: LossCfg, weight: float) -> KLTerm:
        return cls(weight, cfg.kl_temperature, cfg.kl_direction, cfg.jsd_beta, cfg.kl_positions, cfg.kl_last_n)

    @classmethod
    def metric(cls) -> KLTerm:
        """What evaluation reports whatever the training objective: forward KL, tau 1, trained tokens
        (loss.* defaults, measured with weight 0)."""
        return cls.from_cfg(LossCfg(), 0.0)


def example_ids(batch: dict) -> torch.Tensor:
    """(B, T) long: which example each token belongs to (1, 2, ... within a row), 0 for padding.

    Packed rows carry `example_ids` from collate; padded rows have one example per row.
    """
    if "example_ids" in batch:
        return batch["example_ids"]
    if "attention_mask" in batch:
        return batch["attention_mask"].long()
    return torch.ones_like(batch["input_ids"])


def kl_positions(batch: dict, targets: torch.Tensor, term: KLTerm) -> torch.Tensor:
    """(B, T-1) bool: which shifted positions carry the KL term.

    trained: the trained targets; all: every position whose next token is a real token of the
    same example; last_n: the last n of those in each example (packed rows: of each example).
    """
    trained = targets != IGNORE
    if term.positions == "trained":
        return trained
    seg = example_ids(batch)
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)   # position t predicts t+1, same example
    if term.positions == "all":
        return valid
    count = valid.long().cumsum(-1)                            # valid positions so far in the row
    nseg = int(seg.max()) + 1
    # count at each example's last valid position: the running count's maximum within the example
    end = torch.zeros(seg.shape[0], nseg, dtype=count.dtype, device=count.device)
    end.scatter_reduce_(1, seg[:, :-1], count, reduce="amax")
    from_end = end.gather(1, seg[:, :-1]) - count + 1          # 1 at an example's last valid position
    return valid & (from_end <= term.last_n)


def batch_loss(model, batch: dict, kl: KLTerm | None = None, normaliser: float | None = None,
               ref_model=None, ref_cache: dict | None = None, key=None, chunk_size: int = CHUNK_SIZE) -> LossOut:
    """CE (+ kl.weight x KL to the base) over the batch's trained tokens; `kl=None`: CE only.

    The reference is the same model with adapters switched off, or `ref_model` (full fine-tuning).
    A KLTerm with weight 0 measures the KL without training on it. The base never changes, so
    evaluation passes `ref_cache` (a dict) and a `key` per batch: the base's hidden states at the
    selected positions are computed once and reused at every later evaluation.
    """
    targets = batch["labels"][:, 1:]
    sel = targets != IGNORE
    head = output_layer(model)
    kw = {}
    if kl is not None:
        kmask = kl_positions(batch, targets, kl)
        sel = sel | kmask
        # The base runs first, while no autograd graph is held, so its activations never add to
        # the tuned forward's peak.
        kw = dict(ref_hidden=reference_at(model, batch, sel, ref_model, ref_cache, key),
                  **reference_head(model, ref_model), kl_mask=kmask[sel], kl_lambda=kl.weight,
                  temperature=kl.temperature, direction=kl.direction, jsd_beta=kl.jsd_beta)
        chunk_size = chunk_with_reference(chunk_size)
    h = hidden_states(model, batch)[:, :-1]  # position t predicts token t+1
    return chunked_loss(h[sel], head.weight, targets[sel], normaliser=normaliser, chunk_size=chunk_size,
                        **head.kwargs(), **kw)


def reference_states(model, batch: dict, kl: KLTerm, ref_model=None) -> torch.Tensor:
    """(N, H) the base's hidden states at the positions `batch_loss` scores with this KL term
    (trained targets and KL positions, in row-major order): what its `ref_cache` holds per batch."""
    targets = batch["labels"][:, 1:]
    return reference_at(model, batch, (targets != IGNORE) | kl_positions(batch, targets, kl), ref_model)


def reference_at(model, batch: dict, sel: torch.Tensor, ref_model=None, ref_cache: dict | None = None,
                 key=None) -> torch.Tensor:
    """(N, H) the base's hidden states at the shifted positions `sel` (B, T-1), no grad; with a
    `ref_cache` dict, computed once per `key` (the base never changes) and read back after. The one
    reference cache of every objective (SFT's KL, the preference objectives' reference log-probs)."""
    if ref_cache is not None and key in ref_cache:
        return ref_cache[key]
    h = base_hidden(model, batch, ref_model)[:, :-1][sel]
    if ref_cache is not None:
        ref_cache[key] = h
    return h


def reference_head(model, ref_model=None) -> dict:
    """ref_weight / ref_bias for the losses: the reference's output layer, detached."""
    head = output_layer(ref_model if ref_model is not None else model)
    return {"ref_weight": head.weight.detach(), "ref_bias": None if head.bias is None else head.bias.detach()}


def chunk_with_reference(chunk_size: int) -> int:
    """The chunk of rows when the base's logits are built too: they double the (chunk, V) fp32
    buffers, so half the rows keep the same peak."""
    return max(1, chunk_size // 2)


@torch.no_grad()
def base_hidden(model, batch: dict, ref_model=None) -> torch.Tensor:
    """(B, T, H) hidden states of the base: `ref_model`, or `model` with its adapters switched off."""
    if ref_model is not None:
        return hidden_states(ref_model, batch)
    with adapters_disabled(model):
        return hidden_states(model, batch)


@torch.no_grad()
def check_head(model, batch: dict, rtol: float = 1e-3) -> tuple[float, float]:
    """Compare the chunked loss with the model's own logits on `batch` (a small slice); raise a
    ConfigError if they differ. Returns (ours, the model's) mean CE per trained token.

    Our loss rebuilds logits from the final hidden states and `output_layer`; a model whose head
    does something else (an unknown scaling, a bias we miss, a non-standard decoder output) would
    otherwise train on a wrong loss in silence.
    """
    with eval_mode(model):
        ours = batch_loss(model, batch, normaliser=1.0)
        kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**kw, use_cache=False).logits[:, -batch["input_ids"].shape[1]:][:, :-1]
    targets = batch["labels"][:, 1:]
    theirs = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), targets.flatten(),
                                               ignore_index=IGNORE, reduction="sum")
    n = max(1, ours.n_tokens)
    a, b = float(ours.ce_sum) / n, float(theirs) / n
    if not math.isfinite(a) or abs(a - b) > rtol * max(1.0, abs(b)):
        name = type(base_of(model)).__name__
        raise ConfigError(f"{name}: slimtune's chunked loss ({a:.6f}) differs from the model's own logits "
                          f"({b:.6f}) on the first batch; this architecture transforms its logits in a way "
                          "slimtune does not know, so it refuses to train on a wrong loss. Please report it.")
    return a, b
