"""Typed configs: the one source of defaults. YAML and `key=value` overrides only change them.

A config file mirrors these sections:

    model:  {name: smollm2-135m, dtype: float32}
    data:   {train: data.jsonl, max_length: 512}
    method: {name: lora, r: 16, targets: attn}
    loss:   {kl_lambda: 0.0}
    grpo:   {num_generations: 8, rewards: [{name: ifeval}]}   (loss.objective=grpo)
    train:  {lr: 2e-4, max_steps: 100}
    eval:   {every: 50}

Unknown keys and bad values fail here, before any model loads, listing the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .specs import CONFIG_NAMES, METHOD_SPECS, spec_for
from .utils import atomic_write_text

TARGETS = ("attn", "attn_mlp", "all_linear")
TRAIN_ON = ("assistant", "last", "all")
OPTIMIZERS = ("adamw", "adafactor", "lion", "schedulefree")
SCHEDULES = ("cosine", "linear", "constant")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes weights can be loaded or saved in (models.DTYPES maps them to torch dtypes)."""
DTYPES = WEIGHT_DTYPES + ("auto",)
"""model.dtype: a weight dtype, or what the checkpoint says."""
KL_DIRECTIONS = ("forward", "reverse", "jsd")
KL_POSITIONS = ("trained", "all", "last_n")
FORMATS = ("auto", "messages", "alpaca", "dolly", "sharegpt", "prompt_completion", "text")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_MODEL = "smollm2-135m"
"""The embedded SmolLM2-135M-Instruct (models.py): the model every command uses when none is named."""
CHUNK_SIZE = 1024
"""Rows of the output layer's logits computed at once in the chunked losses (loss.chunk_size)."""
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DISTILL_TAILS = ("bucket", "renorm")
TEACHER_DTYPES = ("auto", "4bit") + WEIGHT_DTYPES
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


@dataclass
class ModelCfg:
    name: str = DEFAULT_MODEL
    """Hub id, local HF folder, a .gguf file, or an embedded name (smollm2-135m)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 (CPU with AVX512-BF16/AMX, or CUDA), float16, auto."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless you trust the repo."""
    attn_implementation: str = "sdpa"
    """sdpa, eager, or flash_attention_2 (CUDA)."""
    chat_template: str | None = None
    """For base models without one: chatml, llama3, alpaca, zephyr, or a .jinja file. Replaces the
    tokenizer's template; saved with the run, so eval, chat, merge and export use it too."""

    def __post_init__(self):
        _choice("model.dtype", self.dtype, DTYPES)


