"""Render a chat through the tokenizer's own chat template into (input_ids, labels).

The one rendering used for training, evaluation, chat and merge checks. The chat is rendered
ONCE (`full`), and each assistant turn i is located in that text, so a template that rewrites
earlier turns (drops their reasoning), appends a generation header after the last message or
an eos after the last turn is masked as it really renders:

    full   = template(messages)
    start  = len(template(messages[:i], add_generation_prompt=True))   # end of the assistant header
    close  = first end-of-turn string after the turn's content in full   # <|im_end|>, <|eot_id|>, </s>...
    trained text of turn i = full[start : close end]

`start` is where inference starts generating, so the prompt part is tokenised exactly as
`render_prompt` tokenises it. (A template whose generation header is not a prefix of the full
rendering, e.g. one that writes `<think>` only in the header, starts the turn where the two
part, if the messages before the header render the same; else the chat is refused.) The
end-of-turn strings are found once per tokenizer by rendering a probe chat with sentinel
answers: the special token written right after each answer. The turn's content end is found by
rendering again with a sentinel appended to it, so a literal end-of-turn string inside an answer
is not taken for the end. Role headers, a default system prompt, text of other roles, a header
or eos written after the last turn and trailing newlines are never trained.

`{% generation %}` markers are not used: templates disagree on what they wrap (SmolLM3 wraps the
role header too), and one rule for every template keeps training equal to inference.

Reasoning (`reasoning_content` or `thinking` on a message) is handed to the template under both
names and trained as the template writes it; `train_reasoning=False` trains only the answer
(+ end of turn): the answer's start is found with a sentinel put in front of the content. Tools
(OpenAI shape: `tools`, assistant `tool_calls`, `tool` messages) are handed to the template;
tool-call turns are trained, tool results never. Whatever cannot be located is refused with a
DataError saying what the template did (the caller adds file:line).

Labels follow the Hugging Face convention: aligned with input_ids (the model shifts), -100 where
not trained.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

from ..errors import DataError

IGNORE = -100
REASONING_KEYS = ("reasoning_content", "thinking")
SENTINEL = "QZXSLIMTUNEPROBEQZX"  # plain letters: survives trim/strip/split in templates


@dataclass
class Segment:
    text: str
    trained: bool


def reasoning_of(message: dict) -> str:
    """The message's reasoning text (`reasoning_content` or `thinking`), '' when none."""
    return next((message[k] for k in REASONING_KEYS if isinstance(message.get(k), str) and message[k].strip()), "")


def _for_template(messages: list[dict]) -> list[dict]:
    """Copies of the messages with any reasoning under both names, for templates reading either."""
    out = []
    for m in messages:
        r = reasoning_of(m)
        out.append({**m, **{k: r for k in REASONING_KEYS}} if r else dict(m))
    return out


def apply_template(tokenizer, messages, add_generation_prompt=False, tools=None) -> str:
    if not messages:
        raise DataError("the chat starts with an assistant turn; a user turn must come before it")
    try:
        return tokenizer.apply_chat_template(_for_template(messages), tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises for templates that reject a role order, etc.
        raise DataError(f"the tokenizer's chat template failed on this chat: {e}") from None


def special_strings(tokenizer) -> set[str]:
    strings = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            strings.add(added.content)
    return {s for s in strings if s}


_CLOSERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_strings(tokenizer) -> tuple[str, ...]:
    """The special-token strings the template writes right after an assistant answer.

    Found by rendering [user, assistant S1, user, assistant S2] with sentinel answers and taking
    the special token that follows each (after optional whitespace): <|im_end|>, <|eot_id|>,
    <end_of_turn>, </s>, <|end|>... Cached per tokenizer and template.
    """
    template = tokenizer.chat_template
    cached = _CLOSERS.get(tokenizer)
    if cached and cached[0] == template:
        return cached[1]
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL + "1"},
             {"role": "user", "content": "Ok"}, {"role": "assistant", "content": SENTINEL + "2"}]
    text = apply_template(tokenizer, probe)
    specials = special_strings(tokenizer)
    found = []
    for tag in ("1", "2"):
        pos = text.find(SENTINEL + tag)
        rest = text[pos + len(SENTINEL) + 1:] if pos >= 0 else ""
        stripped = rest.lstrip()
        hit = max((s for s in specials if stripped.startswith(s)), key=len, default=None)
        if hit and hit not in found:
            found.append(hit)
    if not found:
        raise DataError("the chat template does not close assistant turns with an end-of-turn token, so a model "
                        f"trained on it never learns to stop (an answer is followed by {rest[:20]!r})")
    _CLOSERS[tokenizer] = (template, tuple(found))
    return tuple(found)


def _with_content(messages, i, content) -> list[dict]:
    return messages[:i] + [{**messages[i], "content": content}] + messages[i + 1:]


