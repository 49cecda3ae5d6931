"""Generation with the training template: one module for eval, compare, report, chat and training.

    chats --render_prompt--> sorted by length --left-padded batches--> prefill (KV cache)
          --> one token per step for every unfinished row; finished rows leave the batch

`generate_many` answers many prompts at once; `generate` is the same decoding for one chat,
streamed. A step costs about the same for 1 row as for 16 on a CPU (the weights are read once
either way), so answering 24 prompts together is ~8x faster than one at a time. The KV cache is
preallocated for prompt + answer (`_Cache`: no copy of the whole cache per step); rows that have
ended are cut from the batch and its cache once a quarter of it has ended (`CUT_SHARE`). Under bf16
autocast the weights are cast to bf16 once per batch, not at every call (`_cast_once`). After the
prefill, Llama / Mistral / Qwen2 models (adapters merged or none) decode through
`lean_decode.LeanDecoder`, the same step with fewer operators (in bf16 on a CPU with packed weights,
the prefill too); anything else through the model's forward. Equal prompts in a batch (GRPO's G
samples of one prompt) are prefilled once and their cache copied to each row; so is the prompts'
common start (the template's system turn: `_shared_prefix`), kept in the first columns of every row
with each row's padding after it (`_left_pad(start=)`). Position
ids count real tokens only and padding is masked, so each row computes what it would alone (a test pins batched == unbatched token ids,
also on a model with learned absolute positions, where a missing offset would show).

Adapters that can be merged (the method table's `can_merge`) are merged into the weights for the
duration (`merged`) and unmerged after. Prompt and prefix tuning decode here too: the virtual
tokens start each row after its padding (`_with_virtual`), as they would alone. With
`adapter_on`, a LoRA model answers base rows (adapter off) and tuned rows in the same batches: on
a CPU a decoding step's cost is mostly fixed, so one stream of 48 rows takes far less than two of 24.

Sampling is per prompt: prompt i of a call draws from its own generator seeded with seed + i, so an
answer does not depend on which other prompts share its batch (and equals the unbatched
`generate(..., seed=seed + i)`); one uniform per row and token, by inverse transform (`draw`). Stop tokens: eos, the template's end-of-turn token, the model's eos.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import (Cache, DynamicCache, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
from transformers.cache_utils import DynamicLayer

from .config import EvalCfg, auto_precision
from .data.render import IGNORE, render_chat, render_prompt
from .lean_decode import MKL_MIN_ROWS, LeanDecoder, can_pack, room_to_pack
from .machine import bf16_supported
from .methods import method_of, method_of_model
from .train.precision import frozen_in
from .utils import eval_mode

Messages = list[dict[str, str]]


_EVAL = EvalCfg()


@dataclass(frozen=True)
class GenSettings:
    """How to answer. The neutral values (1.0, 0) switch a knob off; the defaults are eval.*'s."""

    max_new_tokens: int = _EVAL.max_new_tokens
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = _EVAL.top_p
    top_k: int = _EVAL.top_k
    """0 = off."""
    repetition_penalty: float = _EVAL.repetition_penalty
    """> 1 makes tokens already in the prompt or answer less likely (CTRL-style)."""
    no_repeat_ngram_size: int = _EVAL.no_repeat_ngram_size
    """n > 0 forbids any n-gram of tokens from appearing twice."""
    seed: int = 0
    """Prompt i of a call samples with seed + i."""
    autocast: str = "no"
    """bf16: decode under bf16 autocast (the run's train.mixed_precision where the device has native
    bf16; `settings_for`); no: in the weights' dtype."""

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


def settings_for(cfg, device: str = "cpu", **overrides) -> GenSettings:
    """GenSettings for a run's config: eval.* with `overrides`, and the precision training chose
    (train.mixed_precision; auto resolved for this device), so eval, compare and chat generate as
    the run trained. A run trained in bf16 elsewhere decodes in float32 on a device without native bf16.
    """
    mp = cfg.train.mixed_precision
    native = bf16_supported(device)
    if mp == "auto":
        mp = auto_precision(device, cfg.model.dtype, native, method_of(cfg.method.name).four_bit)
    return settings_from(cfg.eval, autocast="bf16" if mp == "bf16" and native else "no", **overrides)


