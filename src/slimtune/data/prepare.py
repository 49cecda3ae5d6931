"""Config -> rendered train / held-out / general-prompt examples, with their statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import DataCfg
from ..errors import DataError
from .formats import Messages, load_chats
from .tools import RenderStats, mix, render_all, split


@dataclass
class Prepared:
    train: list[dict]
    val: list[dict]
    general: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def read_chats(spec: str, fmt: str = "auto", system_prompt: str | None = None, seed: int = 0) -> list[Messages]:
    """One file, 'builtin:NAME', 'chitchat[:N]', or a weighted list 'a.jsonl:3,b.jsonl:1'."""
    if spec.startswith("chitchat"):
        from .formats import load_chitchat
        n = spec.partition(":")[2]
        return load_chitchat(int(n) if n else None, system_prompt)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and not parts[0].rpartition(":")[2].replace(".", "").isdigit():
        return load_chats(parts[0], fmt, system_prompt)
    return mix(parts, seed=seed, fmt=fmt, system_prompt=system_prompt, log=lambda *_: None)


def prepare(cfg: DataCfg, tokenizer, seed: int = 0) -> Prepared:
    if not cfg.train:
        raise DataError("no training data: set data.train (a JSONL file, or builtin:instructions)")
    chats = read_chats(cfg.train, cfg.format, cfg.system_prompt, seed)
    if cfg.val:
        train_chats, val_chats = chats, load_chats(cfg.val, cfg.format, cfg.system_prompt)
    else:
        train_chats, val_chats = split(chats, cfg.val_fraction, seed)
    if cfg.max_examples:
        train_chats = train_chats[: cfg.max_examples]
    kw = dict(train_on=cfg.train_on, max_length=cfg.max_length, train_reasoning=cfg.train_reasoning)
    train, st = render_all(train_chats, tokenizer, drop_untrained=cfg.drop_untrained, source=cfg.train, **kw)
    val, vst = render_all(val_chats, tokenizer, source=cfg.val or "held-out split", **kw)
    if not train:
        raise DataError(f"{cfg.train}: no example has trained tokens left (max_length={cfg.max_length})")
    general: list[dict] = []
    if cfg.general_prompts:
        general, _ = render_all(load_chats(cfg.general_prompts), tokenizer, source=cfg.general_prompts, **kw)
    return Prepared(train, val, general, {"train": st.summary(), "val": vst.summary()})


__all__ = ["Prepared", "prepare", "RenderStats"]