def _sentinel_at(tokenizer, full, messages, i, content, tools, exact: bool) -> int | None:
    """Render with turn i's content replaced by `content` (holding SENTINEL once); the sentinel's
    position if the text before it matches `full` (exact: and the rendering minus the sentinel
    IS `full`), else None."""
    probe = apply_template(tokenizer, _with_content(messages, i, content), tools=tools)
    k = probe.find(SENTINEL)
    if k < 0 or probe.count(SENTINEL) != 1 or probe[:k] != full[:k]:
        return None
    if exact and probe[:k] + probe[k + len(SENTINEL):] != full:
        return None
    return k


def _answer_start(tokenizer, full, messages, i, start, end, tools) -> int:
    """Where turn i's answer begins after any reasoning block (train_reasoning=False)."""
    content = messages[i].get("content") or ""
    head, sep, answer = content.rpartition("</think>")  # reasoning inline in content stays in front
    core = answer.lstrip()
    k = _sentinel_at(tokenizer, full, messages, i, head + sep + answer[: len(answer) - len(core)] + SENTINEL + core,
                     tools, exact=False)
    reasoning = reasoning_of(messages[i]).strip() or head.split("<think>")[-1].strip()
    if k is None or not start <= k <= end or (reasoning and reasoning in full[k:end]):
        raise DataError(f"cannot tell where the reasoning of assistant turn {i} ends in this chat template's "
                        "rendering; set data.train_reasoning=true to train it with the answer")
    return k


