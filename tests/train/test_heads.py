"""Models that transform their logits after the output layer (Granite divides, Cohere scales,
Gemma 2 soft-caps) train on the model's own loss; a transform slimtune does not know is refused."""

import pytest
import torch
from test_loop import chats, run_args, write_data
from tiny import make_tokenizer

from slimtune.config import build_config
from slimtune.data.batching import collate
from slimtune.data.render import render_chat
from slimtune.errors import ConfigError
from slimtune.train.forward import batch_loss, check_head

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny(kind, tok):
    import transformers as tf

    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **SMALL)
    if kind == "granite":
        model = tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=4.0, **ids))
    elif kind == "cohere":
        model = tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.5, **ids))
    elif kind == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(final_logit_softcapping=2.0, head_dim=8, **ids))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**ids))
    with torch.no_grad():  # make the transform matter: logits far from 0
        model.get_output_embeddings().weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


def batch_of(tok, n=3):
    return collate([dict(zip(("input_ids", "labels"), render_chat(c, tok))) for c in chats(n)], tok.pad_token_id)


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma2"])
def test_chunked_loss_equals_the_models_own(tok, kind):
    model = tiny(kind, tok)
    batch = batch_of(tok)
    with torch.no_grad():
        ours = batch_loss(model, batch)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss  # the model's own head and loss
        plain = tiny("llama", tok)  # sanity: the transform changes the loss a lot
    assert float(ours.loss) == pytest.approx(float(theirs), rel=1e-5)
    check_head(model, batch)
    ignored = torch.nn.functional.cross_entropy(
        (model.get_output_embeddings()(model.model(input_ids=batch["input_ids"])[0]))[:, :-1].flatten(0, 1),
        batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert abs(float(ignored) - float(theirs)) > 0.01 * float(theirs), "the transform should matter here"
    del plain


def test_an_unknown_head_transform_is_refused(tok):
    import transformers as tf

    class Odd(tf.LlamaForCausalLM):  # an architecture that does something we do not know
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 1.7 + 0.3
            return out

    torch.manual_seed(0)
    model = Odd(tf.LlamaConfig(vocab_size=len(tok), **SMALL)).eval()
    with pytest.raises(ConfigError, match="refuses to train on a wrong loss"):
        check_head(model, batch_of(tok))


@pytest.mark.parametrize("kind", ["granite", "cohere"])
def test_the_loop_trains_granite_and_cohere_on_their_own_loss(tok, kind, tmp_path):
    from slimtune.train.loop import setup, step

    path = tmp_path / kind
    tiny(kind, tok).save_pretrained(path)
    tok.save_pretrained(path)
    data = write_data(tmp_path / "d.jsonl", n=6)
    s = setup(build_config({}, run_args(str(path), data, tmp_path / "run", **{
        "train.batch_size": 64, "data.val": data, "eval.kl": "false", "train.max_steps": 2})), log=lambda *a: None)
    b = collate(s.data.train, tok.pad_token_id)
    with torch.no_grad():
        out = s.model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), labels=b["labels"])
    assert step(s)["loss"] == pytest.approx(float(out.loss), rel=1e-5)
