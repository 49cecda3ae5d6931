"""The optimised decoding (preallocated cache, finished rows cut in groups, bf16 weights cast once)
gives the token ids of the straightforward path it replaced, kept here as `old_decode`: DynamicCache
grown by torch.cat, every finished row cut at once, autocast casting each weight at each call."""

import pytest
import torch
from test_generate_batched import CHATS, ending_model, lean_to_end
from tiny import make_tokenizer

from slimtune.data.render import render_prompt
from slimtune.generate import GenSettings, _decode, _left_pad, _with_virtual, draw, generate_many, processors, stop_ids


@torch.no_grad()
def old_decode(net, prompts, s, seeds, stops, pad, virtual=None):
    """generate._decode before issue 27 (without adapter_names / streaming; sampling through `draw`, row by row)."""
    from transformers import DynamicCache

    ids, mask = _left_pad(prompts, pad, "cpu")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids}
    if virtual is not None:
        inputs, mask, pos = _with_virtual(virtual, ids, mask)
    cache = inputs.setdefault("past_key_values", DynamicCache())
    logits = net(**inputs, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    procs = processors(s)
    gens = [torch.Generator().manual_seed(sd) for sd in seeds] if s.sample else None
    seqs, alive, new = [list(p) for p in prompts], list(range(len(prompts))), [[] for _ in prompts]
    next_pos = pos[:, -1] + 1
    for step in range(s.max_new_tokens):
        picks = []
        for r in alive:
            b = alive.index(r)
            scores = logits[b:b + 1]
            for p in procs:
                scores = p(torch.tensor([seqs[r]]), scores)
            picks.append(int(scores.argmax(-1)) if gens is None else int(draw(scores, [gens[r]])))
        keep = []
        for b, (r, t) in enumerate(zip(alive, picks)):
            new[r].append(t)
            seqs[r].append(t)
            if t not in stops:
                keep.append(b)
        if not keep or step + 1 == s.max_new_tokens:
            break
        tokens = torch.tensor(picks)
        if len(keep) < len(alive):
            k = torch.tensor(keep)
            cache.batch_select_indices(k)
            mask, tokens, next_pos = mask[k], tokens[k], next_pos[k]
            alive = [alive[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits = net(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                     past_key_values=cache, use_cache=True).logits[:, -1].float()
        next_pos = next_pos + 1
    return new


def gpt2_ending(tok, bias: float = 0.4):
    """A tiny GPT-2 (learned absolute positions: a missing left-padding offset changes its answers)
    whose head leans towards end-of-turn, so answers end at different steps."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(20)  # positions matter
    return lean_to_end(model, tok, bias)


SETTINGS = [GenSettings(max_new_tokens=16),
            GenSettings(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=30, repetition_penalty=1.2,
                        no_repeat_ngram_size=3, seed=7)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("s", SETTINGS, ids=["greedy", "sampled"])
def test_optimised_decode_equals_the_old_path(arch, s):
    tok = make_tokenizer("chatml")
    model = ending_model(tok) if arch == "llama" else gpt2_ending(tok)
    prompts = [render_prompt(c, tok) for c in CHATS]
    stops = stop_ids(tok, model)
    seeds = [s.seed + i for i in range(len(prompts))]
    old = old_decode(model, prompts, s, seeds, stops, tok.pad_token_id)
    assert s.sample or len({len(x) for x in old}) >= 3  # rows end at different steps: the cuts are exercised
    assert _decode(model, prompts, s, seeds, stops, tok.pad_token_id) == old
    # ... and each row alone (no padding) gives the same: positions start after the padding
    assert [_decode(model, [p], s, [sd], stops, tok.pad_token_id)[0] for p, sd in zip(prompts, seeds)] == old


def test_gpt2_positions_need_the_padding_offset():
    """Without the left-padding offset in position ids, the tiny GPT-2's padded rows answer differently:
    the test above would catch a decoder that dropped it."""
    tok = make_tokenizer("chatml")
    model = gpt2_ending(tok)
    prompts = [render_prompt(c, tok) for c in CHATS]
    ids, mask = _left_pad(prompts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        right = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        wrong = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    alone = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(right, alone, atol=1e-4, rtol=1e-4)
    assert (wrong.argmax(-1) != alone.argmax(-1)).any()


def test_bf16_autocast_answers_equal_the_old_path():
    tok = make_tokenizer("chatml")
    model = ending_model(tok)
    prompts = [render_prompt(c, tok) for c in CHATS]
    stops = stop_ids(tok, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        old = old_decode(model, prompts, GenSettings(max_new_tokens=16), [0] * 8, stops, tok.pad_token_id)
    many = generate_many(model, tok, CHATS, GenSettings(max_new_tokens=16, autocast="bf16"), batch_size=8)
    # generate_many sorts by length: compare per prompt
    assert [a["n_tokens"] for a in many] == [len(x) for x in old]
    assert [a["text"] for a in many] == [tok.decode(x[:-1] if x[-1] in stops else x).strip() for x in old]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights are back


@pytest.mark.parametrize("method", ["none", "lora", "dora"])
def test_bf16_weights_cast_once_give_autocasts_logits_exactly(tmp_path, tiny_dir, method):
    """_cast_once rounds each Linear weight as autocast would at every call: bitwise the same logits
    (plain model; PEFT LoRA with mixed adapter rows; unmerged DoRA, whose layers it leaves alone)."""
    from test_run import make_run

    from slimtune.generate import _cast_once
    from slimtune.runfolder import load_run

    if method == "none":
        tok = make_tokenizer("chatml")
        model, kw = ending_model(tok), {}
    else:
        model, tok, _ = load_run(make_run(tmp_path, tiny_dir, method, scale=1.0))
        kw = {"adapter_names": ["default", "__base__"]} if method == "lora" else {}
    ids = torch.tensor([render_prompt(CHATS[1], tok)] * 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, **kw).logits
        with _cast_once(model):
            assert any(p.dtype == torch.bfloat16 for p in model.parameters())
            got = model(input_ids=ids, **kw).logits
    assert torch.equal(got, want)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("s", SETTINGS, ids=["greedy", "sampled"])
def test_equal_prompts_are_prefilled_once_and_answer_as_alone(s):
    """GRPO's G samples of a prompt: the prefill runs on the distinct prompts only, and each row
    still answers what it would alone with its seed."""
    tok = make_tokenizer("chatml")
    model = ending_model(tok)
    a, b = (render_prompt(c, tok) for c in CHATS[:2])
    prompts = [a, b, a, a, b]
    seeds = [s.seed + i for i in range(5)]
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        got = _decode(model, prompts, s, seeds, stop_ids(tok, model), tok.pad_token_id)
    finally:
        hook.remove()
    assert shapes[0][0] == 2  # two distinct prompts in the prefill
    alone = [_decode(model, [p], s, [sd], stop_ids(tok, model), tok.pad_token_id)[0] for p, sd in zip(prompts, seeds)]
    assert got == alone
    if s.sample:
        assert got[0] != got[2] or got[2] != got[3]  # same prompt, own seeds: different answers
