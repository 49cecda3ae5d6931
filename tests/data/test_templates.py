"""Masks on the template families people bring (tests/templates.py): every trained span asserted
exactly, as text and as token ids, for multi-turn chats under `assistant` and `last`."""

import json

import pytest
from tiny import make_tokenizer

from slimtune import render_chat
from slimtune.data.formats import Chat
from slimtune.data.reader import load_chats
from slimtune.data.render import IGNORE
from slimtune.errors import DataError

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "No."}]
NO_THINK = [{"role": "system", "content": "Be brief. /no_think"}] + CHAT[1:]

# (family, chat) -> every assistant turn as trained, in order: its text in the FULL rendering +
# its end-of-turn token; nothing of headers, system blocks or what follows the last turn.
EXPECTED = {
    ("default_system", "multi"): ["Hi there.<|im_end|>", "No.<|im_end|>"],
    ("default_system", "nosys"): ["Hi there.<|im_end|>", "No.<|im_end|>"],
    # last turn gets an empty think block (trained: the model writes it at inference), earlier none
    ("qwen3", "multi"): ["Hi there.<|im_end|>", "<think>\n\n</think>\n\nNo.<|im_end|>"],
    ("qwen3", "nosys"): ["Hi there.<|im_end|>", "<think>\n\n</think>\n\nNo.<|im_end|>"],
    ("smollm3", "multi"): ["Hi there.<|im_end|>", "No.<|im_end|>"],
    ("smollm3", "nosys"): ["Hi there.<|im_end|>", "No.<|im_end|>"],
    # /no_think: the empty think block is part of the generation prompt, so it is prompt here too
    ("smollm3", "no_think"): ["Hi there.<|im_end|>", "No.<|im_end|>"],
    ("llama3_first", "multi"): ["Hi there.<|eot_id|>", "No.<|eot_id|>"],
    ("llama3_first", "nosys"): ["Hi there.<|eot_id|>", "No.<|eot_id|>"],
    ("llama31", "multi"): ["Hi there.<|eot_id|>", "No.<|eot_id|>"],
    ("llama31", "nosys"): ["Hi there.<|eot_id|>", "No.<|eot_id|>"],
    ("gemma", "multi"): ["Hi there.<end_of_turn>", "No.<end_of_turn>"],
    ("gemma", "nosys"): ["Hi there.<end_of_turn>", "No.<end_of_turn>"],
    # the template writes a space after [/INST] inside the assistant turn; the prompt ends at [/INST]
    ("mistral", "multi"): [" Hi there.</s>", " No.</s>"],
    ("mistral", "nosys"): [" Hi there.</s>", " No.</s>"],
    ("phi3", "multi"): ["Hi there.<|end|>", "No.<|end|>"],
    ("phi3", "nosys"): ["Hi there.<|end|>", "No.<|end|>"],
}
CHATS = {"multi": CHAT, "nosys": CHAT[1:], "no_think": NO_THINK}


