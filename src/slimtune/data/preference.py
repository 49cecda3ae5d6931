"""Preference data in TRL's shapes, rendered by the chat template into token ids.

Paired rows (DPO, IPO, ORPO, SimPO):

    {"prompt": [{"role": "user", "content": "..."}] | "text",
     "chosen": [{"role": "assistant", "content": "..."}] | "text",
     "rejected": [...] | "text"}

(without "prompt", chosen and rejected are whole chats and the prompt is their shared first
turns). Unpaired rows (KTO): {"prompt", "completion", "label": true | false}; KTO also takes a
paired file, each pair giving a desirable and an undesirable row.

A text prompt is one user turn, a text completion one assistant turn. Each (prompt, completion)
is rendered by `render_chat` with the completion as the last assistant turn: the scored tokens
are that turn's content and its end-of-turn token, exactly what SFT trains. Chosen and rejected
share the prompt's tokens:

    {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...], "where": "file:line"}
    {"prompt_ids": [...], "completion_ids": [...], "label": True, "where": "file:line"}

Long rows keep their prompt and lose the end of the completion (max_length counts prompt +
completion); a completion truncated to nothing is an error (or dropped and counted).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import DataError
from .formats import ROLES, Messages
from .prepare import Prepared
from .reader import load_chats, read_rows
from .render import IGNORE, render_chat
from .tools import render_all

PAIRED_KEYS = ("chosen", "rejected")
UNPAIRED_KEYS = ("completion", "label")


@dataclass
class PrefStats:
    rows: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)
    """file:line of rows whose completion max_length cut to nothing (data.drop_untrained)."""

    def summary(self) -> dict:
        return {"rows": self.rows, "truncated": self.truncated, "dropped": len(self.dropped),
                "dropped_where": self.dropped[:10]}


def _messages(value, key: str, path: str, line: int, role: str | None = None) -> Messages:
    """A text (one `role` turn) or a list of {role, content} turns, validated."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty text", path=path, line=line, field=key)
        return [{"role": role or "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError("expected a text or a non-empty list of {role, content}", path=path, line=line, field=key)
    msgs = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError("each turn needs 'role' and 'content'", path=path, line=line, field=where)
        if m["role"] not in ROLES:
            raise DataError(f"unknown role {m['role']!r}; use one of {', '.join(ROLES)}",
                            path=path, line=line, field=f"{where}.role")
        if not isinstance(m["content"], str):
            raise DataError("content must be a string", path=path, line=line, field=f"{where}.content")
        msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


def _completion(value, key: str, path: str, line: int) -> Messages:
    msgs = _messages(value, key, path, line, role="assistant")
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise DataError("a completion must be one assistant turn", path=path, line=line, field=key)
    if not msgs[0]["content"].strip():
        raise DataError("empty completion: nothing to score", path=path, line=line,
                        field=key if isinstance(value, str) else f"{key}[0].content")
    return msgs


def _prompt(value, path: str, line: int, system_prompt: str | None) -> Messages:
    msgs = _messages(value, "prompt", path, line)
    if msgs[-1]["role"] == "assistant":
        raise DataError("the prompt ends with an assistant turn; it must end with the user turn the "
                        "completion answers", path=path, line=line, field=f"prompt[{len(msgs) - 1}]")
    if any(m["role"] == "system" for m in msgs[1:]):
        raise DataError("a system message may only come first", path=path, line=line, field="prompt")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def split_implicit_prompt(row: dict, path: str, line: int) -> dict:
    """{"chosen": chat, "rejected": chat} -> {"prompt", "chosen", "rejected"}: the shared first
    turns are the prompt, the differing last assistant turns the completions (TRL's extract_prompt)."""
    c = _messages(row["chosen"], "chosen", path, line)
    r = _messages(row["rejected"], "rejected", path, line)
    if len(c) < 2 or len(r) < 2 or c[:-1] != r[:-1]:
        raise DataError("without a 'prompt', chosen and rejected must be chats that share every turn "
                        "but the last", path=path, line=line, field="rejected")
    return {"prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]}


def score_ids(prompt: Messages, answer: Messages, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one answer: the chat rendered with the answer as its last
    assistant turn; the completion is that turn's trained tokens (content + end-of-turn)."""
    ids, labels = render_chat(prompt + answer, tokenizer, train_on="last")
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    last = max(i for i, lab in enumerate(labels) if lab != IGNORE)
    return ids[:first], ids[first:last + 1]


def _fit(prompt_ids: list[int], comp: list[int], max_length: int | None, key: str, path, line) -> list[int]:
    if max_length is None or len(prompt_ids) + len(comp) <= max_length:
        return comp
    keep = max_length - len(prompt_ids)
    if keep <= 0:
        raise DataError(f"the prompt takes {len(prompt_ids)} tokens, max_length={max_length} leaves nothing "
                        "of the completion; raise data.max_length or shorten the prompt",
                        path=path, line=line, field=key)
    return comp[:keep]


def render_pair(row: dict, tokenizer, max_length: int | None = None, path: str = "?", line: int = 1,
                system_prompt: str | None = None) -> tuple[dict, bool]:
    """One paired row -> ({prompt_ids, chosen_ids, rejected_ids, where}, truncated?)."""
    if "prompt" not in row:
        row = split_implicit_prompt(row, path, line)
    prompt = _prompt(row["prompt"], path, line, system_prompt)
    chosen = _completion(row["chosen"], "chosen", path, line)
    rejected = _completion(row["rejected"], "rejected", path, line)
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise DataError("chosen and rejected are identical: the pair teaches nothing", path=path, line=line,
                        field="rejected")
    p_ids, c_ids = score_ids(prompt, chosen, tokenizer)
    p2_ids, r_ids = score_ids(prompt, rejected, tokenizer)
    if p_ids != p2_ids:
        raise DataError("the chat template renders the prompt differently before chosen and rejected",
                        path=path, line=line, field="prompt")
    c_fit = _fit(p_ids, c_ids, max_length, "chosen", path, line)
    r_fit = _fit(p_ids, r_ids, max_length, "rejected", path, line)
    out = {"prompt_ids": p_ids, "chosen_ids": c_fit, "rejected_ids": r_fit, "where": f"{path}:{line}"}
    return out, (len(c_fit), len(r_fit)) != (len(c_ids), len(r_ids))


def render_unpaired(row: dict, tokenizer, max_length: int | None = None, path: str = "?", line: int = 1,
                    system_prompt: str | None = None) -> tuple[dict, bool]:
    """One KTO row -> ({prompt_ids, completion_ids, label, where}, truncated?)."""
    if not isinstance(row.get("label"), bool):
        raise DataError("label must be true (desirable) or false (undesirable)", path=path, line=line, field="label")
    if "prompt" not in row:
        raise DataError("missing; every row needs the prompt its completion answers", path=path, line=line,
                        field="prompt")
    prompt = _prompt(row["prompt"], path, line, system_prompt)
    comp = _completion(row["completion"], "completion", path, line)
    p_ids, c_ids = score_ids(prompt, comp, tokenizer)
    fit = _fit(p_ids, c_ids, max_length, "completion", path, line)
    return {"prompt_ids": p_ids, "completion_ids": fit, "label": row["label"], "where": f"{path}:{line}"}, \
        len(fit) != len(c_ids)


def detect_kind(row: dict, path: str, line: int) -> str:
    """What a file's row is: paired or unpaired (the objective's spec says which it reads)."""
    if all(k in row for k in PAIRED_KEYS):
        return "paired"
    if all(k in row for k in UNPAIRED_KEYS):
        return "unpaired"
    raise DataError(f"cannot tell a preference row from keys {sorted(row)}; expected "
                    "{prompt, chosen, rejected} (paired) or {prompt, completion, label} (KTO)", path=path, line=line)


def load_preferences(spec: str, tokenizer, kind: str = "paired", max_length: int | None = None,
                     system_prompt: str | None = None, drop_untrained: bool = True) -> tuple[list[dict], PrefStats]:
    """Read and render a preference file. kind: "paired" (DPO and co.) or "unpaired" (KTO: a
    paired file is unpaired, chosen -> label true, rejected -> false)."""
    path = str(spec)
    stats = PrefStats()
    out = []
    for line, row in read_rows(path):
        rk = detect_kind(row, path, line)
        try:
            if kind == "paired":
                if rk != "paired":
                    raise DataError("a paired objective (dpo, ipo, orpo, simpo) needs {prompt, chosen, rejected} "
                                    "rows; use loss.objective=kto for {prompt, completion, label}", path=path, line=line)
                ex, cut = render_pair(row, tokenizer, max_length, path, line, system_prompt)
                out.append(ex)
            elif rk == "unpaired":
                ex, cut = render_unpaired(row, tokenizer, max_length, path, line, system_prompt)
                out.append(ex)
            else:  # KTO from pairs
                ex, cut = render_pair(row, tokenizer, max_length, path, line, system_prompt)
                for key, label in (("chosen_ids", True), ("rejected_ids", False)):
                    out.append({"prompt_ids": ex["prompt_ids"], "completion_ids": ex[key], "label": label,
                                "where": ex["where"]})
        except DataError as e:
            if drop_untrained and "leaves nothing of the completion" in str(e):
                stats.dropped.append(f"{path}:{line}")
                continue
            raise
        stats.truncated += cut
    stats.rows = len(out)
    if not out:
        raise DataError(f"no preference row left (max_length={max_length})", path=path)
    return out, stats


def split_rows(rows: list[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Seeded train / held-out split; rows from one source line stay on one side (KTO pairs)."""
    keys = sorted({r["where"] for r in rows})
    random.Random(seed).shuffle(keys)
    n_val = int(round(len(keys) * val_fraction)) if val_fraction else 0
    if val_fraction and len(keys) > 1:
        n_val = max(1, n_val)
    val_keys = set(keys[:n_val])
    return [r for r in rows if r["where"] not in val_keys], [r for r in rows if r["where"] in val_keys]


def prepare_preferences(cfg, tokenizer, kind: str = "paired", seed: int = 0):
    """DataCfg -> Prepared(train, val, general, stats) of preference rows; general prompts stay
    SFT examples (KL to base on unrelated chats)."""

    if not cfg.train:
        raise DataError("no training data: set data.train (a preference JSONL file, or builtin:preferences)")
    kw = dict(kind=kind, max_length=cfg.max_length, system_prompt=cfg.system_prompt)
    rows, st = load_preferences(cfg.train, tokenizer, drop_untrained=cfg.drop_untrained, **kw)
    if cfg.val:
        train, (val, vst) = rows, load_preferences(cfg.val, tokenizer, **kw)
    else:
        train, val = split_rows(rows, cfg.val_fraction, seed)
        vst = None
    if cfg.max_examples:
        train = train[: cfg.max_examples]
    general: list[dict] = []
    if cfg.general_prompts:
        general, _ = render_all(load_chats(cfg.general_prompts), tokenizer, source=cfg.general_prompts,
                                train_on=cfg.train_on, max_length=cfg.max_length)

    def summary(rs, s):
        comp = [len(r.get("completion_ids") or r["chosen_ids"]) + len(r.get("rejected_ids", [])) for r in rs]
        return {**(s.summary() if s else {}), "rows": len(rs), "trained_tokens": sum(comp),
                "prompt_tokens": sum(len(r["prompt_ids"]) for r in rs)}

    return Prepared(train, val, general, {"train": summary(train, st), "val": summary(val, vst)})


def pairs_from_sft(chats: list[Messages], answer_all, log=lambda *_: None) -> tuple[list[dict], int]:
    """Preference pairs from SFT chats: prompt = every turn before the last assistant turn,
    chosen = the dataset's answer, rejected = the model's own greedy answer, from
    `answer_all(prompts, log) -> [text]` (all prompts at once, so they can be batched).
    Chats where the model already gives the dataset's answer are skipped (counted)."""
    lasts = [max(j for j, m in enumerate(chat) if m["role"] == "assistant") for chat in chats]
    prompts = [chat[:last] for chat, last in zip(chats, lasts)]
    answers = answer_all(prompts, log)
    rows, same = [], 0
    for chat, last, prompt, rejected in zip(chats, lasts, prompts, answers):
        chosen = chat[last]["content"]
        rejected = rejected.strip()
        if not rejected or rejected == chosen.strip():
            same += 1
            continue
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows, same
