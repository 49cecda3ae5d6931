"""A tuned run and its base, answering the same prompts: the one helper behind eval, compare and report.

    run folder --load_run--> tuned model (adapter merged while it answers)
               --as_base--> base (adapter switched off; a second model only for a full fine-tune)
    base answers --cached on disk per (base model files, dtype, settings, prompt)--> reused
    missing base answers + tuned answers --one stream of batches (LoRA family)--> both sides

The base of a run never changes, so its answers are computed once per prompt and settings and
kept in <cache>/gen/ (models.cache_dir()); `slimtune eval`, `compare` and `report` of every run on
that base then only generate the tuned side. The key holds the base's name, dtype, the size and
mtime of its files, the rendered prompt ids (so the tokenizer, template and system prompt), the
stop ids and every generation setting; a sampled answer's key also holds its seed.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager

from ..data.render import render_prompt
from ..generate import GenSettings, can_mix, generate_many, lean_applies, merged, stop_ids
from ..models import cache_dir, model_files
from ..readback import read_json
from ..runfolder import as_base, base_reference, load_run, run_kind
from ..utils import atomic_write_json

CACHE_VERSION = 1  # bump when generation changes what an answer is


class BaseVsTuned:
    """A run folder (or a plain model) loaded once, with its base at hand.

    `.model`, `.tok`, `.cfg` as `runfolder.load_run` gives them; `.is_run` False for a plain model
    (it has no base to compare with). `.ref` is None for adapters (switching them off is the
    base) and the separately loaded base for a full fine-tune, loaded when first asked for.
    """

    def __init__(self, run: str, dtype: str = "float32"):

        self.run, self.dtype = str(run), dtype
        self.is_run = run_kind(run) is not None
        self.model, self.tok, self.cfg = load_run(run, dtype)
        self._ref, self._ref_loaded = None, False

    @property
    def ref(self):
        if not self._ref_loaded:

            self._ref, self._ref_loaded = base_reference(self.model, self.cfg, self.dtype), True
        return self._ref

    @contextmanager
    def base(self):
        """`with pair.base() as base:` the base model (see runfolder.as_base)."""

        with as_base(self.model, self.ref) as base:
            yield base

    def answer_tuned(self, chats, settings: GenSettings, batch_size: int = 16, log=None) -> list[dict]:
        """The tuned model's answers (adapter merged while generating when the method allows)."""
        with merged(self.model):
            return generate_many(self.model, self.tok, chats, settings, batch_size, log)

    def answer_base(self, chats, settings: GenSettings, batch_size: int = 16, use_cache: bool = True,
                    log=None) -> list[dict]:
        """The base's answers; those in the cache are read, only the others generated (and stored).

        Answers read from the cache carry "cached": True.
        """
        if not self.is_run:
            raise ValueError(f"{self.run} is a plain model: it has no base")
        cache = AnswerCache(self.cfg.model.name, self.dtype, settings, self.tok, self.model) if use_cache else None
        found = cache.get(chats) if cache else [None] * len(chats)
        todo = [i for i, a in enumerate(found) if a is None]
        if todo:
            # a sampled answer's seed is its position in `chats`: generate the missing ones with their own
            fresh = self._base_generate([chats[i] for i in todo], settings, todo, batch_size, log)
            for i, a in zip(todo, fresh):
                found[i] = a
            if cache:
                cache.put([chats[i] for i in todo], todo, fresh)
        elif log:
            log(len(chats), len(chats))
        return found

    def answer_both(self, chats, settings: GenSettings, batch_size: int = 32, use_cache: bool = True,
                    log=None) -> tuple[list[dict], list[dict]]:
        """(base answers, tuned answers). Base answers come from the cache where they can; the
        missing ones share batches with the tuned ones when the adapter allows (generate.can_mix),
        which costs little more than the tuned side alone, unless both sides decode through the
        lean step (generate.lean_applies): two lean streams are then faster than one mixed one. Sampled answers use seed + position,
        as `answer_base` and `answer_tuned` do."""
        if not self.is_run:
            raise ValueError(f"{self.run} is a plain model: it has no base")
        cache = AnswerCache(self.cfg.model.name, self.dtype, settings, self.tok, self.model) if use_cache else None
        found = cache.get(chats) if cache else [None] * len(chats)
        todo = [i for i, a in enumerate(found) if a is None]
        # nothing to share a batch with, a method that cannot, or two lean streams are faster
        if not todo or not can_mix(self.model) or lean_applies(self.model):
            base = self.answer_base(chats, settings, batch_size, use_cache, log)
            return base, self.answer_tuned(chats, settings, batch_size, log)
        both = [chats[i] for i in todo] + list(chats)
        out = generate_many(self.model, self.tok, both, settings, batch_size, log,
                            adapter_on=[False] * len(todo) + [True] * len(chats),
                            seeds=[settings.seed + i for i in todo] + [settings.seed + i for i in range(len(chats))])
        fresh, tuned = out[:len(todo)], out[len(todo):]
        for i, a in zip(todo, fresh):
            found[i] = a
        if cache:
            cache.put([chats[i] for i in todo], todo, fresh)
        return found, tuned

    def _base_generate(self, chats, settings, positions, batch_size, log):
        if not settings.sample or positions == list(range(len(positions))):
            with self.base() as base:
                return generate_many(base, self.tok, chats, settings, batch_size, log)
        out = []  # sampled answers out of their original positions: one call per seed
        with self.base() as base:
            for c, i in zip(chats, positions):
                s = GenSettings(**{**settings.to_dict(), "seed": settings.seed + i})
                out += generate_many(base, self.tok, [c], s, batch_size)
        return out


class AnswerCache:
    """Base answers on disk: one JSON file per (base model, dtype, settings), one entry per prompt."""

    def __init__(self, model_name: str, dtype: str, settings: GenSettings, tokenizer, model):

        self.tok, self.settings = tokenizer, settings
        ident = {"v": CACHE_VERSION, "model": model_name, "files": model_files(model_name), "dtype": dtype,
                 "stops": stop_ids(tokenizer, model), "settings": {**settings.to_dict(), "seed": None}}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        self.path = cache_dir() / "gen" / f"{key}.json"
        self.ident = ident

    def _prompt_key(self, chat, position: int) -> str:

        seed = self.settings.seed + position if self.settings.sample else None
        return hashlib.sha256(json.dumps([render_prompt(chat, self.tok), seed]).encode()).hexdigest()[:24]

    def _load(self) -> dict:
        try:
            return read_json(self.path, "delete it: the base answers are generated again")["answers"]
        except (OSError, ValueError, KeyError):
            return {}  # no cache yet, or a broken one: generate again

    def get(self, chats) -> list[dict | None]:
        stored = self._load()
        return [({**stored[k], "cached": True} if (k := self._prompt_key(c, i)) in stored else None)
                for i, c in enumerate(chats)]

    def put(self, chats, positions, answers) -> None:

        stored = self._load()
        stored.update({self._prompt_key(c, i): a for c, i, a in zip(chats, positions, answers)})
        try:
            atomic_write_json(self.path, {**self.ident, "answers": stored})
        except OSError:
            pass  # a read-only cache only costs time


