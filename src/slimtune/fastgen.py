"""Batched generation for eval, compare and report: many prompts at once, answers as `generate` gives them.

    chats --render_prompt--> sorted by length --left-padded batches--> prefill (KV cache)
          --> one token per step for every unfinished row; finished rows leave the batch

A step costs about the same for 1 row as for 16 on a CPU (the weights are read once either way),
so answering 24 prompts together is ~8x faster than one at a time. Rows that have ended are cut
from the batch and its KV cache, so a batch never waits on padding for answers that are done.
Position ids count real tokens only and padding is masked, so each row computes what it would
alone; greedy answers equal `generate.generate`'s up to float rounding (a test pins the token ids).

Adapters that can be merged (LoRA, rsLoRA, DoRA, IA3) are merged into the weights for the
duration (`merged`) and unmerged after; prompt and prefix tuning generate through PEFT's own
`generate` (batched, without dropping finished rows). With `adapter_on`, a LoRA model answers
base rows (adapter off) and tuned rows in the same batches: on a CPU a decoding step's cost is
mostly fixed (the weights are read, ~30 layers of small ops run), so one stream of 48 rows
takes far less than two of 24.

Sampling is per prompt: prompt i of a call draws from its own generator seeded with seed + i, so an
answer does not depend on which other prompts share its batch (and equals the unbatched
`generate(..., seed=seed + i)`).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class GenSettings:
    """How to answer. The neutral values (1.0, 0) switch a knob off; eval.* in config.py holds the defaults."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = off."""
    repetition_penalty: float = 1.0
    """> 1 makes tokens already in the prompt or answer less likely (CTRL-style)."""
    no_repeat_ngram_size: int = 0
    """n > 0 forbids any n-gram of tokens from appearing twice."""
    seed: int = 0
    """Prompt i of a call samples with seed + i."""

    @property
    def sample(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def settings_from(eval_cfg, **overrides) -> GenSettings:
    """GenSettings from a run's `eval` config section, with the non-None `overrides` on top."""
    base = {f.name: getattr(eval_cfg, f.name) for f in dataclasses.fields(GenSettings) if hasattr(eval_cfg, f.name)}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return GenSettings(**base)


def can_merge(model) -> bool:
    """True for a PEFT model whose adapter folds into the weights (LoRA family, IA3), not on a 4-bit base."""
    cfg = getattr(model, "peft_config", None)
    if not cfg or getattr(model, "is_loaded_in_4bit", False) or getattr(
            getattr(model, "base_model", None), "is_loaded_in_4bit", False):
        return False
    return all(str(c.peft_type).split(".")[-1] in ("LORA", "IA3") for c in cfg.values())


@contextmanager
def merged(model):
    """`with merged(model):` the adapter folded into the base weights (one matmul per layer instead
    of three), unmerged on exit (weights restored to float rounding). A no-op when it cannot merge."""
    if not can_merge(model):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def can_mix(model) -> bool:
    """True for a PEFT LoRA / rsLoRA / QLoRA model: one batch can hold rows with the adapter and
    rows without it (PEFT's `adapter_names`), so base and tuned answers are generated together.
    PEFT refuses that for DoRA (and IA3 and prompt learning have no such path)."""
    cfg = getattr(model, "peft_config", None)
    return bool(cfg) and all(str(c.peft_type).split(".")[-1] == "LORA" and not getattr(c, "use_dora", False)
                             for c in cfg.values())


def is_prompt_learning(model) -> bool:
    cfg = getattr(model, "peft_config", None)
    return bool(cfg) and any(getattr(c, "is_prompt_learning", False) for c in cfg.values())


def generate_many(model, tokenizer, chats: list[Messages], settings: GenSettings = GenSettings(),
                  batch_size: int = 32, log=None, adapter_on: list[bool] | None = None,
                  seeds: list[int] | None = None) -> list[dict]:
    """Answer every chat (each ending with a user turn); answers in the order of `chats`.

    Returns [{text, n_tokens, ended, seconds}] as `generate.generate` does, except that `seconds`
    is the answer's share of its batch's wall time (by tokens): summed over answers it is the
    wall time, so tokens / seconds is the batch throughput. `log(done, total)` after each batch.

    adapter_on (a `can_mix` model, unmerged): per chat, whether its row runs with the adapter
    (tuned) or without it (base); both kinds share batches. A decoding step costs nearly the same
    for 24 rows as for 48 on a CPU, so base and tuned answers together take little more than one
    side alone. seeds: per chat sampling seed (default settings.seed + its position).
    """
    from .data.render import render_prompt
    from .generate import stop_ids

    if not chats:
        return []
    if adapter_on is not None and not can_mix(model):
        raise ValueError("adapter_on needs an unmerged PEFT LoRA model")
    names = None
    if adapter_on is not None:
        name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        names = [name if on else "__base__" for on in adapter_on]  # PEFT's name for "no adapter"
    seeds = seeds if seeds is not None else [settings.seed + i for i in range(len(chats))]
    prompts = [render_prompt(c, tokenizer) for c in chats]
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    out: list[dict | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            t0 = time.perf_counter()
            if is_prompt_learning(model):
                rows = _peft_generate(model, [prompts[i] for i in idx], settings, stops, pad)
            else:
                rows = _decode(_net(model) if names is None else model, [prompts[i] for i in idx], settings,
                               [seeds[i] for i in idx], stops, pad, None if names is None else [names[i] for i in idx])
            seconds = time.perf_counter() - t0
            total = max(1, sum(len(r) for r in rows))
            for i, new in zip(idx, rows):
                ended = bool(new) and new[-1] in stops
                text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False)
                out[i] = {"text": text.strip(), "n_tokens": len(new), "ended": ended,
                          "seconds": seconds * len(new) / total}
            if log:
                log(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return out


def _net(model):
    """The transformers model under PEFT (adapter layers inside stay active, merged or not)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padding on the left."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def processors(s: GenSettings):
    """The logits processors `transformers.generate` would apply for these settings, in its order."""
    from transformers import (NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = []
    if s.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
    if s.sample:
        if s.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k > 0:
            procs.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            procs.append(TopPLogitsWarper(s.top_p))
    return procs


@torch.no_grad()
def _decode(net, prompts: list[list[int]], s: GenSettings, seeds: list[int], stops: list[int],
            pad: int, names: list[str] | None = None) -> list[list[int]]:
    """New token ids per prompt (the stop token included when it ended), KV-cached, finished rows
    dropped. names: per row, the PEFT adapter it runs with ("__base__": none); `net` is then the
    PEFT model."""
    from transformers import DynamicCache

    device = next(net.parameters()).device
    ids, mask = _left_pad(prompts, pad, device)  # (B, T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)     # real tokens count from 0, as they would alone
    cache = DynamicCache()
    mix = {"adapter_names": names} if names is not None else {}
    logits = net(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                 use_cache=True, logits_to_keep=1, **mix).logits[:, -1].float()  # (B, V)
    procs = processors(s)
    gens = [torch.Generator(device=device).manual_seed(sd) for sd in seeds] if s.sample else None
    seqs = [list(p) for p in prompts]            # per-row history, unpadded, for the processors
    alive = list(range(len(prompts)))            # original row of each batch row
    new: list[list[int]] = [[] for _ in prompts]
    next_pos = pos[:, -1] + 1                    # (B,)
    stop_set = set(stops)
    for step in range(s.max_new_tokens):
        picks = _pick(logits, [seqs[r] for r in alive], procs, [gens[r] for r in alive] if gens else None)
        keep = []
        for b, (r, t) in enumerate(zip(alive, picks)):
            new[r].append(t)
            seqs[r].append(t)
            if t not in stop_set:
                keep.append(b)
        if not keep or step + 1 == s.max_new_tokens:
            break
        tokens = torch.tensor(picks, device=device)
        if len(keep) < len(alive):  # cut finished rows out of the batch and its cache
            k = torch.tensor(keep, device=device)
            cache.batch_select_indices(k)
            mask, tokens, next_pos = mask[k], tokens[k], next_pos[k]
            alive = [alive[b] for b in keep]
            if names is not None:
                mix = {"adapter_names": [names[r] for r in alive]}
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits = net(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                     past_key_values=cache, use_cache=True, **mix).logits[:, -1].float()
        next_pos = next_pos + 1
    return new


def _pick(logits: torch.Tensor, seqs: list[list[int]], procs, gens) -> list[int]:
    """Next token per row from (B, V) logits: argmax, or a draw after the processors, row by row
    (each row sees only its own unpadded history, as it would alone)."""
    if not procs and gens is None:
        return logits.argmax(-1).tolist()
    picks = []
    for b, seq in enumerate(seqs):
        scores = logits[b:b + 1]
        ids = torch.tensor([seq], device=logits.device)
        for p in procs:
            scores = p(ids, scores)
        if gens is None:
            picks.append(int(scores.argmax(-1)))
        else:
            probs = torch.softmax(scores, dim=-1)
            picks.append(int(torch.multinomial(probs, 1, generator=gens[b])))
    return picks


def _peft_generate(model, prompts: list[list[int]], s: GenSettings, stops: list[int], pad: int) -> list[list[int]]:
    """Prompt / prefix tuning: PEFT's generate adds the virtual tokens; one seed for the batch."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad, device)
    cfg = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=s.sample,
                           temperature=s.temperature if s.sample else None,
                           top_p=s.top_p if s.sample else None, top_k=s.top_k or None,
                           repetition_penalty=s.repetition_penalty if s.repetition_penalty != 1.0 else None,
                           no_repeat_ngram_size=s.no_repeat_ngram_size or None,
                           eos_token_id=stops, pad_token_id=pad)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(s.seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():  # PEFT returns prompt + new for every row
        end = next((j for j, t in enumerate(row) if t in stops), None)
        rows.append(row[:end + 1] if end is not None else row)
    return rows
