"""What a chat template does, found by rendering probe chats: `slimtune data check-template`.

Each probe (multi-turn with and without a system prompt, reasoning, tools) is rendered through
render_chat and shown with its trained tokens marked; `detect` names the behaviours that decide
what is trained: a default system prompt injected, earlier turns rewritten, what follows the last
turn (a generation header, eos), the end-of-turn token against eos, where the system prompt goes,
and whether tools and reasoning are rendered. `summary` is the one line `data stats` prints.
"""

from __future__ import annotations

import re

from ..errors import DataError
from .formats import Chat
from .render import (SENTINEL, special_strings, apply_template, turn_span, end_of_turn_strings, reasoning_of,
                     render_chat)
from .tools import highlight

SYSTEM = "Answer in one short sentence."
MULTI = [{"role": "user", "content": "Hello! Who are you?"},
         {"role": "assistant", "content": "I am a small assistant."},
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."}]
REASONING = [{"role": "user", "content": "What is 2 + 2?"},
             {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two makes four."},
             {"role": "user", "content": "And 3 + 3?"},
             {"role": "assistant", "content": "6.", "reasoning_content": "Three plus three makes six."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CHAT = Chat([{"role": "user", "content": "What is the weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "Sunny, 21 C", "tool_call_id": "call_0", "name": "get_weather"},
                  {"role": "assistant", "content": "It is sunny and 21 C in Paris."}], TOOLS)
PROBES = {"multi-turn with a system prompt": [{"role": "system", "content": SYSTEM}] + MULTI,
          "multi-turn without a system prompt": MULTI,
          "reasoning (reasoning_content)": REASONING,
          "tools (tools, tool_calls, a tool result)": TOOL_CHAT}


def _try(fn, *args, **kw):
    try:
        return fn(*args, **kw), None
    except DataError as e:
        return None, str(e)


def _default_system(tok) -> str:
    """Text the template writes before a lone user message, less tags and role names."""
    text = apply_template(tok, [{"role": "user", "content": SENTINEL}])
    before = text[: text.find(SENTINEL)]
    for s in special_strings(tok):
        before = before.replace(s, "\0")
    role = r"^\s*(system|user|assistant|model|human)\b"
    words = " ".join(re.sub(role, "", chunk, flags=re.I) for chunk in before.split("\0"))
    words = " ".join(words.split())
    return f"injected ({words[:70]!r})" if sum(c.isalpha() for c in words) >= 12 else "none"


def _system_placement(tok) -> str:
    text = apply_template(tok, [{"role": "system", "content": "SYSPROBE"}, {"role": "user", "content": SENTINEL}])
    if "SYSPROBE" not in text:
        return "dropped (the template renders no system message)"
    between = text[text.find("SYSPROBE") + 8: text.find(SENTINEL)]
    own = any(s in between for s in special_strings(tok)) or re.search(r"\buser\b", between, re.I)
    return "own turn" if own else "folded into the first user turn"


def _rewritten(tok, chat) -> bool:
    """Does an earlier assistant turn render differently in the whole chat than as the last turn?"""
    full, closers = apply_template(tok, chat, tools=getattr(chat, "tools", None)), end_of_turn_strings(tok)
    tools = getattr(chat, "tools", None)
    for i, m in enumerate(chat[:-1]):
        if m["role"] == "assistant":
            s, e = turn_span(tok, full, list(chat), i, 0, closers, tools)
            alone = apply_template(tok, list(chat[: i + 1]), tools=tools)
            s2, e2 = turn_span(tok, alone, list(chat[: i + 1]), i, 0, closers, tools)
            if full[s:e] != alone[s2:e2]:
                return True
    return False


def _after_last(tok) -> str:
    full = apply_template(tok, MULTI)
    _, end = turn_span(tok, full, MULTI, len(MULTI) - 1, 0, end_of_turn_strings(tok), None)
    tail = full[end:].strip()
    if not tail:
        return "nothing"
    if tail == (tok.eos_token or ""):
        return f"eos {tail} (not trained)"
    return f"generation header {tail!r} (not trained)"


def _end_of_turn(tok) -> str:
    closers = " / ".join(end_of_turn_strings(tok))
    eos = tok.eos_token
    return f"{closers} (= eos)" if eos and closers == eos else f"{closers} (eos is {eos})"


def _tools(tok) -> str:
    _, err = _try(render_chat, TOOL_CHAT, tok)
    if err is None:
        return "yes"
    return "no (ignored)" if "ignores `tools`" in err else "no (the template fails on them)"


def _reasoning(tok) -> str:
    full, err = _try(apply_template, tok, REASONING)
    if err:
        return f"no (template failed: {err})"
    shown = [reasoning_of(m) in full for m in REASONING if m["role"] == "assistant"]
    if all(shown):
        return "yes, every turn"
    if shown[-1]:
        return "yes, earlier turns drop it"
    return "no (not rendered)"


def _inline_think(tok) -> str:
    chat = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "<think>\nTwo plus two makes four.\n</think>\n\n4."}]
    full, err = _try(apply_template, tok, chat)
    if err:
        return f"? (template failed: {err})"
    if "Two plus two makes four." in full:
        return "kept in the last turn"
    return "stripped from every turn (train with data.train_reasoning=false)"


def detect(tok) -> dict[str, str]:
    """Behaviour name -> what this tokenizer's template does ('?: error' where a probe failed)."""
    checks = {"default system prompt": _default_system, "system prompt": _system_placement,
              "earlier turns rewritten": lambda t: "yes" if any(_rewritten(t, c) for c in (MULTI, REASONING)) else "no",
              "after the last turn": _after_last, "end of turn": _end_of_turn,
              "tools": _tools, "reasoning": _reasoning, "<think> in content": _inline_think}
    out = {}
    for name, fn in checks.items():
        val, err = _try(fn, tok)
        out[name] = val if err is None else f"? ({err})"
    return out


def summary(tok) -> str:
    """One line: the detected behaviours, as `data stats` prints it."""
    return "; ".join(f"{k}: {v}" for k, v in detect(tok).items())


def report(tok, color: bool = False) -> str:
    """Every probe rendered with its trained tokens marked, then the detected behaviours."""
    mark = "green" if color else "[[ ]]"
    parts = [f"Trained tokens in {mark}; train_on=assistant."]
    for name, chat in PROBES.items():
        res, err = _try(render_chat, chat, tok)
        body = highlight({"input_ids": res[0], "labels": res[1]}, tok, color) if err is None else f"refused: {err}"
        parts.append(f"--- {name}\n{body.rstrip()}")
    parts.append("--- detected\n" + "\n".join(f"  {k:<24} {v}" for k, v in detect(tok).items()))
    return "\n\n".join(parts)