def can_merge(model) -> bool:
    """The adapter folds into the weights for generation (the method table's `can_merge`; a 4-bit
    base cannot take it)."""
    m = method_of_model(model)
    return m is not None and m.can_merge and not m.four_bit


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
    m = method_of_model(model)
    return m is not None and m.name in ("lora", "rslora", "qlora")


def is_prompt_learning(model) -> bool:
    """Prompt / prefix tuning with its virtual tokens on (PEFT's `disable_adapter` switches them off)."""
    m = method_of_model(model)
    return m is not None and m.adds_positions and not getattr(model, "_adapters_disabled", False)


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an answer: eos, the template's end-of-turn token, the model's eos.

    The end-of-turn token is the last trained token of a rendered assistant turn (e.g.
    <|im_end|>, or <|eot_id|> for Llama 3, which is not its eos).
    """
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    _, labels = render_chat(chat, tokenizer, train_on="last")
    trained = [t for t in labels if t != IGNORE]
    if trained:
        ids.add(trained[-1])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])
    return sorted(ids)


def generate(model, tokenizer, messages: Messages, max_new_tokens: int = _EVAL.max_new_tokens,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, streamer=None, top_k: int = 0,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, autocast: str = "no") -> dict:
    """Answer one chat (ending with a user turn), streamed if `streamer` (put(ids), end()).

    The same decoding as `generate_many` (a batch of one): temperature 0 is greedy, > 0 samples
    reproducibly for `seed`. Returns {text, n_tokens, ended, seconds}: text without the
    end-of-turn token (other special tokens are kept, so stray template tags stay visible);
    n_tokens generated tokens, the end-of-turn token included; ended True when it stopped on an
    end-of-turn token rather than the token limit.
    """
    s = GenSettings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size, seed,
                    autocast)
    out = generate_many(model, tokenizer, [messages], s, batch_size=1, streamer=streamer)[0]
    return out


def generate_many(model, tokenizer, chats: list[Messages] | None, settings: GenSettings = GenSettings(),
                  batch_size: int = 32, log=None, adapter_on: list[bool] | None = None,
                  seeds: list[int] | None = None, streamer=None, return_ids: bool = False,
                  prompt_ids: list[list[int]] | None = None) -> list[dict]:
    """Answer every chat (each ending with a user turn); answers in the order of `chats`.

    Returns [{text, n_tokens, ended, seconds}] as `generate.generate` does, except that `seconds`
    is the answer's share of its batch's wall time (by tokens): summed over answers it is the
    wall time, so tokens / seconds is the batch throughput. `log(done, total)` after each batch.

    adapter_on (a `can_mix` model, unmerged): per chat, whether its row runs with the adapter
    (tuned) or without it (base); both kinds share batches. A decoding step costs nearly the same
    for 24 rows as for 48 on a CPU, so base and tuned answers together take little more than one
    side alone. seeds: per chat sampling seed (default settings.seed + its position).
    streamer (one chat): `put(list of new ids)` after each step, `end()` after the last.
    return_ids: each answer also has "ids", its generated token ids (the stop token included).
    prompt_ids: the prompts already rendered (token ids ending with the assistant header), answered
    instead of `chats` (pass None): training rows whose chats are kept only as tokens.
    """
    if prompt_ids is not None:
        if chats is not None:
            raise ValueError("pass chats or prompt_ids, not both")
        chats = [None] * len(prompt_ids)
    if not chats:
        return []
    if adapter_on is not None and not can_mix(model):
        raise ValueError("adapter_on needs an unmerged PEFT LoRA model")
    names = None
    if adapter_on is not None:
        name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        names = [name if on else "__base__" for on in adapter_on]  # PEFT's name for "no adapter"
    seeds = seeds if seeds is not None else [settings.seed + i for i in range(len(chats))]
    prompts = [list(p) for p in prompt_ids] if prompt_ids is not None else [render_prompt(c, tokenizer) for c in chats]
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    out: list[dict | None] = [None] * len(prompts)
    with eval_mode(model), keep_decoders():  # the weights stay fixed for this call: one decoder for its batches
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            t0 = time.perf_counter()
            virtual = model if is_prompt_learning(model) else None
            net = model if names is not None else _net(model)
            amp = (torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
                   if settings.autocast == "bf16" else nullcontext())
            with amp:
                rows = _decode(net, [prompts[i] for i in idx], settings, [seeds[i] for i in idx], stops, pad,
                               None if names is None else [names[i] for i in idx], virtual=virtual,
                               on_token=streamer.put if streamer is not None else None)
            if streamer is not None:
                streamer.end()
            seconds = time.perf_counter() - t0
            total = max(1, sum(len(r) for r in rows))
            for i, new in zip(idx, rows):
                ended = bool(new) and new[-1] in stops
                text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False)
                out[i] = {"text": text.strip(), "n_tokens": len(new), "ended": ended,
                          "seconds": seconds * len(new) / total, **({"ids": new} if return_ids else {})}
            if log:
                log(min(start + batch_size, len(order)), len(order))
    return out


def _net(model):
    """The transformers model under PEFT (adapter layers inside stay active, merged or not)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _left_pad(prompts: list[list[int]], pad: int, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padding on the left; start > 0: the prompts' first
    `start` tokens (the same in every row) stay in columns [0, start) and the padding follows them,
    so the common start sits in the same columns of every row (`_prefill_prefix`). Position ids
    count real tokens only, so a row computes what it would alone either way."""
    T = max(map(len, prompts))
    ids = torch.tensor([p[:start] + [pad] * (T - len(p)) + p[start:] for p in prompts], device=device)
    mask = torch.tensor([[1] * start + [0] * (T - len(p)) + [1] * (len(p) - start) for p in prompts], device=device)
    return ids, mask


def processors(s: GenSettings):
    """The logits processors `transformers.generate` would apply for these settings, in its order."""
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


def _with_virtual(peft_model, ids: torch.Tensor, mask: torch.Tensor):
    """Prefill inputs for prompt / prefix tuning, as each row would have them alone.

    Prompt tuning: the P virtual embeddings go right after each row's left padding (before its
    prompt), so positions and attention are those of [virtual, prompt] unpadded. Prefix tuning:
    the P prefix keys/values start the cache, always attended, and the prompt's positions start at
    P, as PEFT's unbatched generate places them. PEFT's own batched generate puts the virtual tokens
    before the padding, which transformers 5.24 no longer positions as the unpadded row.
    Returns (forward kwargs, attention mask, position ids).
    """
    B, T = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    virtual = peft_model.get_prompt(batch_size=B)
    if isinstance(virtual, torch.Tensor):                    # prompt tuning: (B, P, H) embeddings
        P = virtual.shape[1]
        emb = _net(peft_model).get_input_embeddings()(ids)  # (B, T, H)
        virtual = virtual.to(emb.dtype)
        pads = (mask == 0).sum(-1).tolist()
        rows = [torch.cat([emb[b, :n], virtual[b], emb[b, n:]]) for b, n in enumerate(pads)]
        mask = torch.cat([mask.new_zeros(B, P), mask], dim=1)
        for b, n in enumerate(pads):                         # [pad, virtual, prompt]
            mask[b, n:] = 1
        return {"inputs_embeds": torch.stack(rows)}, mask, (mask.cumsum(-1) - 1).clamp(min=0)
    cache = virtual if isinstance(virtual, DynamicCache) else DynamicCache(virtual)
    P = cache.get_seq_length()
    full = torch.cat([mask.new_ones(B, P), mask], dim=1)
    return {"input_ids": ids, "past_key_values": cache}, full, pos + P


class _Layer(DynamicLayer):
    """A DynamicLayer that writes into a buffer sized for prompt + answer instead of growing by
    torch.cat, which copies the whole cache at every step (at batch 32 and 200 tokens about as many
    bytes as the weights). It returns the filled part, so attention sees what DynamicCache gives."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:  # (B, H, capacity, D)
            self.device, self.is_initialized = key_states.device, True
            B, H, _, D = key_states.shape  # keys stored in the values' dtype: under bf16 autocast the
            # rotary embedding leaves keys fp32 and attention casts them to bf16 at every call anyway
            self.kbuf = key_states.new_empty(B, H, self.capacity, D, dtype=value_states.dtype)
            self.vbuf = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
        end = self.length + key_states.shape[-2]
        self.kbuf[:, :, self.length:end] = key_states
        self.vbuf[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
        self.keys, self.values = self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length]