@dataclass
class DataCfg:
    train: str | None = None
    """Training data: a .jsonl/.json(.gz/.zst), .parquet, .csv or .arrow file, a save_to_disk folder,
    hf:org/name, 'builtin:instructions', or several chat files as 'a.jsonl:3,b.jsonl:1' (weights)."""
    val: str | None = None
    """Held-out file. When empty, `val_fraction` of train is split off (seeded)."""
    val_fraction: float = 0.1
    """Share of data.train held out (seeded) when data.val is empty."""
    split_seed: int | None = None
    """Seeds the held-out split (and a weighted mix's draw of rows). Empty: train.seed. Set it to
    keep one held-out set while train.seed varies, e.g. to measure seed-to-seed noise."""
    format: str = "auto"
    """auto, messages (ChatML), alpaca, dolly, sharegpt, prompt_completion, text (raw text)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Our field -> the file's column, e.g. {instruction: question, output: answer} or
    {messages: conversation}; on the command line instruction=question,output=answer."""
    split: str | None = None
    """Split of a hf: dataset or a DatasetDict folder. Empty: train."""
    subset: str | None = None
    """Subset (config name) of a hf: dataset."""
    num_proc: int = 1
    """Processes that render and mask examples (datasets.map); 1 renders in this process."""
    cache: bool = True
    """Keep rendered examples on disk (<cache>/data), keyed by the file's content, tokenizer,
    template and these settings, so a second run and `eval` skip rendering."""
    system_prompt: str | None = None
    """Added to chats that have no system turn (formats without one: alpaca, dolly...)."""
    train_on: str = "assistant"
    """Which tokens are trained: every assistant turn, the last assistant turn, or all tokens."""
    train_reasoning: bool = True
    """Train an assistant turn's reasoning block (from `reasoning_content`/`thinking`, as the chat
    template writes it) with its answer; False masks it and trains only the answer + end of turn."""
    max_length: int = 512
    """Longer examples are truncated to this many tokens (labels stay aligned)."""
    drop_untrained: bool = True
    """Drop (and count) examples whose trained tokens were all truncated away; False raises."""
    max_examples: int | None = None
    """Use only the first N training examples (after shuffling)."""
    packing: bool | None = None
    """Pack several examples per row (position ids restart, no attention across examples).
    Empty: on for raw text (continued pre-training), off for chats."""
    group_by_length: bool = True
    """Batch examples of similar length together to waste little on padding."""
    general_prompts: str | None = "builtin:general_prompts"
    """Chats unrelated to the training data, for KL-to-base drift at evaluation. Empty: skip."""

    def __post_init__(self):
        _choice("data.format", self.format, FORMATS)
        _choice("data.train_on", self.train_on, TRAIN_ON)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be >= 1, got {self.num_proc}")
        self.columns = parse_columns(self.columns)

    def data_seed(self, train_seed: int) -> int:
        """The seed of the held-out split and of a mix's draw: split_seed, else train.seed."""
        return train_seed if self.split_seed is None else self.split_seed


