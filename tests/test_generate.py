"""Generation and chat: the training template renders the prompt, answers stop at end of turn."""

import io

import pytest
import torch
from test_run import make_run
from tiny import make_model, make_tokenizer

from slimtune.data.render import render_chat, render_prompt
from slimtune.chat import chat_loop
from slimtune.data.prompts import load_prompts
from slimtune.generate import generate, stop_ids
from slimtune.methods import adapters_disabled
from slimtune.runfolder import load_run

CHAT = [{"role": "user", "content": "Hello there"}]


class Recorder(torch.nn.Module):
    """Wraps a model: remembers the prompt ids of each prefill; can force the next tokens (the
    script: one token per forward call, by making it the only finite logit)."""

    def __init__(self, model, script=None):
        super().__init__()
        self.model, self.script, self.prompts, self.calls = model, script, [], 0

    def forward(self, input_ids, **kw):
        if kw.get("past_key_values") is None or kw["past_key_values"].get_seq_length() == 0:
            self.prompts.append(input_ids[0].tolist())
        out = self.model(input_ids=input_ids, **kw)
        if self.script is not None:
            forced = torch.full_like(out.logits, -1e9)
            forced[..., self.script[min(self.calls, len(self.script) - 1)]] = 0.0
            out.logits = forced
        self.calls += 1
        return out


@pytest.mark.parametrize("family", ["chatml", "llama3", "default_system"])
def test_prompt_is_the_training_template(family):
    tok = make_tokenizer(family)
    rec = Recorder(make_model(tok))
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    generate(rec, tok, chat, max_new_tokens=2)
    assert rec.prompts[0] == render_prompt(chat, tok)
    # ... which is exactly where training puts the answer: a prefix of the rendered chat, up to
    # the first trained token of the last assistant turn
    ids, labels = render_chat(chat + [{"role": "assistant", "content": "6"}], tok, train_on="last")
    first_trained = next(i for i, lab in enumerate(labels) if lab != -100)
    assert rec.prompts[0] == ids[:first_trained]


def test_stop_tokens_are_eos_and_end_of_turn():
    chatml, llama3 = make_tokenizer("chatml"), make_tokenizer("llama3")
    assert chatml.convert_ids_to_tokens(stop_ids(chatml)) == ["<|im_end|>"]
    assert set(llama3.convert_ids_to_tokens(stop_ids(llama3))) == {"<|eot_id|>", "<|end_of_text|>"}


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_stops_on_end_of_turn(family):
    tok = make_tokenizer(family)
    model = make_model(tok)
    eot = tok.convert_tokens_to_ids("<|im_end|>" if family == "chatml" else "<|eot_id|>")
    hello = tok("Hello", add_special_tokens=False)["input_ids"]
    res = generate(Recorder(model, hello + [eot]), tok, CHAT, max_new_tokens=10)
    assert res == {**res, "text": "Hello", "n_tokens": len(hello) + 1, "ended": True}
    res = generate(Recorder(model, hello), tok, CHAT, max_new_tokens=len(hello))
    assert res["text"] == "Hello" and not res["ended"]
    # a real model whose head always prefers end-of-turn stops right after it
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eot] = 10.0
    model.lm_head = head
    res = generate(model, tok, CHAT, max_new_tokens=10)
    assert res["ended"] and res["n_tokens"] == 1 and res["text"] == ""


def test_sampling_is_seeded_and_leaves_the_rng_alone():
    tok = make_tokenizer("chatml")
    model = make_model(tok)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, tok, CHAT, 6, temperature=1.0, seed=5)
    b = generate(model, tok, CHAT, 6, temperature=1.0, seed=5)
    assert a["text"] == b["text"] and torch.equal(state, torch.get_rng_state())


def greedy_chain(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    """An independent greedy reference: the full forward pass each step, argmax, no cache."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(t)
            if t in stops:
                break
    return out


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_every_adapter_generates(tmp_path, tiny_dir, method):
    """Tuned answers are the adapter model's greedy chain, base answers the plain base's, and they differ."""
    from slimtune.models import load_model

    # a push of 1.0 (not the default 0.2) so that every method's adapter changes some greedy token
    model, tok, _ = load_run(make_run(tmp_path, tiny_dir, method, scale=1.0))
    tuned = generate(model, tok, CHAT, 6)
    with adapters_disabled(model):
        base = generate(model, tok, CHAT, 6)
    prompt = render_prompt(CHAT, tok)  # the greedy chains below start from it
    stops = stop_ids(tok, model)
    want_tuned = greedy_chain(model, prompt, 6, stops)
    want_base = greedy_chain(load_model(tiny_dir), prompt, 6, stops)  # a second, untouched copy of the base
    for res, want in ((tuned, want_tuned), (base, want_base)):
        ended = want[-1] in stops
        assert res["n_tokens"] == len(want) and res["ended"] == ended
        assert res["text"] == tok.decode(want[:-1] if ended else want).strip()
    assert tuned["seconds"] > 0
    # the adapter is on in generation and off for the base: the greedy chains differ, or (a soft
    # prompt on a random 2-layer model barely moves the argmax) at least the logits do
    with torch.no_grad():
        ids = torch.tensor([prompt])
        on = model(input_ids=ids).logits[0, -1]
        with adapters_disabled(model):
            off = model(input_ids=ids).logits[0, -1]
    assert want_tuned != want_base or (method == "prompt_tuning" and (on - off).abs().max() > 1e-2)


def test_chat_loop_keeps_history_and_resets(tiny_dir):
    tok = make_tokenizer("chatml")
    rec = Recorder(make_model(tok))
    lines = iter(["Hi", "More please", "/reset", "Again", "/exit", "never read"])
    out = io.StringIO()
    history = chat_loop(rec, tok, system="Be brief.", max_new_tokens=3, read=lambda _: next(lines), out=out)
    sys_turn = {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in history] == ["system", "user", "assistant"] and history[1]["content"] == "Again"
    assert len(rec.prompts) == 3
    assert rec.prompts[0] == render_prompt([sys_turn, {"role": "user", "content": "Hi"}], tok)
    assert len(rec.prompts[1]) > len(rec.prompts[0])  # the second turn sees the first
    assert rec.prompts[2] == render_prompt([sys_turn, {"role": "user", "content": "Again"}], tok)
    assert "conversation reset" in out.getvalue()


def test_load_prompts_formats(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "x"}]}\n'
                 '{"instruction": "c", "input": "d"}\n')
    chats = load_prompts(str(f), system_prompt="S")
    assert [c[-1]["content"] for c in chats] == ["a", "b", "c\n\nd"] and all(c[0]["content"] == "S" for c in chats)
    assert len(load_prompts("builtin:eval_prompts", limit=2)) == 2