class _Cache(DynamicCache):
    """The KV cache of one batch, preallocated for `capacity` positions per layer (`_Layer`)."""

    def __init__(self, capacity: int, prefix=None):
        Cache.__init__(self, layer_class_to_replicate=lambda: _Layer(capacity))
        if prefix is not None:  # prefix tuning: the virtual keys / values start every layer
            for i, layer in enumerate(prefix.layers):
                self.update(layer.keys, layer.values, i)


@contextmanager
def _cast_once(net):
    """Under bf16 autocast, every Linear's float32 weight cast to bf16 once for the whole generation
    (`train.precision.frozen_in`: autocast would cast a frozen weight again at every call; at batch 1
    that moves 1.5x the bytes of the fp32 matmul it replaces). Outputs are unchanged."""
    kind = next(net.parameters()).device.type
    if not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16):
        yield
        return
    with frozen_in(net, torch.bfloat16, frozen_only=False):
        yield


CUT_SHARE = 4
"""Finished rows leave the batch (and its cache) once >= 1/CUT_SHARE of it has finished: each cut
copies the cache, each finished row kept costs its share of a step."""


@torch.no_grad()
def _decode(net, prompts: list[list[int]], s: GenSettings, seeds: list[int], stops: list[int],
            pad: int, names: list[str] | None = None, virtual=None, on_token=None) -> list[list[int]]:
    """New token ids per prompt (the stop token included when it ended), KV-cached, finished rows
    dropped (in groups, `CUT_SHARE`). names: per row, the PEFT adapter it runs with ("__base__": none); `net` is then the
    PEFT model. virtual: the PEFT prompt/prefix-tuning model whose virtual tokens start each row
    (`net` is then its base model). on_token: called with each step's picks (a list, batch order)."""
    device = next(net.parameters()).device
    plain = names is None and virtual is None
    first = {}                                   # equal prompts (GRPO's G samples) are prefilled once
    expand = [first.setdefault(tuple(p), len(first)) for p in prompts] if plain else None
    if expand is not None and len(first) == len(prompts):
        expand = None
    rows = [list(p) for p in first] if expand else prompts
    cut = _shared_prefix(rows) if plain and not _windowed(net) else 0   # the prompts' common start, prefilled once
    ids, mask = _left_pad(rows, pad, device, start=cut)  # (B, T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)     # real tokens count from 0, as they would alone
    inputs = {"input_ids": ids}
    if virtual is not None:
        inputs, mask, pos = _with_virtual(virtual, ids, mask)
    B, width = mask.shape                        # width: virtual tokens (prompt / prefix tuning) included
    cache = _Cache(width + s.max_new_tokens, inputs.pop("past_key_values", None))
    full = torch.cat([mask, mask.new_ones(B, s.max_new_tokens)], dim=1)  # (B, width + n): each step's mask, sliced
    # packed bf16 weights of its own: the prefill runs through it too, no other bf16 copy is needed;
    # otherwise built inside _cast_once: under bf16 the lean step takes the weights cast once, no copy
    packed = _packed(net) if plain and _bf16(net) and can_pack(device) else None
    with nullcontext() if packed is not None else _cast_once(net):
        lean = packed or (_lean(net, pack=False, rows=len(prompts)) if plain else None)
        with torch.inference_mode():  # less per-operator work than no_grad (a tenth of a batch-1 step)
            return _steps(net, inputs, cache, mask, full, pos, prompts, s, seeds, stops, pad, names, on_token, lean,
                          expand, cut)