@dataclass
class MethodCfg:
    name: str = "lora"
    """lora, dora, rslora, qlora, prompt_tuning, prefix_tuning, ia3, full (the table in methods.py)."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha / r (rslora: alpha / sqrt(r))."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: str | list[str] = "attn"
    """attn, attn_mlp, all_linear, or a list of module names (e.g. [q_proj, v_proj])."""
    layers: str | list[int] | None = None
    """Only these layers, e.g. '10-20' or [0, 1, 2]; 'auto:K' picks the K layers whose adapter
    gradient is largest at the start (train/layer_choice.py). Empty: all layers."""
    auto_layers_batches: int = 4
    """layers=auto:K: training batches the layer scores are measured on."""
    num_virtual_tokens: int = 20
    """prompt_tuning / prefix_tuning: number of virtual tokens."""
    prompt_init_text: str | None = None
    """prompt_tuning: initialise the soft prompt from this text (else random)."""

    def __post_init__(self):
        _choice("method.name", self.name, tuple(METHOD_SPECS))
        if isinstance(self.targets, str):
            if self.targets not in TARGETS:
                raise ConfigError(f"method.targets={self.targets!r} is not valid; choose one of: "
                                  f"{', '.join(TARGETS)}, or a list of module names like [q_proj, v_proj]")
        if self.r < 1:
            raise ConfigError(f"method.r must be >= 1, got {self.r}")
        if isinstance(self.layers, str) and self.layers.startswith("auto") and \
                not (self.layers[5:].isdigit() and self.layers[:5] == "auto:"):
            raise ConfigError(f"method.layers={self.layers!r}: write auto:K, e.g. auto:4")


@dataclass
class LossCfg:
    objective: str = "sft"
    """What training minimises (train/objectives/): sft (with kl_lambda > 0: KL-anchored SFT), distill
    (from a teacher: the distill section), grpo (prompts; completions sampled each step and scored by
    the `grpo.rewards`), or a preference objective: dpo, ipo, orpo, simpo ({prompt, chosen, rejected}
    rows) or kto ({prompt, completion, label} rows, or pairs)."""
    kl_lambda: float = 0.0
    """Weight of KL to the base model; 0 is plain SFT."""
    kl_warmup_steps: int = 0
    """lambda rises linearly from 0 (the first step) to kl_lambda over these steps."""
    kl_temperature: float = 1.0
    """Softmax temperature tau for the KL term (scaled by tau^2)."""
    kl_direction: str = "forward"
    """forward KL(base||tuned), reverse KL(tuned||base), or jsd."""
    jsd_beta: float = 0.5
    """jsd: the base's weight in the mixture m = beta p + (1 - beta) q."""
    kl_positions: str = "trained"
    """trained (assistant tokens), all (every real token), last_n (the last n of each example)."""
    kl_last_n: int = 64
    """kl_positions=last_n: how many positions at the end of each example."""
    chunk_size: int = CHUNK_SIZE
    """Tokens per chunk of the output projection: peak logits memory = chunk x vocab."""
    # --- preference objectives (train/objectives/paired.py, kto.py; losses/preference.py)
    beta: float = 0.1
    """dpo / ipo / kto: how far from the base the tuned model may move (higher: stay closer;
    ipo: its tau, the target log-ratio margin is 1 / (2 beta) per token)."""
    label_smoothing: float = 0.0
    """dpo / simpo: the assumed share of flipped labels eps in [0, 0.5) (conservative DPO)."""
    simpo_beta: float = 2.0
    """simpo: scale of the length-normalised reward (the paper uses 2.0-2.5)."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma between chosen and rejected."""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term next to the NLL of the chosen answer."""
    kto_desirable_weight: float = 1.0
    """kto: weight of desirable (label true) rows; raise it when they are the minority."""
    kto_undesirable_weight: float = 1.0
    """kto: weight of undesirable (label false) rows."""
    precompute_reference: bool = False
    """dpo / ipo / kto: compute the base's log-probs of every training row once, before training,
    instead of a base forward per step (saves ~1/4 of a step's compute from the second epoch on)."""

    def __post_init__(self):
        _choice("loss.objective", self.objective, CONFIG_NAMES)
        if self.beta <= 0 or self.simpo_beta <= 0:
            raise ConfigError("loss.beta and loss.simpo_beta must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.kto_desirable_weight <= 0 or self.kto_undesirable_weight <= 0:
            raise ConfigError("loss.kto_desirable_weight and loss.kto_undesirable_weight must be > 0")
        _choice("loss.kl_direction", self.kl_direction, KL_DIRECTIONS)
        _choice("loss.kl_positions", self.kl_positions, KL_POSITIONS)
        if self.kl_lambda < 0 or self.kl_temperature <= 0:
            raise ConfigError("loss.kl_lambda must be >= 0 and loss.kl_temperature > 0")
        if not 0 < self.jsd_beta < 1:
            raise ConfigError(f"loss.jsd_beta must be in (0, 1), got {self.jsd_beta}")


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""grpo.loss_type: how per-token losses are averaged (losses/grpo.py)."""
SCALE_REWARDS = ("group", "batch", "none")
"""grpo.scale_rewards: what a group's centred rewards are divided by."""


@dataclass
class GRPOCfg:
    """loss.objective=grpo: sampling, rewards and the clipped policy loss (train/objectives/grpo.py).
    Defaults are TRL 1.16's GRPOConfig where it has the knob."""

    num_generations: int = 8
    """G: completions sampled per prompt each step; train.batch_size counts prompts, so a step
    trains on batch_size x grad_accum x G completions."""
    max_new_tokens: int = 128
    """Longest sampled completion (TRL's max_completion_length); dr_grpo divides by it."""
    temperature: float = 1.0
    """Sampling temperature of the completions (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 = off."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = off."""
    beta: float = 0.0
    """Weight of the per-token KL to the base (adapters off); 0 skips the base's forward pass."""
    epsilon_low: float = 0.2
    """The ratio is clipped below at 1 - epsilon_low."""
    epsilon_high: float | None = None
    """The ratio is clipped above at 1 + epsilon_high; empty: epsilon_low (DAPO's clip-higher: 0.28)."""
    loss_type: str = "dapo"
    """grpo (mean per sequence, then over sequences), bnpo / dapo (mean over the step's completion
    tokens), dr_grpo (sum / (completions x max_new_tokens))."""
    scale_rewards: str = "group"
    """Advantages = reward - group mean, divided by the group's std (group), the step's (batch) or
    nothing (none, Dr. GRPO)."""
    num_iterations: int = 1
    """Updates per batch of completions (mu); > 1 reuses them, with log-probs stored at sampling
    time for the clipped ratio."""
    mask_truncated: bool = False
    """Completions cut by max_new_tokens count for nothing in the loss (DAPO's overlong filtering)."""
    rewards: list[dict] = field(default_factory=list)
    """Reward functions, weighted and summed: [{name: ifeval, weight: 1.0}, {name: ended, weight: 0.2},
    {name: my_module:fn}]; the built-ins and their arguments are listed in rewards.py."""
    samples_every: int = 10
    """Write the step's completions and rewards to RUN/samples.jsonl every N steps; 0: never."""

    def __post_init__(self):
        _choice("grpo.loss_type", self.loss_type, LOSS_TYPES)
        _choice("grpo.scale_rewards", self.scale_rewards, SCALE_REWARDS)
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        if self.max_new_tokens < 1 or self.num_iterations < 1 or self.samples_every < 0:
            raise ConfigError("grpo.max_new_tokens and grpo.num_iterations must be >= 1, grpo.samples_every >= 0")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("grpo.temperature must be > 0, grpo.top_p in (0, 1], grpo.top_k >= 0")
        if self.beta < 0 or not 0 <= self.epsilon_low < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ConfigError("grpo.beta must be >= 0, grpo.epsilon_low in [0, 1), grpo.epsilon_high >= 0")


@dataclass
class DistillCfg:
    """loss.objective=distill: the teacher and how the student follows it (train/objectives/distill.py).

    The teacher is one of: `teacher` (a model in memory), `teacher_logprobs` (a stored top k,
    `slimtune data teacher`), or `teacher_system` / `teacher_prefix` (the base model itself, shown
    that context: context distillation). loss = alpha CE + (1 - alpha) tau^2 D(teacher || student)
    per trained token; on `on_policy` batches tau^2 KL(student || teacher) on answers the student
    generates."""

    teacher: str | None = None
    """The teacher: a hub id, model folder, .gguf, or a run folder (its adapter merged in memory).
    It must share the student's vocabulary (refused otherwise, naming the first differing token)."""
    teacher_logprobs: str | None = None
    """A folder `slimtune data teacher` wrote for data.train: the teacher's top-k log-probs at every
    trained position; no teacher in memory. Written at distill.temperature."""
    teacher_system: str | None = None
    """Context distillation: the base model (adapters off) seeing this system prompt is the teacher
    (put before the chat's own system turn, if any); the student sees the chat without it."""
    teacher_prefix: str | None = None
    """Context distillation: text the teacher sees before the first user message (few-shot examples,
    a style guide); the student does not."""
    alpha: float = 0.5
    """Weight of the student's CE on the data's tokens; 1 - alpha weighs the divergence to the teacher
    (0: pure distillation, as TRL's GKD)."""
    direction: str = "forward"
    """forward KL(teacher || student), reverse KL(student || teacher), or jsd (generalised, jsd_beta)."""
    temperature: float = 1.0
    """Softmax temperature tau of both models in the divergence (which is multiplied by tau^2)."""
    jsd_beta: float = 0.5
    """jsd: the teacher's weight in the mixture m = beta p + (1 - beta) q (TRL GKD's beta)."""
    top_k: int | None = None
    """Stored teacher: the ids per position training reads, the store's first (likeliest) top_k.
    Empty: all the store holds."""
    tail: str = "bucket"
    """Stored teacher: the mass beyond the top k as one extra category (bucket) or dropped with both
    distributions renormalised over the k ids (renorm); losses/distill.py."""
    on_policy: float = 0.0
    """Share of batches (0-1) whose answers the student generates for the batch's prompts (GKD's
    lambda), scored by the teacher with the per-token reverse KL(student || teacher) on those
    answers; the other batches train on the data's answers as above. Which batches: drawn from
    (train.seed, step, batch), so a resumed run makes the same choices."""
    max_new_tokens: int = 128
    """On-policy batches: longest answer the student generates (stopped at its end-of-turn token)."""
    sample_temperature: float = 1.0
    """On-policy batches: the student's sampling temperature (> 0; 1: its own distribution, as GKD).
    Not distill.temperature, which softens the divergence."""
    samples_every: int = 10
    """On-policy: write the generated answers of a batch to RUN/samples.jsonl at most every N steps;
    0: never."""
    teacher_dtype: str = "auto"
    """auto: bfloat16 where the device computes it natively (machine.bf16_supported), else the
    student's dtype; or float32, bfloat16, float16, 4bit (NF4, CUDA only)."""

    def __post_init__(self):
        _choice("distill.direction", self.direction, KL_DIRECTIONS)
        _choice("distill.tail", self.tail, DISTILL_TAILS)
        _choice("distill.teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        if not 0 <= self.alpha <= 1 or not 0 <= self.on_policy <= 1:
            raise ConfigError("distill.alpha and distill.on_policy must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0 < self.jsd_beta < 1:
            raise ConfigError(f"distill.jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"distill.top_k must be >= 1, got {self.top_k}")
        modes = [m for m in ("teacher", "teacher_logprobs", "context") if self.mode_set(m)]
        if len(modes) > 1:
            raise ConfigError(f"distill: set one teacher, not {' and '.join(modes)} (teacher: a model; "
                              "teacher_logprobs: a stored top k; teacher_system / teacher_prefix: the base "
                              "shown a context)")
        if self.max_new_tokens < 1 or self.sample_temperature <= 0 or self.samples_every < 0:
            raise ConfigError("distill.max_new_tokens must be >= 1, distill.sample_temperature > 0 and "
                              "distill.samples_every >= 0")
        if self.on_policy and self.teacher_logprobs:  # a store covers the data's answers only
            raise ConfigError("distill.on_policy > 0 needs a teacher that scores the student's own answers; "
                              "distill.teacher_logprobs holds log-probs of the data's answers only. Set "
                              "distill.teacher (or teacher_system / teacher_prefix), or distill.on_policy=0")

    def mode_set(self, mode: str) -> bool:
        return bool(self.teacher_system or self.teacher_prefix) if mode == "context" else bool(getattr(self, mode))

    @property
    def mode(self) -> str | None:
        """teacher, teacher_logprobs, context, or None (no teacher configured)."""
        return next((m for m in ("teacher", "teacher_logprobs", "context") if self.mode_set(m)), None)


@dataclass
class TrainCfg:
    output_dir: str = "runs/run"
    """The run folder: adapter, logs, config, checkpoints."""
    seed: int = 0
    """Seeds data order, the held-out split, initialisation and dropout (under data parallel each
    process draws dropout from seed + 1000 x its rank)."""
    lr: float = 2e-4
    """Peak learning rate."""
    optimizer: str = "adamw"
    """adamw, adafactor, lion, schedulefree."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (never on norms, biases or IA3 vectors)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam-style betas (lion uses them too)."""
    schedule: str = "cosine"
    """cosine, linear, constant: the decay after warm-up (schedulefree keeps its own)."""
    warmup_steps: int = 0
    """Linear warm-up: step 1 runs at lr / warmup_steps, step warmup_steps at lr."""
    warmup_ratio: float = 0.0
    """Used when warmup_steps is 0: a fraction of the total steps."""
    min_lr_ratio: float = 0.0
    """The schedule ends at lr x min_lr_ratio."""
    batch_size: int = 8
    """Examples (or packed rows) per batch; a step takes grad_accum batches on every process."""
    grad_accum: int = 1
    """Batches per optimizer step; the loss is normalised by trained tokens over all of them."""
    micro_batch_tokens: int | None = None
    """Run each batch in pieces of at most this many padded tokens (rows x longest row) and sum
    their gradients: the same update, activation memory bounded by this instead of the batch.
    Empty: resolved when training starts (written so in the run's config.yaml): 1024 on CPU (as
    fast as whole batches there, and 2-3x less memory: BENCHMARKS.md), 0 on GPU. 0: never split."""
    max_steps: int | None = None
    """Optimizer steps. Empty: `epochs` passes over the data."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is empty (fractions allowed)."""
    max_minutes: float | None = None
    """Wall-clock cap (setup included): training stops, evaluates once more and saves the adapter."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this. Empty: no clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    log_every: int = 1
    """Write a log row every N steps."""
    save_every: int | None = None
    """Checkpoint every N steps (for resume). Empty: only the final adapter."""
    keep_checkpoints: int = 1
    """How many checkpoints to keep (the newest)."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    plateau_patience: int | None = None
    """Stop when the smoothed training loss has not improved by plateau_min_delta for N steps."""
    plateau_min_delta: float = 1e-3
    """The smallest drop of the smoothed loss that counts as an improvement."""
    plateau_min_steps: int = 0
    """Never stop on a plateau before this step."""
    plateau_smoothing: float = 0.9
    """Exponential smoothing of the training loss for the plateau rule."""
    early_stop_patience: int | None = None
    """Stop after N evaluations without held-out loss improving."""
    progress: bool = True
    """Print the live progress line."""
    num_threads: int | None = None
    """torch CPU threads. Empty: torch's default."""
    device: str = "auto"
    """auto (cuda, else mps, else cpu), cpu, cuda, mps."""
    mixed_precision: str = "auto"
    """auto, no, bf16 or fp16 autocast for forward and loss; trained weights and optimizer state
    stay fp32 (needs model.dtype=float32); fp16 scales the loss and skips steps whose gradients
    overflow. auto: bf16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a
    CUDA GPU with bf16) and the weights are float32 and not 4-bit; no elsewhere. Resolved at start,
    printed and recorded in config.yaml; eval, compare and chat generate with the same choice."""
    fsdp: bool = False
    """Under a multi-process launch: shard weights, gradients and optimizer state over the
    processes (FSDP2, one unit per decoder layer) instead of replicating them (DDP)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers: tensorboard (local files in RUN/tb), wandb, mlflow, trackio. Empty: none."""

    def __post_init__(self):
        _choice("train.device", self.device, DEVICES)
        _choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for t in self.report_to:
            _choice("train.report_to", t, TRACKERS)
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 0:
            raise ConfigError(f"train.micro_batch_tokens must be >= 0 (0: never split), got {self.micro_batch_tokens}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")


@dataclass
class EvalCfg:
    every: int | None = None
    """Evaluate held-out loss (and KL to base) every N steps; always before and after training."""
    max_examples: int | None = 64
    """Held-out examples used per evaluation."""
    batch_size: int = 8
    """Examples per evaluation batch."""
    kl: bool = True
    """Report KL(base || tuned) on held-out and general prompts at each evaluation."""
    max_new_tokens: int = 128
    """Longest generated answer in `slimtune eval`, compare and report."""
    banned_phrases: list[str] = field(default_factory=lambda: [
        "As an AI", "as an AI language model", "I cannot", "I'm sorry"])
    """Phrases counted in generated answers (style metrics)."""
    top_p: float = 1.0
    """Generation (eval, compare, chat): nucleus sampling mass when sampling; 1 = off."""
    top_k: int = 0
    """Generation: sample among the k most likely tokens; 0 = off."""
    repetition_penalty: float = 1.0
    """Generation: > 1 makes tokens already in the prompt or answer less likely; 1 = off."""
    no_repeat_ngram_size: int = 0
    """Generation: forbid any token n-gram of this size from appearing twice; 0 = off."""
    gen_batch_size: int = 64
    """Answers generated together (left-padded, KV-cached, finished rows leave the batch; eval puts
    base and tuned rows in the same batches). A CPU decoding step costs much the same for 16 rows
    as for 48: on 2 cores 24 answers in one batch took 26 s, in batches of 16 44 s (SmolLM2-135M)."""
    ifeval: str | None = None
    """Prompts with checkable instructions (IFEval-style) that `slimtune eval` also answers, e.g.
    builtin:ifeval_prompts (66 prompts: about 1 minute per side on 2 CPU cores); None: skip."""


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    grpo: GRPOCfg = field(default_factory=GRPOCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def __post_init__(self):
        """Checks across sections (each section checks itself)."""
        method = METHOD_SPECS[self.method.name]
        if self.data.packing and method.adds_positions:
            raise ConfigError(f"data.packing does not work with {self.method.name} (it adds positions); "
                              "set data.packing=false")
        if self.data.packing and not spec_for(self.loss.objective, self.loss.kl_lambda).packable:
            raise ConfigError(f"data.packing does not work with loss.objective={self.loss.objective}; "
                              "set data.packing=false")
        if self.loss.objective == "distill" and self.distill.mode is None:
            raise ConfigError("loss.objective=distill needs a teacher: distill.teacher (a model or run folder), "
                              "distill.teacher_logprobs (a folder from `slimtune data teacher`), or "
                              "distill.teacher_system / distill.teacher_prefix (context distillation)")

    def resolved(self, device: str, native_bf16: bool = False, four_bit: bool = False) -> Config:
        """A copy with the defaults that depend on the device filled in (what config.yaml records).

        native_bf16: the device computes bf16 natively (machine.bf16_supported); four_bit: the
        method trains on a 4-bit base (bitsandbytes computes it in float32 on a CPU).
        """
        cfg = copy.deepcopy(self)
        if cfg.train.mixed_precision == "auto":
            cfg.train.mixed_precision = auto_precision(device, cfg.model.dtype, native_bf16, four_bit)
        if cfg.train.micro_batch_tokens is None:
            # CPU: pieces of 1024 tokens are as fast per token as whole batches and hold 2-3x less;
            # GPU: whole batches keep the device full.
            cfg.train.micro_batch_tokens = 1024 if str(device).startswith("cpu") else 0
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, f"{CONFIG_HEAD}\n{yaml.safe_dump(self.to_dict(), sort_keys=False)}{CONFIG_END}\n")


CONFIG_HEAD = "# slimtune run config: the resolved settings of this run"
CONFIG_END = "# end of slimtune run config"
"""A run's config.yaml starts and ends with these lines: a file with the first and not the last was
cut short (a truncated YAML file can still parse, with defaults where the rest was)."""


COLUMN_FIELDS = ("completion", "context", "conversations", "input", "instruction", "messages", "output",
                 "prompt", "response", "text")
"""The fields data.columns may map: every format's keys (data/formats.py SIGNATURES, a test checks)."""


def parse_columns(text: str | dict | None) -> dict[str, str]:
    """'instruction=question,output=answer' (or a dict) -> {ours: theirs}, checked."""
    if not text:
        return {}
    if isinstance(text, str):
        pairs = [p.strip() for p in text.split(",") if p.strip()]
        bad = [p for p in pairs if "=" not in p]
        if bad:
            raise ConfigError(f"columns '{bad[0]}' must look like ours=theirs, e.g. instruction=question,output=answer")
        text = dict(p.split("=", 1) for p in pairs)
    mapping = {str(k).strip(): str(v).strip() for k, v in text.items()}
    unknown = sorted(set(mapping) - set(COLUMN_FIELDS))
    if unknown:
        raise ConfigError(f"data.columns: unknown field '{unknown[0]}'; map any of {', '.join(COLUMN_FIELDS)} "
                          "to a column of your file (e.g. {instruction: question, output: answer})")
    return mapping


def auto_precision(device: str, weights_dtype: str, native_bf16: bool, four_bit: bool = False) -> str:
    """What train.mixed_precision=auto means here: bf16 autocast where it is native and applies.

    A CPU with AVX512-BF16 / AMX runs bf16 matmuls at ~4x its float32 rate (measured on one: 783
    against 184 GFLOP/s), and the quickstart's held-out loss stayed within 0.2%; without native
    bf16 autocast is emulated and slower, so float32 stays. Autocast needs float32 weights; a 4-bit
    base computes in float32 on a CPU (bitsandbytes) and MPS autocast is not worth it yet.
    """
    kind = str(device).split(":")[0]
    ok = native_bf16 and weights_dtype == "float32" and kind in ("cpu", "cuda") and not (four_bit and kind == "cpu")
    return "bf16" if ok else "no"


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


_SECTIONS = typing.get_type_hints(Config)  # section name -> dataclass (annotations are strings)


def _coerce(key: str, raw, typ):
    """Turn a YAML value or a `key=value` string into the field's type, or raise ConfigError."""
    is_union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    args = typing.get_args(typ) if is_union else ()
    if raw is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} may not be empty")
    if isinstance(raw, str) and type(None) in args and raw.lower() in ("none", "null", "~", ""):
        return None
    options = [a for a in args if a is not type(None)] or [typ]
    if isinstance(raw, str) and raw.startswith("["):  # "[q_proj, v_proj]" is a list, not a name
        options.sort(key=lambda o: (typing.get_origin(o) or o) is not list)
    errors = []
    for opt in options:  # first type that accepts the value wins (e.g. int before list)
        origin = typing.get_origin(opt) or opt
        try:
            if origin is bool:
                if isinstance(raw, bool):
                    return raw
                if isinstance(raw, str) and raw.lower() in ("true", "false", "yes", "no", "1", "0"):
                    return raw.lower() in ("true", "yes", "1")
                raise ValueError("expected true or false")
            if origin is list:
                val = yaml.safe_load(raw) if isinstance(raw, str) else raw
                if not isinstance(val, list):
                    raise ValueError("expected a list like [a, b]")
                (inner,) = typing.get_args(opt) or (str,)
                return [inner(v) for v in val]
            if origin is dict:  # {a: b} in YAML, or 'a=b,c=d' / '{a: b}' on the command line
                val = raw
                if isinstance(raw, str):
                    val = yaml.safe_load(raw) if raw.lstrip().startswith("{") else \
                        dict(p.split("=", 1) for p in raw.split(",") if "=" in p)
                if not isinstance(val, dict):
                    raise ValueError("expected a mapping like {a: b} or a=b,c=d")
                return {str(k): str(v) for k, v in val.items()}
            if origin in (int, float):
                if isinstance(raw, bool):
                    raise ValueError("expected a number")
                val = yaml.safe_load(raw) if isinstance(raw, str) else raw
                if origin is int and isinstance(val, float) and not val.is_integer():
                    raise ValueError("expected an integer")
                return origin(val)
            if origin is str:
                if isinstance(raw, (dict, list)):
                    raise ValueError("expected a string")
                return str(raw)
        except (ValueError, TypeError, yaml.YAMLError) as e:
            errors.append(str(e))
    raise ConfigError(f"{key}={raw!r}: {'; '.join(errors) or 'bad value'}")


def build_config(raw: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Make a validated Config from a nested dict (a YAML file's content) and `a.b=value` strings."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()} if raw else {}
    for k in raw:
        if k not in _SECTIONS:
            raise ConfigError(f"unknown config section '{k}'; valid sections: {', '.join(_SECTIONS)}")
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section '{section}' in '{item}'; valid: {', '.join(_SECTIONS)}")
        raw.setdefault(section, {})[name] = value
    sections = {}
    for section, cls in _SECTIONS.items():
        types_ = typing.get_type_hints(cls)  # field name -> resolved type
        values = {}
        for name, val in raw.get(section, {}).items():
            if name not in types_:
                raise ConfigError(f"unknown key '{section}.{name}'; valid keys: {', '.join(types_)}")
            values[name] = _coerce(f"{section}.{name}", val, types_[name])
        sections[section] = cls(**values)
    return Config(**sections)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or none: the defaults) and apply `section.key=value` overrides."""
    raw = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected sections (model:, data:, train: ...) at the top level")
    return build_config(raw, overrides)
