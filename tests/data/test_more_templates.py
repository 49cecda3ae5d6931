"""Template families beyond the common ones (tests/templates.py MORE, written from the shapes of real
ones; test_render.py checks each one's trained spans exactly), and what only some of them do:

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
from test_render import trained_runs
from tiny import make_tokenizer

from slimtune import render_chat


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
