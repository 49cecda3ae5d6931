"""Built-in chat templates for base models, and a base model trained and chatted with end to end."""

import json

import pytest
from tiny import make_tokenizer, save_tiny

from slimtune.cli import main
from slimtune.config import ConfigError
from slimtune.data.render import IGNORE, render_chat, render_prompt
from slimtune.data.templates import BUILTIN, chat_template
from slimtune.models import load_tokenizer
from slimtune.errors import SlimtuneError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thank you"}]


@pytest.fixture(scope="module")
def base_tok():
    tok = make_tokenizer("base")
    assert not tok.chat_template
    return tok


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_mask_assistant_turns_closed_by_eos(base_tok, name):
    base_tok.chat_template = chat_template(name, base_tok)
    ids, labels = render_chat(CHAT, base_tok)
    runs, cur = [], []
    for t, lab in zip(ids, labels):  # maximal runs of trained tokens
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [base_tok.decode(r) for r in runs] == ["hello<|endoftext|>", "fine thank you<|endoftext|>"]
    prompt = render_prompt(CHAT[:4], base_tok)  # generation starts where the trained turn does
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] != IGNORE


def test_chatml_uses_im_end_when_the_tokenizer_has_it():
    tok = make_tokenizer("chatml")
    tok.chat_template = chat_template("chatml", tok)
    ids, labels = render_chat(CHAT[1:3], tok)
    assert tok.decode([t for t in labels if t != IGNORE]) == "hello<|im_end|>"


def test_alpaca_renders_the_classic_prompt(base_tok):
    base_tok.chat_template = chat_template("alpaca", base_tok)
    text = base_tok.apply_chat_template(CHAT[1:3], tokenize=False)
    assert text == "### Instruction:\nhi\n\n### Response:\nhello<|endoftext|>\n\n"


def test_template_file_and_bad_names(tmp_path, base_tok):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert chat_template(str(f), base_tok) == f.read_text()
    with pytest.raises(ConfigError, match="chatml, llama3, alpaca, zephyr"):
        chat_template("vicuna", base_tok)
    with pytest.raises(ConfigError, match="not found"):
        chat_template(str(tmp_path / "missing.jinja"), base_tok)


def test_base_model_refusal_names_the_option(tmp_path):
    path = save_tiny(tmp_path / "base", "base")
    with pytest.raises(SlimtuneError, match="set model.chat_template to chatml, llama3, alpaca, zephyr"):
        load_tokenizer(path)
    assert load_tokenizer(path, chat_template="zephyr").chat_template.startswith("{% set eot")


def test_base_model_trains_with_alpaca_template_and_chats_with_the_run(tmp_path, capsys):
    base = save_tiny(tmp_path / "base", "base")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n"
                            for w in ["hello", "fine", "thank you", "the fox", "a joke", "today"] * 2))
    run = tmp_path / "run"
    args = [f"model.name={base}", "model.chat_template=alpaca", f"data.train={data}", "data.max_length=64",
            "data.general_prompts=", "train.max_steps=2", "train.batch_size=4", "train.progress=false",
            "method.r=4", f"train.output_dir={run}", "eval.max_examples=2"]
    assert main(["train", *args]) == 0
    saved = (run / "chat_template.jinja").read_text()
    assert "### Instruction" in saved  # saved with the run: eval, chat, merge and export read it from there
    capsys.readouterr()
    assert main(["chat", str(run), "--prompt", "Say hello", "--max-new-tokens", "4"]) == 0
    assert "error" not in capsys.readouterr().err  # random weights answer anything; the template loads
    tok = load_tokenizer(str(run))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                   add_generation_prompt=True) == "### Instruction:\nx\n\n### Response:\n"
