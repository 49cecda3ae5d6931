"""`method.layers: auto:K`: put the adapter on the K layers where it matters most, measured.

The measure: put the configured adapter on every layer, run the objective on the first
`method.auto_layers_batches` training batches at initialisation (no update), and score each layer
by the gradient norm of the loss with respect to that layer's adapter parameters,

    score_l = || d loss / d theta_l ||_2,   theta_l = the adapter parameters of layer l

that is, how fast the loss falls per unit of change in that layer's adapter (a first-order
sensitivity, as in gradient-based importance for pruning). The K layers with the largest scores
are kept; the probe adapter is removed and the real one built on those layers. The choice and
every score are written to RUN/layer_choice.json.
"""

from __future__ import annotations

import dataclasses
import re

from ..errors import ConfigError
from ..methods import apply_method, method_of

AUTO = re.compile(r"auto:(\d+)")


def auto_k(spec) -> int | None:
    """K for 'auto:K', None for any other layers spec."""
    m = AUTO.fullmatch(str(spec).strip()) if isinstance(spec, str) else None
    return int(m.group(1)) if m else None


def layer_scores(model, cfg, objective, rows: list[dict], pad_id: int, tokenizer_path=None) -> dict[int, float]:
    """{layer: adapter gradient norm} over the first batches of `rows` (see the module doc).

    `model` is the plain base; it is left as it was (the probe adapter is unloaded).
    """

    method = method_of(cfg.method.name)
    if method.build is None or method.adds_positions:
        raise ConfigError(f"method.layers=auto:K needs an adapter on layers (lora, dora, rslora, qlora, ia3), "
                          f"not {cfg.method.name}")
    probe_cfg = dataclasses.replace(cfg.method, layers=None)
    peft_model = apply_method(model, probe_cfg, tokenizer_path)
    device = next(peft_model.parameters()).device
    n = cfg.method.auto_layers_batches * cfg.train.batch_size
    batches = [rows[i:i + cfg.train.batch_size] for i in range(0, min(n, len(rows)), cfg.train.batch_size)]
    units = sum(objective.units(b) for b in batches)
    peft_model.train()
    for b in batches:
        batch = {k: v.to(device) for k, v in objective.collate(b, pad_id).items()}
        objective(peft_model, batch, units, 0).loss.backward()
    sq: dict[int, float] = {}
    for name, p in peft_model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if p.requires_grad and m and p.grad is not None:
            sq[int(m.group(1))] = sq.get(int(m.group(1)), 0.0) + float(p.grad.double().pow(2).sum())
    peft_model.unload()  # the base modules back in place, the probe adapter gone
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return {layer: v ** 0.5 for layer, v in sorted(sq.items())}


def choose_layers(scores: dict[int, float], k: int) -> list[int]:
    """The k layers with the largest scores, in layer order."""
    if k < 1 or k > len(scores):
        raise ConfigError(f"method.layers=auto:{k}: choose 1 to {len(scores)} layers")
    return sorted(sorted(scores, key=lambda layer: -scores[layer])[:k])
