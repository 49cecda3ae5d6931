"""Batched generation: the same token ids as one prompt at a time, for every method; merging; knobs.

Exact equality of greedy token ids needs argmax margins wider than float rounding. The tiny
random models here have them (their logits spread over ~1, rounding is ~1e-6), and the test
checks the answers end at different steps, so dropping finished rows from the batch is covered.
"""

import pytest
import torch
from test_run import make_run
from tiny import make_model, make_tokenizer

from slimtune.data.render import render_prompt
from slimtune.generate import GenSettings, _decode, can_merge, generate_many, merged, settings_from
from slimtune.generate import generate, stop_ids
from slimtune.runfolder import load_run

TEXTS = ["Hello there", "What is the capital of France?", "hi", "Tell me a joke about a fox and a dog please",
         "1. First", "def add(a, b):", "Translate to French: bonjour", "Summarise this"]
CHATS = [[{"role": "user", "content": t}] for t in TEXTS]


def ending_model(tok, bias: float = 0.4):
    """A tiny model whose head leans towards end-of-turn, so answers end after 1 to 16 tokens."""
    return lean_to_end(make_model(tok, hidden=64), tok, bias)


def lean_to_end(model, tok, bias: float = 0.4):
    """`model` with a biased copy of its head: end-of-turn gets `bias` more logit."""
    hidden = model.lm_head.weight.shape[1]
    head = torch.nn.Linear(hidden, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids("<|im_end|>")] = bias
    model.lm_head = head
    return model


def alone(model, tok, chat, n):
    """Token ids of transformers' own generate for one prompt, no padding: the unbatched path."""
    ids = torch.tensor([render_prompt(chat, tok)])
    stops = stop_ids(tok, model)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id, top_k=None, top_p=None)
    return out[0, ids.shape[1]:].tolist()


def test_batched_greedy_token_ids_equal_unbatched():
    tok = make_tokenizer("chatml")
    model = ending_model(tok)
    singles = [alone(model, tok, c, 16) for c in CHATS]
    assert len({len(s) for s in singles}) >= 3  # answers end at different steps: rows leave the batch
    prompts = [render_prompt(c, tok) for c in CHATS]
    for bs in (3, 8):
        batched = []
        for i in range(0, len(prompts), bs):
            batched += _decode(model, prompts[i:i + bs], GenSettings(max_new_tokens=16), [0] * bs,
                               stop_ids(tok, model), tok.pad_token_id)
        assert batched == singles
    answers = generate_many(model, tok, CHATS, GenSettings(max_new_tokens=16), batch_size=3)
    assert answers == [{**generate(model, tok, c, 16), "seconds": a["seconds"]} for c, a in zip(CHATS, answers)]
    assert abs(sum(a["seconds"] for a in answers)) > 0


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full"])
def test_every_method_batched_and_merged_equals_unbatched(tmp_path, tiny_dir, method):
    model, tok, _ = load_run(make_run(tmp_path, tiny_dir, method))
    singles = [generate(model, tok, c, 10) for c in CHATS]
    with merged(model):
        many = generate_many(model, tok, CHATS, GenSettings(max_new_tokens=10), batch_size=4)
    assert [a["text"] for a in many] == [s["text"] for s in singles]
    assert [a["n_tokens"] for a in many] == [s["n_tokens"] for s in singles]