def runs_of(ids, labels):
    """Contiguous runs of trained token ids."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            runs, cur = (runs + [cur] if cur else runs), []
        else:
            assert lab == i, "labels are aligned with input_ids"
            cur.append(i)
    return runs + ([cur] if cur else [])


def check(tok, chat, expected, **kw):
    """The trained runs are exactly `expected` (text and token ids); the whole sequence is the
    full rendering of the chat."""
    ids, labels = render_chat(chat, tok, **kw)
    runs = runs_of(ids, labels)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == expected
    assert runs == [tok(t, add_special_tokens=False)["input_ids"] for t in expected]
    full = tok.apply_chat_template(chat, tools=kw.get("tools") or getattr(chat, "tools", None), tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == full
    return ids, labels


@pytest.mark.parametrize("family, chat", list(EXPECTED), ids=[f"{f}-{c}" for f, c in EXPECTED])
@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_family_masks(family, chat, train_on):
    expected = EXPECTED[family, chat]
    check(make_tokenizer(family), CHATS[chat], expected[-1:] if train_on == "last" else expected, train_on=train_on)


def untrained_tail(tok, ids, labels):
    last = max(i for i, lab in enumerate(labels) if lab != IGNORE)
    return tok.decode(ids[last + 1:], skip_special_tokens=False)


def test_llama3_first_header_after_last_message_is_not_trained():
    tok = make_tokenizer("llama3_first")
    for train_on in ("assistant", "last"):
        ids, labels = render_chat(CHAT, tok, train_on=train_on)
        assert untrained_tail(tok, ids, labels) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.convert_tokens_to_ids("<|eot_id|>") != tok.eos_token_id


def test_phi3_eos_after_last_turn_is_not_trained():
    tok = make_tokenizer("phi3")
    ids, labels = render_chat(CHAT, tok)
    assert untrained_tail(tok, ids, labels) == "\n<|endoftext|>"
    assert tok.eos_token_id not in [i for i, lab in zip(ids, labels) if lab != IGNORE]


@pytest.mark.parametrize("family", ["gemma", "mistral", "llama31", "smollm3", "default_system"])
def test_system_text_never_trained(family):
    tok = make_tokenizer(family)
    ids, labels = render_chat(CHAT, tok)
    untrained = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE], skip_special_tokens=False)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE], skip_special_tokens=False)
    assert "Be brief." in untrained and "Be brief." not in trained
    assert "Cutting Knowledge" not in trained and "Metadata" not in trained and "named Tiny" not in trained


# ---------------------------------------------------------------- reasoning
REASONING = [{"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "4.", "reasoning_content": "Add two and two."},
             {"role": "user", "content": "And 3+3?"},
             {"role": "assistant", "content": "6.", "thinking": "Add three."}]


@pytest.mark.parametrize("train_on", ["assistant", "last"])
@pytest.mark.parametrize("family, train_reasoning, expected", [
    # Qwen3: the earlier turn loses its reasoning in the full rendering, the last keeps it
    ("qwen3", True, ["4.<|im_end|>", "<think>\nAdd three.\n</think>\n\n6.<|im_end|>"]),
    ("qwen3", False, ["4.<|im_end|>", "6.<|im_end|>"]),
    # SmolLM3 in /think mode (no system flag): every turn keeps its reasoning
    ("smollm3", True, ["<think>\nAdd two and two.\n</think>\n4.<|im_end|>", "<think>\nAdd three.\n</think>\n6.<|im_end|>"]),
    ("smollm3", False, ["4.<|im_end|>", "6.<|im_end|>"]),
], ids=["qwen3", "qwen3-answer-only", "smollm3", "smollm3-answer-only"])
def test_reasoning(family, train_reasoning, expected, train_on):
    tok = make_tokenizer(family)
    ids, labels = check(tok, REASONING, expected[-1:] if train_on == "last" else expected,
                        train_on=train_on, train_reasoning=train_reasoning)
    if not train_reasoning:  # the reasoning is still in the input, just not trained
        assert "Add three." in tok.decode(ids)


def test_reasoning_inline_in_content_is_split_by_the_template():
    chat = [REASONING[0], {"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n4."}]
    tok = make_tokenizer("qwen3")
    check(tok, chat, ["<think>\nAdd.\n</think>\n\n4.<|im_end|>"])
    check(tok, chat, ["4.<|im_end|>"], train_reasoning=False)


@pytest.mark.parametrize("family, system", [("default_system", None), ("smollm3", "/no_think")])
def test_reasoning_a_template_never_renders_is_refused(family, system):
    chat = ([{"role": "system", "content": system}] if system else []) + REASONING
    with pytest.raises(DataError, match="renders no reasoning for assistant turn"):
        render_chat(chat, make_tokenizer(family))


# ---------------------------------------------------------------- tools
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "content": "sunny", "tool_call_id": "1", "name": "get_weather"},
             {"role": "assistant", "content": "It is sunny."}]


@pytest.mark.parametrize("train_on", ["assistant", "last"])
@pytest.mark.parametrize("family, expected", [
    ("qwen3", ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
               "<think>\n\n</think>\n\nIt is sunny.<|im_end|>"]),
    ("llama31", ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is sunny.<|eot_id|>"]),
])
def test_tool_calls_trained_tool_results_not(family, expected, train_on):
    tok = make_tokenizer(family)
    ids, labels = check(tok, Chat(TOOL_CHAT, TOOLS), expected[-1:] if train_on == "last" else expected,
                        train_on=train_on)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert '"description": "Weather of a city"' in tok.decode(ids[:first])  # the tool list is prompt
    assert "sunny" in tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])


def test_tool_call_with_null_content_and_tools_argument():
    chat = [dict(m, content=None) if m.get("tool_calls") else m for m in TOOL_CHAT]
    check(make_tokenizer("llama31"), chat, ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                            "It is sunny.<|eot_id|>"], tools=TOOLS)


def test_template_that_ignores_tools_is_refused():
    with pytest.raises(DataError, match="ignores `tools`"):
        render_chat(Chat(TOOL_CHAT, TOOLS), make_tokenizer("chatml"))


def test_template_that_drops_tool_calls_is_refused():
    with pytest.raises(DataError, match="does not render the tool_calls of assistant turn 1"):
        render_chat(TOOL_CHAT, make_tokenizer("default_system"))


def test_messages_file_keeps_tools_reasoning_and_tool_turns(tmp_path):
    row = {"messages": [TOOL_CHAT[0], {"role": "assistant", "content": None, "tool_calls": [CALL],
                                       "reasoning_content": "Look it up."}] + TOOL_CHAT[2:], "tools": TOOLS}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(row) + "\n")
    (chat,) = load_chats(p)
    assert chat.tools == TOOLS
    assert chat[1] == {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": "Look it up."}
    assert chat[2] == TOOL_CHAT[2]
    check(make_tokenizer("qwen3"), chat,
          ['<think>\nLook it up.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
           "\n</tool_call><|im_end|>", "<think>\n\n</think>\n\nIt is sunny.<|im_end|>"])


@pytest.mark.parametrize("messages, field, match", [
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "A"}],
     "messages[1].content", "must follow an assistant turn with tool_calls"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     "messages[1].tool_calls[0]", "function.name"),
    ([{"role": "user", "content": "Hi", "reasoning_content": "x"}, {"role": "assistant", "content": "A"}],
     "messages[0].reasoning_content", "only assistant turns"),
])
def test_bad_tool_and_reasoning_fields_name_the_field(tmp_path, messages, field, match):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_chats(p)
    assert f"{p}:1" in str(e.value) and field in str(e.value)


# ---------------------------------------------------------------- edge cases and refusals
def _chatml(template):
    tok = make_tokenizer("chatml")
    tok.chat_template = template
    return tok


TURNS = ("{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content.split('</think>')[-1] -}}"
         "{%- if m.role != 'assistant' or not loop.last or keep_last -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
         "{%- endfor -%}")


def test_generation_header_that_opens_think_starts_the_turn_where_it_parts():
    # DeepSeek-R1 style: the generation prompt opens <think>, the history shows answers only.
    tok = _chatml("{%- set keep_last = true -%}" + TURNS +
                  "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}")
    check(tok, CHAT, ["Hi there.<|im_end|>", "No.<|im_end|>"])


def test_end_of_turn_string_inside_an_answer_is_not_the_end():
    chat = CHAT[:2] + [{"role": "assistant", "content": "Type <|im_end|> to stop."}]
    check(make_tokenizer("chatml"), chat, ["Type <|im_end|> to stop.<|im_end|>"])


def test_last_turn_left_open_is_refused():
    tok = _chatml("{%- set keep_last = false -%}" + TURNS)
    with pytest.raises(DataError, match="assistant turn 4 has no end-of-turn token"):
        render_chat(CHAT, tok)


def test_prompt_rewritten_by_what_follows_is_refused():
    # The last user message gets a tag only when it is last: the prompt at inference differs from
    # the same text in the whole chat, so the turn's start cannot be trusted.
    tok = _chatml("{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content -}}"
                  "{%- if loop.last and m.role == 'user' -%}{{- ' (answer now)' -}}{%- endif -%}"
                  "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
                  "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    with pytest.raises(DataError, match="renders the messages before assistant turn 2 differently"):
        render_chat(CHAT, tok)


def test_train_reasoning_refused_when_the_answer_cannot_be_separated():
    # The template writes content before the reasoning: no answer start after a reasoning block.
    tok = make_tokenizer("qwen3")
    tok.chat_template = ("{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content -}}"
                         "{%- if m.reasoning_content -%}{{- '<think>' + m.reasoning_content + '</think>' -}}{%- endif -%}"
                         "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
                         "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    check(tok, REASONING, ["4.<think>Add two and two.</think><|im_end|>", "6.<think>Add three.</think><|im_end|>"])
    with pytest.raises(DataError, match="cannot tell where the reasoning of assistant turn 1 ends"):
        render_chat(REASONING, tok, train_reasoning=False)


def test_fallback_start_is_a_token_boundary_of_the_prompt():
    # Qwen3 variant whose generation prompt always holds an empty think block (Jan-nano style): a
    # tool-call turn shares only '<t' with it character-wise (<think> vs <tool_call>); the turn
    # must start after the header's last whole token, not inside <tool_call>.
    from templates import QWEN3
    tok = make_tokenizer("qwen3")
    gen = "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    assert gen in QWEN3
    tok.chat_template = QWEN3.replace(gen, gen + "{{- '<think>\\n\\n</think>\\n\\n' -}}")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    check(tok, Chat(TOOL_CHAT, TOOLS), [call, "It is sunny.<|im_end|>"])
    check(tok, Chat(TOOL_CHAT, TOOLS), [call, "It is sunny.<|im_end|>"], train_reasoning=False)


@pytest.mark.parametrize("train_reasoning, expected", [
    (True, ["<think>\nAdd three.\n</think>\n\n6.<|im_end|>"]), (False, ["6.<|im_end|>"])])
def test_config_train_reasoning_reaches_the_mask(tmp_path, train_reasoning, expected):
    from slimtune.config import DataCfg
    from slimtune.data.prepare import prepare

    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"messages": REASONING}) + "\n")
    cfg = DataCfg(train=str(p), val_fraction=0, general_prompts=None, train_on="last", train_reasoning=train_reasoning)
    tok = make_tokenizer("qwen3")
    (ex,) = prepare(cfg, tok).train
    assert [tok.decode(r, skip_special_tokens=False) for r in runs_of(ex["input_ids"], ex["labels"])] == expected
