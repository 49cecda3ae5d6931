"""More template families, written here from the shapes of real ones: the trained tokens must be
exactly each assistant turn and its end of turn, whatever marks the turns.

    zephyr     <|user|>\\n...</s>\\n<|assistant|>\\n...</s>\\n      eos ends each turn, a newline after it
    vicuna     plain "USER: ... ASSISTANT: ...</s>", no turn tokens at all, a default system line; its
               generation prompt ends "ASSISTANT:" without the space, so the model writes the space:
               it is trained (with byte-level BPE it is part of the first answer token, " 1")
    granite    <|start_of_role|>assistant<|end_of_role|>...<|end_of_text|>\\n, a dated default system
    phi4       <|im_start|>assistant<|im_sep|>...<|im_end|>
    command_r  <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>...<|END_OF_TURN_TOKEN|>
    generation_tags  ChatML with HF's {% generation %} ... {% endgeneration %} around each answer
    deepseek_r1  <｜Assistant｜>...<｜end▁of▁sentence｜>; the generation prompt opens a <think> block
               that the rendered history does not have, and history drops earlier reasoning
"""

import pytest
from test_render import MULTI, NO_SYSTEM_MULTI, SINGLE, expected, trained_runs
from tiny import FAMILIES, make_tokenizer

from slimtune import render_chat

ZEPHYR = (
    "{%- for m in messages -%}"
    "{{- '<|' + m.role + '|>\\n' + m.content + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

VICUNA = (
    "{%- if messages[0].role == 'system' -%}{%- set sys = messages[0].content -%}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set sys = 'A chat between a curious user and an artificial intelligence assistant.' -%}"
    "{%- set msgs = messages -%}{%- endif -%}"
    "{{- bos_token + sys + ' ' -}}"
    "{%- for m in msgs -%}"
    "{%- if m.role == 'user' -%}{{- 'USER: ' + m.content + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + m.content + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

GRANITE = (
    "{%- if messages[0].role == 'system' -%}{%- set sys = messages[0].content -%}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set sys = 'Knowledge Cutoff Date: April 2024.\\nToday\\'s Date: April 1, 2025.\\n"
    "You are Granite, developed by IBM.' -%}{%- set msgs = messages -%}{%- endif -%}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + sys + '<|end_of_text|>\\n' -}}"
    "{%- for m in msgs -%}"
    "{{- '<|start_of_role|>' + m.role + '<|end_of_role|>' + m.content + '<|end_of_text|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_of_role|>assistant<|end_of_role|>' -}}{%- endif -%}"
)

PHI4 = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '<|im_sep|>' + m.content + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant<|im_sep|>' -}}{%- endif -%}"
)

COMMAND_R = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- set tag = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>'}[m.role] -%}"
    "{{- '<|START_OF_TURN_TOKEN|>' + tag + m.content + '<|END_OF_TURN_TOKEN|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' -}}{%- endif -%}"
)

DEEPSEEK_R1 = (
    "{{- bos_token -}}"
    "{%- for m in messages if m.role == 'system' -%}{{- m.content -}}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<｜User｜>' + m.content -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set content = m.content.split('</think>')[-1] if '</think>' in m.content else m.content -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

GENERATION_TAGS = (  # HF's {% generation %} markers (for return_assistant_tokens_mask) around each answer
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- m.content + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

NEW = {
    "zephyr": dict(template=ZEPHYR, specials=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
                   eos="</s>", bos="<s>", pad="</s>", eot="</s>"),
    "vicuna": dict(template=VICUNA, specials=["<s>", "</s>"], eos="</s>", bos="<s>", pad="</s>", eot="</s>",
                   lead=" "),
    "granite": dict(template=GRANITE, specials=["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"],
                    eos="<|end_of_text|>", bos=None, pad="<|end_of_text|>", eot="<|end_of_text|>"),
    "phi4": dict(template=PHI4, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"],
                 eos="<|im_end|>", bos=None, pad="<|endoftext|>", eot="<|im_end|>"),
    "command_r": dict(template=COMMAND_R, specials=["<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>",
                                                    "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<PAD>"],
                      eos="<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", pad="<PAD>", eot="<|END_OF_TURN_TOKEN|>"),
    "generation_tags": dict(template=GENERATION_TAGS, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                            eos="<|im_end|>", bos=None, pad="<|endoftext|>", eot="<|im_end|>"),
    "deepseek_r1": dict(template=DEEPSEEK_R1, specials=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                                        "<｜User｜>", "<｜Assistant｜>"],
                        eos="<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>",
                        eot="<｜end▁of▁sentence｜>", added=["<think>", "</think>"]),
}
FAMILIES.update({k: {f: v for f, v in spec.items() if f not in ("eot", "lead")} for k, spec in NEW.items()})


@pytest.mark.parametrize("family", list(NEW))
@pytest.mark.parametrize("chat", [SINGLE, MULTI, NO_SYSTEM_MULTI], ids=["single", "multi", "multi_nosys"])
@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_trained_tokens_are_exactly_assistant_turns(family, chat, train_on):
    tok = make_tokenizer(family)
    ids, labels = render_chat(chat, tok, train_on=train_on)
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ids, labels)]
    lead = NEW[family].get("lead", "")
    assert runs == [lead + r for r in expected(chat, NEW[family]["eot"], train_on)]
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(chat, tokenize=False)


def test_a_template_that_strips_inline_reasoning_everywhere_is_refused_unless_answers_only():
    """DeepSeek-R1's template drops `<think>...</think>` from every assistant turn, the last one too:
    training "with reasoning" would silently train none. Refused, naming the way out; with
    train_reasoning=false only the answer and its end of turn are trained."""
    from slimtune.errors import DataError

    tok = make_tokenizer("deepseek_r1")
    chat = [{"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "<think>\nthe user greets me\n</think>\n\nHi there."}]
    with pytest.raises(DataError, match="drops the <think> block .* data.train_reasoning=false"):
        render_chat(chat, tok)
    ids, labels = render_chat(chat, tok, train_reasoning=False)
    assert [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ids, labels)] == \
        ["Hi there.<｜end▁of▁sentence｜>"]
    # Qwen3 keeps the last turn's block, so the same chat trains its reasoning there
    qwen = make_tokenizer("qwen3")
    ids, labels = render_chat(chat, qwen)
    assert "the user greets me" in qwen.decode(trained_runs(ids, labels)[0])


def test_check_template_names_a_template_that_strips_think_blocks():
    from slimtune.data.template_check import detect

    assert detect(make_tokenizer("deepseek_r1"))["<think> in content"] == \
        "stripped from every turn (train with data.train_reasoning=false)"
    assert detect(make_tokenizer("qwen3"))["<think> in content"] == "kept in the last turn"