def cache_kwarg(net) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.24 (`past_key_values`
    warns there and goes in 5.40), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(_net(net)).forward).parameters else "past_key_values"


LEAN = True
"""Decode with `lean_decode.LeanDecoder` where it covers the model (False: transformers' forward)."""


def lean_applies(model) -> bool:
    """A model whose base and tuned answers both decode through the lean step: its architecture is
    covered and its adapter merges (the tuned side merged, the base side with adapters off). Such
    a model answers base and tuned in two lean streams rather than one mixed stream through
    transformers' forward with per-row adapters (`adapter_on`)."""
    return LEAN and can_merge(model) and LeanDecoder.covers(_net(model))


def _bf16(net) -> bool:
    """Generation runs under bf16 autocast now."""
    kind = next(net.parameters()).device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16


def _lean(net, pack: bool = True, rows: int = 0):
    """The lean decoding step for `net`, in the dtype its matmuls run in now (bf16 under bf16
    autocast; packed where `lean_decode.can_pack`), wrapped to run outside autocast (its weights are
    cast once); None where it does not apply. `.packed`: it also runs the prefill. rows: the batch
    it decodes, for fp32 weights laid out for MKL's packed sgemm (where a copy fits in memory)."""
    if not LEAN:
        return None
    kind = next(net.parameters()).device.type
    dtype = torch.bfloat16 if _bf16(net) else next(net.parameters()).dtype
    rows = rows if dtype == torch.float32 and rows >= MKL_MIN_ROWS and room_to_pack(net, nbytes=4) else 0
    dec = LeanDecoder.build(net, dtype, pack=pack, rows=rows)
    if dec is None:
        return None

    def step(tokens, positions, mask, cache):
        with torch.autocast(kind, enabled=False):
            return dec.step(tokens, positions, mask, cache)
    step.packed = dec.pack
    return step