def test_merged_folds_the_adapter_in_and_restores_the_weights(tmp_path, tiny_dir):
    model, tok, _ = load_run(make_run(tmp_path, tiny_dir, "lora"))
    assert can_merge(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([render_prompt(CHATS[1], tok)])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with merged(model):
            q = model.get_base_model().model.layers[0].self_attn.q_proj
            assert q.merged and not torch.equal(q.base_layer.weight, before[next(k for k in before if
                                                                              "layers.0.self_attn.q_proj.base_layer" in k)])
            torch.testing.assert_close(model(input_ids=ids).logits, tuned, atol=1e-5, rtol=1e-5)
    assert not q.merged
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    prompt_model, _, _ = load_run(make_run(tmp_path, tiny_dir, "prompt_tuning"))
    assert not can_merge(prompt_model) and not can_merge(make_model(tok))


def test_sampling_is_per_prompt_and_matches_unbatched():
    """Prompt i samples with seed + i whatever shares its batch, as generate(seed=seed + i) does."""
    tok = make_tokenizer("chatml")
    model = ending_model(tok, 0.2)
    s = GenSettings(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=30, repetition_penalty=1.2,
                    no_repeat_ngram_size=3, seed=7)
    many = generate_many(model, tok, CHATS, s, batch_size=3)
    singles = [generate(model, tok, c, 12, 0.9, 0.9, seed=7 + i, top_k=30, repetition_penalty=1.2,
                        no_repeat_ngram_size=3) for i, c in enumerate(CHATS)]
    assert [a["text"] for a in many] == [x["text"] for x in singles]
    assert [a["text"] for a in generate_many(model, tok, CHATS, s, batch_size=8)] == [a["text"] for a in many]
    greedy = generate_many(model, tok, CHATS, GenSettings(max_new_tokens=12))
    assert [a["text"] for a in many] != [a["text"] for a in greedy]


def test_no_repeat_ngram_and_repetition_penalty_take_effect():
    tok = make_tokenizer("chatml")
    model = make_model(tok, hidden=64)
    plain = generate_many(model, tok, CHATS[:4], GenSettings(max_new_tokens=24))
    ids = [tok(a["text"], add_special_tokens=False)["input_ids"] for a in plain]
    assert any(len(set(x)) < len(x) for x in ids)  # the random model repeats itself ...
    prompts = [render_prompt(c, tok) for c in CHATS[:4]]
    rows = _decode(model, prompts, GenSettings(max_new_tokens=24, no_repeat_ngram_size=1), [0] * 4,
                   stop_ids(tok, model), tok.pad_token_id)
    for p, row in zip(prompts, rows):  # ... and with n=1 no token of prompt or answer comes twice
        assert len(set(row)) == len(row) and not set(row) & set(p)
    penalised = generate_many(model, tok, CHATS[:4], GenSettings(max_new_tokens=24, repetition_penalty=5.0))
    assert [a["text"] for a in penalised] != [a["text"] for a in plain]


def test_settings_from_config_and_overrides():
    from slimtune.config import EvalCfg

    s = settings_from(EvalCfg(top_k=5), max_new_tokens=7, top_p=None, repetition_penalty=1.3)
    assert (s.max_new_tokens, s.top_k, s.top_p, s.repetition_penalty, s.temperature) == (7, 5, 1.0, 1.3, 0.0)
    assert not s.sample and GenSettings(temperature=0.5).sample


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_base_and_tuned_rows_in_one_batch_equal_the_separate_paths(tmp_path, tiny_dir, method, lean, gen_cache,
                                                                   monkeypatch):
    """answer_both gives what the base alone and the tuned model alone give through transformers'
    forward one chat at a time (the path before the lean step), greedy and sampled (seed +
    position on both sides): with the lean step as two lean streams (base with adapters off, tuned
    merged), without it as base and tuned rows sharing batches (LoRA) or one after the other (DoRA)."""
    import slimtune.generate as G
    from slimtune.evaluate.base_vs_tuned import BaseVsTuned
    from slimtune.generate import can_mix, lean_applies

    run = make_run(tmp_path, tiny_dir, method)
    pair = BaseVsTuned(run)
    assert can_mix(pair.model) == (method == "lora")  # DoRA: PEFT has no mixed batch; the separate paths run
    for s in (GenSettings(max_new_tokens=10), GenSettings(max_new_tokens=10, temperature=0.9, top_k=20, seed=3)):
        monkeypatch.setattr(G, "LEAN", False)
        with pair.base() as base:
            want_base = [generate(base, pair.tok, c, 10, s.temperature, seed=s.seed + i, top_k=s.top_k)["text"]
                         for i, c in enumerate(CHATS)]
        want_tuned = [generate(pair.model, pair.tok, c, 10, s.temperature, seed=s.seed + i, top_k=s.top_k)["text"]
                      for i, c in enumerate(CHATS)]
        assert want_base != want_tuned  # the adapter changes answers: a swapped side would show
        monkeypatch.setattr(G, "LEAN", lean)
        assert lean_applies(pair.model) == lean
        base, tuned = pair.answer_both(CHATS, s, batch_size=5, use_cache=False)
        assert [a["text"] for a in base] == want_base and [a["text"] for a in tuned] == want_tuned
    # half the base answers cached: the other half is generated beside the tuned rows
    s = GenSettings(max_new_tokens=10)
    pair.answer_base(CHATS[:4], s, 4)
    base, tuned = pair.answer_both(CHATS, s, batch_size=16)
    assert [bool(a.get("cached")) for a in base] == [True] * 4 + [False] * 4
    assert [a["text"] for a in base][:4] == [a["text"] for a in pair.answer_base(CHATS[:4], s, 4)]
    assert [a["text"] for a in base] == [a["text"] for a in pair.answer_base(CHATS, s, 4, use_cache=False)]


@pytest.mark.parametrize("native", ["0", "1"])
def test_generation_follows_the_runs_precision(monkeypatch, native):
    """eval / compare / chat decode under bf16 autocast only where training chose it and the device
    has native bf16; the decoding itself runs under autocast then (bf16 matmuls)."""
    from slimtune.config import Config
    from slimtune.generate import settings_for

    monkeypatch.setenv("SLIMTUNE_CPU_BF16", native)
    cfg = Config()
    for mp, want in (("auto", "bf16"), ("bf16", "bf16"), ("no", "no")):
        cfg.train.mixed_precision = mp
        assert settings_for(cfg).autocast == (want if native == "1" else "no")
    import slimtune.generate as G
    from slimtune.lean_decode import LeanDecoder

    tok = make_tokenizer("chatml")
    model = ending_model(tok)
    built = []  # the lean decoder's matmul dtype, where it runs
    real = LeanDecoder.__init__
    monkeypatch.setattr(LeanDecoder, "__init__", lambda self, net, dtype, pack=False: built.append(dtype)
                        or real(self, net, dtype, pack))
    generate_many(model, tok, CHATS[:2], GenSettings(max_new_tokens=2, autocast="bf16"))
    generate_many(model, tok, CHATS[:2], GenSettings(max_new_tokens=2))
    assert built == [torch.bfloat16, torch.float32]
    monkeypatch.setattr(G, "LEAN", False)  # transformers' forward: its matmuls under autocast
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    generate_many(model, tok, CHATS[:2], GenSettings(max_new_tokens=2, autocast="bf16"))
    generate_many(model, tok, CHATS[:2], GenSettings(max_new_tokens=2))
    assert seen[0] == torch.bfloat16 and seen[-1] == torch.float32


def test_draw_follows_the_distribution_and_each_rows_generator():
    """generate.draw: over 4000 draws each token's frequency is within 4 sd of its probability, a
    zero-probability token never comes, a row's draws depend on its own generator only, and rows
    that do not draw leave their generator untouched."""
    from slimtune.generate import draw

    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    scores = probs.log().expand(2, -1).clone()                   # -inf for the impossible token
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    counts = torch.zeros(2, 5)
    for _ in range(4000):
        counts[torch.arange(2), draw(scores, gens)] += 1
    assert counts[:, 1].sum() == 0
    sd = (probs * (1 - probs) / 4000).sqrt()
    assert ((counts / 4000 - probs).abs() <= 4 * sd + 1e-9).all(), counts
    alone = draw(scores[1:], [torch.Generator().manual_seed(5)])
    paired = draw(scores, [torch.Generator().manual_seed(9), torch.Generator().manual_seed(5)])
    assert int(paired[1]) == int(alone[0])
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    draw(scores, [torch.Generator().manual_seed(4), g], rows=[0])
    assert torch.equal(g.get_state(), state)


SYSTEM = "You are a careful assistant. Answer briefly, in plain words, and say when you do not know."


@pytest.mark.parametrize("path", ["lean", "forward", "packed_bf16"])
def test_a_shared_prompt_start_is_prefilled_once_with_the_same_answers(monkeypatch, path):
    """Prompts with a common start (the system turn) prefill it once and copy its keys / values to
    each row: the same greedy ids as the whole-prompt prefill and as each prompt alone, for the
    lean step, transformers' forward and the packed bf16 decoder; with equal prompts (GRPO's G
    samples) and a prompt no longer than the common start + 1 token among them."""
    import slimtune.generate as G
    from slimtune.lean_decode import can_pack

    if path == "packed_bf16" and not can_pack("cpu"):
        pytest.skip("no packed bf16 matmul on this CPU")
    tok = make_tokenizer("chatml")
    model = ending_model(tok)
    chats = [[{"role": "system", "content": SYSTEM}, *c] for c in CHATS] + [[{"role": "system", "content": SYSTEM},
                                                                           {"role": "user", "content": "x"}]]
    chats += chats[:2]                                                    # equal prompts: prefilled once, then copied
    prompts = [render_prompt(c, tok) for c in chats]
    common = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    assert common >= G.SHARED_MIN
    monkeypatch.setattr(G, "LEAN", path != "forward")
    s = GenSettings(max_new_tokens=12, autocast="bf16" if path == "packed_bf16" else "no")
    cuts = []
    real = G._prefill_prefix
    monkeypatch.setattr(G, "_prefill_prefix", lambda *a: cuts.append(a[2].shape[1]) or real(*a))
    shared = [a["ids"] for a in generate_many(model, tok, chats, s, batch_size=16, return_ids=True)]
    assert cuts == [min(common, min(map(len, prompts)) - 1)]
    monkeypatch.setattr(G, "SHARED_MIN", 10**9)
    whole = [a["ids"] for a in generate_many(model, tok, chats, s, batch_size=16, return_ids=True)]
    assert len(cuts) == 1 and shared == whole
    assert len({len(x) for x in shared}) >= 3                              # rows end at different steps
    if path != "packed_bf16":
        assert shared == [generate_many(model, tok, [c], s, return_ids=True)[0]["ids"] for c in chats]


def test_shared_prefix_length_and_layout(monkeypatch):
    """The common start: at most the shortest prompt - 1 tokens, none below SHARED_MIN or for one
    prompt; `_left_pad(start=P)` keeps it in columns [0, P) of every row, the padding after it."""
    import slimtune.generate as G
    from slimtune.generate import _left_pad, _shared_prefix

    monkeypatch.setattr(G, "SHARED_MIN", 3)
    assert _shared_prefix([[5, 6, 7, 8, 9], [5, 6, 7, 1], [5, 6, 7, 8, 2, 2]]) == 3
    assert _shared_prefix([[5, 6, 7, 8, 9], [5, 6, 7, 8]]) == 3      # the shorter keeps its last token
    assert _shared_prefix([[5, 6, 7, 8, 9]]) == 0                    # one row: nothing to share
    assert _shared_prefix([[1, 6, 7, 8, 9], [5, 6, 7, 8, 9]]) == 0   # differ at the first token
    monkeypatch.setattr(G, "SHARED_MIN", 4)
    assert _shared_prefix([[5, 6, 7, 8, 9], [5, 6, 7, 8]]) == 0      # below the minimum
    ids, mask = _left_pad([[5, 6, 7, 8, 9], [5, 6, 7, 1]], 0, "cpu", start=3)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 1]] and mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]
    assert ((mask.cumsum(-1) - 1).clamp(min=0)[1]).tolist() == [0, 1, 2, 2, 3]   # positions of real tokens only


def test_sliding_window_models_keep_plain_left_padding(monkeypatch):
    """A model with a sliding window in use answers without the common-start layout (transformers
    counts the window in cache columns, which the padding after the start would stretch); one
    without a window in use (Qwen2's default) takes it."""
    import slimtune.generate as G
    from transformers import MistralConfig, MistralForCausalLM

    from tiny import make_qwen

    tok = make_tokenizer("chatml")
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    windowed, qwen = MistralForCausalLM(cfg).eval(), make_qwen(tok)
    assert G._windowed(windowed) and not G._windowed(qwen) and not G._windowed(make_model(tok))
    chats = [[{"role": "system", "content": SYSTEM}, *c] for c in CHATS]
    cuts = []
    real = G._prefill_prefix
    monkeypatch.setattr(G, "_prefill_prefix", lambda *a: cuts.append(a[2].shape[1]) or real(*a))
    s = GenSettings(max_new_tokens=4)
    got = [a["ids"] for a in generate_many(windowed, tok, chats, s, batch_size=8, return_ids=True)]
    assert not cuts
    assert got == [generate_many(windowed, tok, [c], s, return_ids=True)[0]["ids"] for c in chats]
    generate_many(qwen, tok, chats, s, batch_size=8)
    assert cuts
