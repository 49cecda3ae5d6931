"""`data check-template`: the behaviours detected on each template family, and the CLI output."""

import json

import pytest
from tiny import make_tokenizer

from slimtune.cli import main
from slimtune.data.formats import Chat
from slimtune.data.reader import load_chats
from slimtune.data.template_check import detect
from slimtune.data.tools import write_chats

# family -> behaviours that must be detected (a subset of detect()'s keys)
DETECTED = {
    "default_system": {"default system prompt": "injected ('You are a helpful AI assistant named Tiny.')",
                       "earlier turns rewritten": "no", "after the last turn": "nothing",
                       "end of turn": "<|im_end|> (= eos)", "tools": "no (ignored)", "reasoning": "no (not rendered)"},
    "qwen3": {"default system prompt": "none", "earlier turns rewritten": "yes", "tools": "yes",
              "reasoning": "yes, earlier turns drop it", "system prompt": "own turn"},
    "smollm3": {"reasoning": "yes, every turn", "earlier turns rewritten": "no"},
    "llama3_first": {"after the last turn": "generation header '<|start_header_id|>assistant<|end_header_id|>' "
                                            "(not trained)",
                     "end of turn": "<|eot_id|> (eos is <|end_of_text|>)"},
    "llama31": {"default system prompt": "injected ('Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024')",
                "tools": "yes"},
    "gemma": {"system prompt": "folded into the first user turn", "end of turn": "<end_of_turn> (eos is <eos>)"},
    "mistral": {"system prompt": "folded into the first user turn", "end of turn": "</s> (= eos)"},
    "phi3": {"after the last turn": "eos <|endoftext|> (not trained)", "end of turn": "<|end|> (eos is <|endoftext|>)"},
}


@pytest.mark.parametrize("family", list(DETECTED))
def test_detected_behaviours(family):
    found = detect(make_tokenizer(family))
    assert {k: found[k] for k in DETECTED[family]} == DETECTED[family]


def test_cli_check_template_and_stats_summary(tmp_path, capsys):
    model = tmp_path / "qwen3"
    make_tokenizer("qwen3").save_pretrained(model)
    assert main(["data", "check-template", "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "[[<think>\nThree plus three makes six.\n</think>\n\n6.<|im_end|>]]" in out  # last turn keeps reasoning
    assert "[[4.<|im_end|>]]" in out  # the earlier one is trained as rendered: without it
    assert "earlier turns rewritten  yes" in out and "tools                    yes" in out
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    assert main(["data", "stats", str(data), "--model", str(model)]) == 0
    assert "template: default system prompt: none; system prompt: own turn; earlier turns rewritten: yes" \
        in capsys.readouterr().out


def test_convert_keeps_tools(tmp_path):
    chat = Chat([{"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                     "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                 {"role": "tool", "content": "sunny", "name": "get_weather"},
                 {"role": "assistant", "content": "Sunny.", "reasoning_content": "Read it."}],
                [{"type": "function", "function": {"name": "get_weather"}}])
    write_chats([chat, list(chat)], tmp_path / "c.jsonl")
    back = load_chats(tmp_path / "c.jsonl")
    assert back == [chat, chat] and back[0].tools == chat.tools and back[1].tools is None
