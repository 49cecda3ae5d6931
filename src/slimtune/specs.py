"""The objectives, torch-free: what config, data, the loop and evaluation need to know of each.

    name     family (train/objectives/<module>.py)  rows       packable  reference  evaluation
    sft      sft                                    chats      yes       none       heldout
    kl_sft   sft                                    chats      yes       base       heldout
    dpo      paired                                 paired     no        base       preference
    ipo      paired                                 paired     no        base       preference
    orpo     paired                                 paired     no        none       preference
    simpo    paired                                 paired     no        none       preference
    kto      kto                                    unpaired   no        base       preference
    distill  distill                                chats      no        teacher    distill
    grpo     grpo                                   prompts    no        base       rl          generates

Everything outside an objective's own module reads these fields, never its name or class: config
validates names and packing, data reads the row kind, the loop and `slimtune eval` pick the
held-out measures. A new objective = one row here + one module in train/objectives/ + its
`loss.*` fields in config.py + tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    module: str
    """train/objectives/<module>.py defines it."""
    rows: str
    """The data rows it reads: chats (rendered, trained tokens marked), paired ({prompt, chosen,
    rejected}), unpaired ({prompt, completion, label}), prompts (a chat ending with a user turn, its
    other columns kept for the rewards)."""
    packable: bool
    """Rows may be packed into one sequence (data.packing)."""
    reference: str
    """none; base: the base model's outputs (adapters off, or a frozen copy for full FT); teacher:
    another model's (or the base's, shown a context) or a stored teacher's (the distill section). The
    objective may need it only for some settings (grpo: grpo.beta > 0; `Objective.uses_reference`)."""
    evaluation: str
    """heldout: loss, perplexity and KL on held-out chats (base states cached on disk);
    preference: held-out preference accuracy and rewards; distill: held-out CE of student and
    teacher, KL(teacher || student) and greedy next-token agreement; rl: held-out prompts' mean
    reward (greedy) and, in `slimtune eval`, the instruction-following pass rate base -> tuned."""
    generates: bool = False
    """Its training rows are made during each step from the current model (`begin_step`: sampled
    completions); the loop then counts the step's units after that, over all processes. An objective
    that generates only for some settings says so itself (`Objective.generates`: distill.on_policy)."""


SPECS: dict[str, ObjectiveSpec] = {s.name: s for s in (
    ObjectiveSpec("sft", "sft", "chats", True, "none", "heldout"),
    ObjectiveSpec("kl_sft", "sft", "chats", True, "base", "heldout"),
    ObjectiveSpec("dpo", "paired", "paired", False, "base", "preference"),
    ObjectiveSpec("ipo", "paired", "paired", False, "base", "preference"),
    ObjectiveSpec("orpo", "paired", "paired", False, "none", "preference"),
    ObjectiveSpec("simpo", "paired", "paired", False, "none", "preference"),
    ObjectiveSpec("kto", "kto", "unpaired", False, "base", "preference"),
    # not packable: a stored teacher is found by row, a context teacher's rows are rendered apart
    ObjectiveSpec("distill", "distill", "chats", False, "teacher", "distill"),
    ObjectiveSpec("grpo", "grpo", "prompts", False, "base", "rl", generates=True),
)}

CONFIG_NAMES = tuple(n for n in SPECS if n != "kl_sft")
"""What loss.objective accepts: kl_sft is sft with loss.kl_lambda > 0."""


@dataclass(frozen=True)
class MethodSpec:
    """One PEFT method as the rest of slimtune sees it (methods.py builds its PEFT config)."""

    name: str
    can_merge: bool = True
    """Folds into the base weights (`slimtune merge`, GGUF export, merged generation)."""
    adds_positions: bool = False
    """Prepends virtual tokens (prompt / prefix tuning): no packing, no merge."""
    four_bit: bool = False
    """Trains on a 4-bit (NF4) base."""
    reference_copy: bool = False
    """The base cannot be had by switching adapters off: a frozen copy is the reference (KL, DPO)."""


METHOD_SPECS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("lora"), MethodSpec("rslora"), MethodSpec("dora"), MethodSpec("qlora", four_bit=True),
    MethodSpec("ia3"),
    MethodSpec("prompt_tuning", can_merge=False, adds_positions=True),
    MethodSpec("prefix_tuning", can_merge=False, adds_positions=True),
    MethodSpec("full", reference_copy=True),
)}


def spec_for(objective: str, kl_lambda: float = 0.0) -> ObjectiveSpec:
    """The spec of `loss.objective` (sft with a KL weight is kl_sft)."""
    return SPECS["kl_sft" if objective == "sft" and kl_lambda > 0 else objective]
