"""The mask is the contract: trained tokens decode to exactly the assistant turns + end of turn."""

import pytest
from templates import MORE
from tiny import make_tokenizer

from slimtune import render_chat
from slimtune.data.render import IGNORE, render_prompt
from slimtune.errors import DataError

EOT = {"chatml": "<|im_end|>", "chatml_gen": "<|im_end|>", "llama3": "<|eot_id|>", "default_system": "<|im_end|>"}
EOT.update({k: spec["eot"] for k, spec in MORE.items()})  # Zephyr, Vicuna, Granite, Phi-4, Command-R, ...
LEAD = {k: spec.get("lead", "") for k, spec in MORE.items()}  # text the model writes before the answer

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Hello!"},
         {"role": "assistant", "content": "Hello!"},  # same text as the user turn
         {"role": "user", "content": "Tell me a joke."},
         {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
         {"role": "user", "content": "Hello!"},
         {"role": "assistant", "content": "1. First item\n2. Second item"}]
NO_SYSTEM_MULTI = MULTI[1:]


def trained_runs(ids, labels):
    """Contiguous runs of trained token ids."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i, "labels are aligned with input_ids (the model shifts)"
            cur.append(i)
    return runs + ([cur] if cur else [])


def expected(messages, eot, train_on):
    answers = [m["content"] + eot for m in messages if m["role"] == "assistant"]
    return answers[-1:] if train_on == "last" else answers


@pytest.mark.parametrize("family", list(EOT))
@pytest.mark.parametrize("chat", [SINGLE, MULTI, NO_SYSTEM_MULTI], ids=["single", "multi", "multi_nosys"])
@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_trained_tokens_are_exactly_assistant_turns(family, chat, train_on):
    tok = make_tokenizer(family)
    ids, labels = render_chat(chat, tok, train_on=train_on)
    assert len(ids) == len(labels)
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ids, labels)]
    assert runs == [LEAD.get(family, "") + r for r in expected(chat, EOT[family], train_on)]
    # Everything else is the template's text: the whole sequence decodes to the rendering.
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("family", list(EOT))
def test_train_on_all_trains_every_token(family):
    tok = make_tokenizer(family)
    ids, labels = render_chat(MULTI, tok, train_on="all")
    assert labels == ids


def test_llama3_end_of_turn_is_not_eos():
    tok = make_tokenizer("llama3")
    ids, labels = render_chat(SINGLE, tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.eos_token_id
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert trained[-1] == eot and tok.eos_token_id not in trained
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # no doubled BOS


def test_default_system_prompt_is_never_trained():
    tok = make_tokenizer("default_system")
    ids, labels = render_chat(SINGLE, tok)
    text = tok.decode(ids, skip_special_tokens=False)
    assert "You are a helpful AI assistant named Tiny." in text
    untrained = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE], skip_special_tokens=False)
    assert "named Tiny" in untrained


def test_truncation_keeps_labels_aligned():
    tok = make_tokenizer("chatml")
    full_ids, full_labels = render_chat(MULTI, tok)
    ids, labels = render_chat(MULTI, tok, max_length=20)
    assert ids == full_ids[:20] and labels == full_labels[:20]


def test_template_that_rewrites_earlier_turns_is_masked_as_rendered():
    # The earlier turn loses its <think> block in the full rendering: it is trained without it.
    tok = make_tokenizer("rewriting")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}]
    ids, labels = render_chat(chat, tok)
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ids, labels)]
    assert runs == ["Hello<|im_end|>", "Bye<|im_end|>"]
    ids, labels = render_chat(chat, tok, train_on="last")
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ids, labels)]
    assert runs == ["Bye<|im_end|>"]


def test_template_without_end_of_turn_is_refused():
    tok = make_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(DataError, match="end-of-turn"):
        render_chat(SINGLE, tok)


def test_render_prompt_matches_training_prefix():
    tok = make_tokenizer("llama3")
    ids, labels = render_chat(SINGLE, tok)
    prompt = render_prompt(SINGLE[:1], tok)
    first_trained = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert ids[:first_trained] == prompt
