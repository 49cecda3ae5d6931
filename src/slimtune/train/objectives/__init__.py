"""The objectives, one module per family; `specs.SPECS` says what the rest of slimtune knows of each.

    base.py    Objective (the loop's contract) and StepOut
    sft.py     sft, kl_sft
    paired.py  dpo, ipo, orpo, simpo (and `score`: completion log-probs in chunks)
    kto.py     kto
    distill.py distill (from a teacher model, a stored top k, or the base shown a context)
    grpo.py    grpo (completions sampled each step, verifiable rewards)
"""

from __future__ import annotations

from ...specs import SPECS, spec_for
from . import distill, grpo, kto, paired, sft
from .base import Objective, StepOut

OBJECTIVES: dict[str, type[Objective]] = {**sft.OBJECTIVES, **paired.OBJECTIVES, **kto.OBJECTIVES,
                                         **distill.OBJECTIVES, **grpo.OBJECTIVES}
assert OBJECTIVES.keys() == SPECS.keys(), "every spec row has its objective, and no objective lacks a row"


def make_objective(cfg) -> Objective:
    """The objective `cfg.loss.objective` names; `sft` with `loss.kl_lambda > 0` is KL-anchored SFT."""
    return OBJECTIVES[spec_for(cfg.loss.objective, cfg.loss.kl_lambda).name](cfg)


__all__ = ["OBJECTIVES", "Objective", "StepOut", "make_objective"]