_KEPT: dict | None = None
"""Packed decoders kept for reuse inside `keep_decoders` (None outside): id(net) -> (a weak
reference to net, weights key, step)."""


@contextmanager
def keep_decoders():
    """`with keep_decoders():` a packed bf16 decoder (`_lean`) built for a model is kept and reused by
    every later batch and call inside, instead of one build per batch (~0.15 s for the embedded
    model: the bf16 cast and oneDNN's re-layout of every weight; at batch 1 a tenth of a 64-token
    answer). For callers whose weights stay fixed inside: one `generate_many` call, a chat session
    (each turn's first token comes that much sooner). A weight that is replaced or changed in place
    (its version counter moves: optimizer steps, `load_state_dict`, `merge_adapter`'s layers switch
    state) is noticed and the decoder rebuilt; a write through `.data` is not, hence the scope.
    Nested scopes share the outermost one's decoders; they are dropped when it ends."""
    global _KEPT
    outer = _KEPT is not None
    if not outer:
        _KEPT = {}
    try:
        yield
    finally:
        if not outer:
            _KEPT = None


def _weights_key(net) -> tuple:
    """What a kept decoder was built from: each parameter's storage and version counter, and each
    adapter layer's merged / switched-off state (PEFT merges through `.data`, which moves no counter)."""
    params = tuple((p.data_ptr(), p._version) for p in net.parameters())
    states = tuple((tuple(getattr(m, "merged_adapters", ()) or ()), bool(getattr(m, "disable_adapters", False)))
                   for m in net.modules() if hasattr(m, "merged_adapters"))
    return params, states