def _token_boundary(tokenizer, prefix: str, full: str, common: int) -> int:
    """The longest run of the generation prompt's tokens whose text starts `full` within its first
    `common` characters: the turn then starts on a token boundary of the inference prompt (a
    character-level split could cut `<tool_call>` after `<t`, shared with `<think>`)."""
    ids = _encode(tokenizer, prefix)
    for n in range(len(ids), -1, -1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if len(text) <= common and full.startswith(text):
            return len(text)
    return 0


def _content_ends(tokenizer, full, messages, turns, tools) -> dict[int, int]:
    """Where each of these assistant turns' content ends in `full`, from ONE rendering with a
    numbered sentinel appended to every non-empty content (one render per chat, not per turn);
    {} when the rendering minus the sentinels is not `full` (the template reacts to them)."""
    marks = {i: f"{SENTINEL}{i}Z" for i in turns if (messages[i].get("content") or "").strip()}
    if not marks:
        return {}
    probe = apply_template(tokenizer, [{**m, "content": m["content"] + marks[i]} if i in marks else m
                                  for i, m in enumerate(messages)], tools=tools)
    found = sorted((probe.find(mark), i) for i, mark in marks.items())
    if probe.count(SENTINEL) != len(marks) or found[0][0] < 0:
        return {}
    ends, shift, text = {}, 0, probe
    for pos, i in found:
        ends[i] = pos - shift
        shift += len(marks[i])
        text = text.replace(marks[i], "")
    return ends if text == full else {}


def turn_span(tokenizer, full, messages, i, prev_end, closers, tools,
               content_end: int | None = None) -> tuple[int, int]:
    """(start, end) of assistant turn i in `full`: its content (with the reasoning the template
    writes for it there), tool calls, and its end-of-turn string. content_end: where its content
    ends in `full`, if known (see _content_ends); else found with a sentinel."""
    prefix = apply_template(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
    start = len(os.path.commonprefix([prefix, full]))
    if start < len(prefix):
        # The generation header differs from the header in the whole chat (e.g. it opens <think>):
        # the turn starts where they part, provided everything before the header renders the same.
        before = apply_template(tokenizer, messages[:i], tools=tools)
        start = _token_boundary(tokenizer, prefix, full, start)
        if not (full.startswith(before) and start >= len(before)):
            raise DataError(f"the chat template renders the messages before assistant turn {i} differently "
                            "depending on what follows them, so the turn's start cannot be located")
    if start < prev_end or start >= len(full):
        raise DataError(f"cannot find where assistant turn {i} starts in the chat template's rendering "
                        "(the prompt before it overlaps the previous assistant turn)")
    content = messages[i].get("content") or ""
    if content_end is None and content.strip():  # skip the answer, so an end-of-turn string in it is not the end
        content_end = _sentinel_at(tokenizer, full, messages, i, content + SENTINEL, tools, exact=True)
    content_end = content_end if content_end is not None and content_end >= start else start
    hits = [(full.find(c, content_end), c) for c in closers]
    hits = [(p, c) for p, c in hits if p >= 0]
    if not hits:
        raise DataError(f"assistant turn {i} has no end-of-turn token ({' or '.join(closers)}) in the chat "
                        "template's rendering, so a model trained on it never learns to stop")
    pos, closer = min(hits)
    return start, pos + len(closer)


def _check_tools(tokenizer, full, messages, tools) -> None:
    if tools and apply_template(tokenizer, messages) == full:
        raise DataError("the chat template ignores `tools` (it renders nothing of them); use a model whose "
                        "template supports tool calling, or drop `tools` from the data")
    for i, m in enumerate(messages):
        text = m.get("content")
        if m["role"] == "tool" and isinstance(text, str) and text.strip() and text.strip() not in full:
            raise DataError(f"the chat template drops `tool` message {i} (its result is not in the rendering); "
                            "use a model whose template supports tool calling")


def _inline_reasoning(content) -> str:
    """The text of a <think>...</think> block written into the content, '' when none."""
    if not isinstance(content, str) or "</think>" not in content:
        return ""
    return content.rpartition("</think>")[0].split("<think>")[-1].strip()


def _check_turn(tokenizer, full, messages, i, start, end, tools, train_reasoning: bool = True) -> None:
    span, m = full[start:end], messages[i]
    for call in m.get("tool_calls") or []:
        name = (call.get("function") or call).get("name", "")
        if name and name not in span:
            raise DataError(f"the chat template does not render the tool_calls of assistant turn {i} "
                            f"(no {name!r} in the turn); use a model whose template supports tool calling")
    inline = _inline_reasoning(m.get("content")) if train_reasoning else ""
    if inline and inline not in span and inline not in apply_template(tokenizer, messages[: i + 1], tools=tools):
        raise DataError(f"the chat template drops the <think> block written in the content of assistant turn {i}, "
                        "even as the last turn (DeepSeek-R1's template strips reasoning from every assistant "
                        "turn), so it would not be trained; set data.train_reasoning=false to train the answers "
                        "only, or give a template that keeps it (model.chat_template)")
    reasoning = reasoning_of(m).strip()
    if reasoning and reasoning not in span and reasoning not in apply_template(tokenizer, messages[: i + 1], tools=tools):
        raise DataError(f"the chat template renders no reasoning for assistant turn {i}, even as the last turn "
                        "(it ignores reasoning_content/thinking, or a system flag like /no_think turns it off); "
                        "drop the reasoning, write it into the content as <think>...</think> if the model expects "
                        "that, or use a template that renders reasoning_content")


def chat_segments(messages: list[dict], tokenizer, train_on: str = "assistant", *,
                  tools: list | None = None, train_reasoning: bool = True) -> list[Segment]:
    """Split the full rendering of the chat into consecutive text pieces, each trained or not."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; use an instruct model's tokenizer")
    messages = list(messages)
    full = apply_template(tokenizer, messages, tools=tools)
    if train_on == "all":
        return [Segment(full, True)]
    _check_tools(tokenizer, full, messages, tools)
    closers = end_of_turn_strings(tokenizer)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = turns[-1:] if train_on == "last" else turns
    ends = _content_ends(tokenizer, full, messages, turns, tools)
    segments, pos = [], 0
    for i in turns:
        start, end = turn_span(tokenizer, full, messages, i, pos, closers, tools, ends.get(i))
        _check_turn(tokenizer, full, messages, i, start, end, tools, train_reasoning)
        if not train_reasoning:
            start = _answer_start(tokenizer, full, messages, i, start, end, tools)
        segments += [Segment(full[pos:start], False), Segment(full[start:end], True)]
        pos = end
    segments.append(Segment(full[pos:], False))
    return [s for s in segments if s.text]


def _encode(tokenizer, text: str) -> list[int]:
    # The template already wrote any BOS it wants; the tokenizer must not add another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(messages: list[dict], tokenizer, train_on: str = "assistant", max_length: int | None = None, *,
                tools: list | None = None, train_reasoning: bool = True) -> tuple[list[int], list[int]]:
    """Render one chat: `(input_ids, labels)`, two lists of the same length.

    train_on: "assistant" (every assistant turn), "last" (the last one), "all" (every token).
    Each trained assistant turn is its text in the full rendering (with the reasoning block the
    template writes for it there, and its tool calls) plus its end-of-turn token (<|im_end|>,
    <|eot_id|>...). tools: the chat's tool list; default `messages.tools` (see formats.Chat).
    train_reasoning=False leaves the reasoning block untrained. max_length truncates both lists
    from the right, so labels stay aligned.
    """
    if train_on not in ("assistant", "last", "all"):
        raise ValueError(f"train_on must be assistant, last or all, not {train_on!r}")
    tools = tools if tools is not None else getattr(messages, "tools", None)
    input_ids: list[int] = []
    labels: list[int] = []
    for seg in chat_segments(messages, tokenizer, train_on, tools=tools, train_reasoning=train_reasoning):
        ids = _encode(tokenizer, seg.text)
        input_ids += ids
        labels += ids if seg.trained else [IGNORE] * len(ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def render_prompt(messages: list[dict], tokenizer, *, tools: list | None = None) -> list[int]:
    """Token ids of a chat followed by the assistant header, ready to generate the next turn."""
    tools = tools if tools is not None else getattr(messages, "tools", None)
    return _encode(tokenizer, apply_template(tokenizer, list(messages), add_generation_prompt=True, tools=tools))