def _packed(net):
    """The packed bf16 decoder for `net` (`_lean`): the one kept in `keep_decoders` if its weights
    are unchanged, else a new one where a packed copy fits in memory (`room_to_pack`); None otherwise."""
    if _KEPT is None:
        return _lean(net) if room_to_pack(net) else None
    key, kept = _weights_key(net), _KEPT.get(id(net))
    if kept is not None and kept[0]() is net and kept[1] == key:
        return kept[2]
    _KEPT.pop(id(net), None)                      # its memory back before the new copy is made
    step = _lean(net) if room_to_pack(net) else None
    if step is not None:
        _KEPT[id(net)] = (weakref.ref(net), key, step)
    return step


def _steps(net, inputs, cache, mask, full, pos, prompts, s, seeds, stops, pad, names, on_token, lean=None,
           expand=None, cut: int = 0):
    """_decode's prefill and decoding steps (see there); lean: the decoding step to use after the
    prefill instead of the model's forward (`_lean`); expand: per prompt, its row of the prefill
    (equal prompts prefilled once, then each row gets its own copy of the cache)."""
    device = mask.device
    mix = {"adapter_names": names} if names is not None else {}
    ckw = cache_kwarg(net)
    if cut:  # the prompts' common start (the template's system turn) computed once, its KV copied to each row
        _prefill_prefix(net, lean, inputs["input_ids"][:1, :cut], inputs["input_ids"].shape[0], cache, ckw)
        inputs = {"input_ids": inputs["input_ids"][:, cut:]}
    if getattr(lean, "packed", False):
        logits = lean(inputs["input_ids"], pos[:, cut:], mask, cache)       # (B, V)
    else:
        logits = net(**inputs, **{ckw: cache}, attention_mask=mask, position_ids=pos[:, cut:], use_cache=True,
                     logits_to_keep=1, **mix).logits[:, -1].float()  # (B, V)
    if expand is not None:
        k = torch.tensor(expand, device=device)
        cache.batch_select_indices(k)
        logits, mask, full, pos = logits[k], mask[k], full[k], pos[k]
    B, width = mask.shape
    procs = processors(s)
    gens = [torch.Generator(device=device).manual_seed(sd) for sd in seeds] if s.sample else None
    seqs = [list(p) for p in prompts] if procs else None  # per-row history, unpadded, for the processors
    rows = list(range(B))                        # original row of each batch row
    live = [True] * B                            # per batch row: still answering
    new: list[list[int]] = [[] for _ in prompts]
    next_pos = pos[:, -1:] + 1                   # (B, 1)
    stop_set = set(stops)
    for step in range(s.max_new_tokens):
        picks = _pick(logits, live, [seqs[r] for r in rows] if seqs else None, procs,
                      [gens[r] for r in rows] if gens else None, pad)
        if on_token is not None:
            on_token([t for t, ok in zip(picks, live) if ok])
        for b, (r, t) in enumerate(zip(rows, picks)):
            if live[b]:
                new[r].append(t)
                if seqs:
                    seqs[r].append(t)
                live[b] = t not in stop_set
        n_live = sum(live)
        if not n_live or step + 1 == s.max_new_tokens:
            break
        tokens = torch.tensor(picks, device=device)[:, None]  # (B, 1)
        if len(rows) - n_live >= max(1, len(rows) // CUT_SHARE):  # cut finished rows out of batch and cache
            keep = [b for b, ok in enumerate(live) if ok]
            k = torch.tensor(keep, device=device)
            cache.batch_select_indices(k)
            full, tokens, next_pos = full[k], tokens[k], next_pos[k]
            rows, live = [rows[b] for b in keep], [True] * len(keep)
            if names is not None:
                mix = {"adapter_names": [names[r] for r in rows]}
        width += 1
        if lean is not None:
            logits = lean(tokens, next_pos, full[:, :width], cache)
        else:
            logits = net(input_ids=tokens, attention_mask=full[:, :width], position_ids=next_pos,
                         **{ckw: cache}, use_cache=True, **mix).logits[:, -1].float()
        next_pos = next_pos + 1
    return new


SHARED_MIN = 8
"""Prompts whose common start is at least this many tokens prefill it once (`_shared_prefix`)."""


def _shared_prefix(prompts: list[list[int]]) -> int:
    """How many first tokens every prompt shares, to prefill once: P >= SHARED_MIN (SmolLM2's template
    puts the same 24-token system turn before every user turn), at most the shortest prompt's length
    - 1 (every row's last token is prefilled with its batch: its logits start the answer); 0 for
    one prompt or a shorter common start."""
    if len(prompts) < 2:
        return 0
    shortest = min(map(len, prompts))
    P = next((i for i in range(shortest) if any(p[i] != prompts[0][i] for p in prompts)), shortest)
    P = min(P, shortest - 1)
    return P if P >= SHARED_MIN else 0


def _windowed(net) -> bool:
    """Some of `net`'s layers attend within a sliding window. Transformers measures the window in
    cache columns, so padding between a row's common start and the rest of its prompt
    (`_left_pad(start=)`) would push the start out of the window early; such models keep plain
    left padding."""
    cfg = getattr(net, "config", None)
    if cfg is None:
        return False
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        return True
    return bool(getattr(cfg, "sliding_window", None)) and getattr(cfg, "use_sliding_window", True) is not False


@torch.no_grad()
def _prefill_prefix(net, lean, start: torch.Tensor, rows: int, cache, ckw: str):
    """Fill columns [0, P) of the cache's `rows` rows from one forward of the common start (1, P)
    (`_left_pad(..., start=P)` put it in those columns of every row)."""
    P = start.shape[1]
    pc = _Cache(P)
    ones = start.new_ones(1, P)
    pos = torch.arange(P, device=start.device)[None]
    if getattr(lean, "packed", False):
        lean(start, pos, ones, pc)
    else:
        net(input_ids=start, attention_mask=ones, position_ids=pos, **{ckw: pc}, use_cache=True, logits_to_keep=1)
    for i, layer in enumerate(pc.layers):
        cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), i)


def _pick(logits: torch.Tensor, live: list[bool], seqs, procs, gens, pad: int) -> list[int]:
    """Next token per row from (B, V) logits: argmax, or a draw after the processors (`draw`).
    Processors that read a row's history (repetition penalty, n-gram ban) run row by row on its own
    unpadded history, as it would alone; the others on the whole batch. Finished rows (live False)
    still in the batch get `pad` without touching their generator."""
    if not procs and gens is None:  # argmax's first-maximum index, twice as fast on a CPU; bf16 logits (the lean
        return logits.max(-1).indices.tolist()  # step's) give the same index as their float32 copy would
    scores = logits.float()
    rows = [b for b in range(len(live)) if live[b]]
    for p in procs:
        if isinstance(p, HISTORY):
            for b in rows:
                scores[b:b + 1] = p(torch.tensor([seqs[b]], device=logits.device), scores[b:b + 1])
        else:
            scores = p(None, scores)
    picks = scores.max(-1).indices if gens is None else draw(scores, gens, rows)
    picks = picks.tolist()
    return [t if ok else pad for t, ok in zip(picks, live)]


HISTORY = (RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor)
"""Processors that read each row's tokens so far."""


def draw(scores: torch.Tensor, gens: list, rows: list[int] | None = None) -> torch.Tensor:
    """One token per row of (B, V) scores from softmax(scores), by inverse transform: row b's
    generator draws one uniform u and the token is the first whose cumulative probability (float64)
    exceeds u x the total; a zero-probability token is never drawn. rows: which rows draw (the
    others' generators are not touched; they get token 0). One cumulative sum for the batch instead
    of `torch.multinomial`'s V exponential draws per row (a fifth of a batch-24 decoding step)."""
    rows = list(range(scores.shape[0])) if rows is None else rows
    u = torch.zeros(scores.shape[0], 1, dtype=torch.float64, device=scores.device)
    for b in rows:
        u[b, 0] = torch.rand((), generator=gens[b], dtype=torch.float64, device=gens[b].device)
    cdf = torch.softmax(scores.float(), dim=-1).double().cumsum_(-1)     # (B, V)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=scores.shape[-1] - 1)
