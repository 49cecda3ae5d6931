"""The lean decoding step computes what transformers' forward computes for one new token per row:
logits within float rounding, the same greedy ids through generate_many; models it does not cover
are refused (and decode through transformers' forward)."""

import peft
import pytest
import torch
from test_generate_batched import CHATS
from tiny import make_model, make_qwen, make_tokenizer

import slimtune.generate as G
from slimtune.data.render import render_prompt
from slimtune.generate import GenSettings, _Cache, _left_pad, generate_many, merged
from slimtune.lean_decode import LeanDecoder


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def models(tok):
    return {"llama": make_model(tok, hidden=64, layers=3, seed=1),
            "llama_tied": make_model(tok, hidden=64, layers=2, seed=2, tie=True),
            "qwen2_bias": make_qwen(tok, hidden=64, layers=2, seed=3)}


@torch.no_grad()
def both_steps(model, tok, dtype=torch.float32):
    """(transformers' logits, lean logits) for 3 decoding steps after a padded prefill of 4 prompts."""
    prompts = [render_prompt(c, tok) for c in CHATS[:4]]
    ids, mask = _left_pad(prompts, tok.pad_token_id, "cpu")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dec = LeanDecoder.build(model, dtype)
    assert dec is not None
    out = []
    caches = [_Cache(ids.shape[1] + 3), _Cache(ids.shape[1] + 3)]
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)  # as generate runs bf16
    for c in caches:
        with amp:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c, use_cache=True)
    tokens = torch.tensor([[5], [17], [42], [99]])
    full, next_pos = mask, pos[:, -1:] + 1
    for _ in range(3):
        full = torch.cat([full, full.new_ones(4, 1)], dim=1)
        with amp:
            ref = model(input_ids=tokens, attention_mask=full, position_ids=next_pos, past_key_values=caches[0],
                        use_cache=True).logits[:, -1].float()
        lean = dec.step(tokens, next_pos, full, caches[1]).float()
        out.append((ref, lean))
        tokens, next_pos = ref.argmax(-1, keepdim=True), next_pos + 1
    return out


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2_bias"])
def test_lean_step_equals_the_models_forward(tok, name):
    for ref, lean in both_steps(models(tok)[name], tok):
        torch.testing.assert_close(lean, ref, atol=2e-5, rtol=1e-5)


def test_lean_step_in_bf16_is_within_bf16_rounding(tok):
    for ref, lean in both_steps(models(tok)["llama"], tok, torch.bfloat16):
        assert lean.dtype == torch.float32
        assert (lean - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 weights: ~3 significant digits
        assert torch.nn.functional.cosine_similarity(lean, ref, dim=-1).min() > 0.999


@pytest.mark.parametrize("name", ["llama", "qwen2_bias"])
def test_generate_many_gives_the_same_greedy_ids_lean_or_not(tok, name, monkeypatch):
    model = models(tok)[name]
    s = GenSettings(max_new_tokens=12)
    lean = generate_many(model, tok, CHATS, s, batch_size=4, return_ids=True)
    monkeypatch.setattr(G, "LEAN", False)
    plain = generate_many(model, tok, CHATS, s, batch_size=4, return_ids=True)
    assert [a["ids"] for a in lean] == [a["ids"] for a in plain]


def test_lean_is_used_and_merged_lora_counts_as_plain(tok, monkeypatch):
    model = make_model(tok, hidden=64, layers=2, seed=4)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      init_lora_weights=False))
    net = lora.get_base_model()
    assert LeanDecoder.build(net) is None           # unmerged adapters: transformers' forward
    calls = []
    real = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, *a: calls.append(1) or real(self, *a))
    s = GenSettings(max_new_tokens=6)
    with merged(lora):
        assert LeanDecoder.build(net) is not None  # merged: the base layers hold the adapter
        fast = generate_many(lora, tok, CHATS[:3], s, return_ids=True)
    assert calls, "the lean step was not used"
    monkeypatch.setattr(G, "LEAN", False)
    with merged(lora):
        slow = generate_many(lora, tok, CHATS[:3], s, return_ids=True)
    assert [a["ids"] for a in fast] == [a["ids"] for a in slow]


def test_models_it_does_not_cover_are_refused(tok):
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    assert LeanDecoder.build(gpt2) is None
    windowed = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=16))
    assert LeanDecoder.build(windowed) is None
    assert LeanDecoder.build(make_qwen(tok, arch="qwen3")) is None  # q_norm / k_norm


@torch.no_grad()
def test_lean_prefill_equals_the_models_forward(tok):
    """T > 1 (the prefill of left-padded prompts): causal among the new tokens, padding masked; the
    last position's logits and the keys / values it leaves equal transformers' forward in fp32."""
    model = models(tok)["llama"]
    prompts = [render_prompt(c, tok) for c in CHATS[:4]]
    ids, mask = _left_pad(prompts, tok.pad_token_id, "cpu")
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref_cache, lean_cache = _Cache(ids.shape[1] + 1), _Cache(ids.shape[1] + 1)
    ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=ref_cache,
                use_cache=True).logits[:, -1]
    got = LeanDecoder.build(model).step(ids, pos, mask, lean_cache).float()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    real = mask.bool()
    for a, b in zip(ref_cache.layers, lean_cache.layers):  # real positions only: padding rows are never read
        torch.testing.assert_close(b.keys.transpose(1, 2)[real], a.keys.transpose(1, 2)[real], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(b.values.transpose(1, 2)[real], a.values.transpose(1, 2)[real], atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not __import__("slimtune.lean_decode", fromlist=["can_pack"]).can_pack("cpu"),
                    reason="no packed bf16 matmul (oneDNN bf16) on this CPU")
@pytest.mark.parametrize("name", ["llama", "qwen2_bias"])
def test_packed_bf16_decoder_equals_the_plain_bf16_one(tok, name, monkeypatch):
    """Packed weights (q/k/v fused) compute the plain bf16 decoder's logits to bf16 rounding, prefill
    and steps (norm weights other than ones); generate_many in bf16 uses it and gives the same greedy
    ids."""
    model = models(tok)[name]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # norm weights other than ones, so a misplaced norm weight would show
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
    plain, packed = LeanDecoder.build(model, torch.bfloat16), LeanDecoder.build(model, torch.bfloat16, pack=True)
    assert packed.pack and not plain.pack
    prompts = [render_prompt(c, tok) for c in CHATS[:4]]
    ids, mask = _left_pad(prompts, tok.pad_token_id, "cpu")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [_Cache(ids.shape[1] + 3), _Cache(ids.shape[1] + 3)]
    tokens, full = ids, mask
    for _ in range(4):
        a, b = plain.step(tokens, pos, full, caches[0]).float(), packed.step(tokens, pos, full, caches[1]).float()
        assert (a - b).abs().max() <= 0.02 * a.abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        tokens, pos = a.argmax(-1, keepdim=True), pos[:, -1:] + 1
        full = torch.cat([full, full.new_ones(4, 1)], dim=1)
    calls = []
    real = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, *a: calls.append((self.pack, a[0].shape[1])) or real(self, *a))
    s = GenSettings(max_new_tokens=10, autocast="bf16")
    fast = generate_many(model, tok, CHATS, s, batch_size=4, return_ids=True)
    assert calls and all(p for p, _ in calls) and calls[0][1] > 1  # packed, the prefill included
    monkeypatch.setattr(G, "LEAN", False)
    slow = generate_many(model, tok, CHATS, s, batch_size=4, return_ids=True)
    same = sum(a["ids"] == b["ids"] for a, b in zip(fast, slow))
    assert same >= len(CHATS) - 1, (same, len(CHATS))  # bf16: one near-tie may flip an answer


def test_adapters_switched_off_decode_as_the_base(tok):
    """A LoRA model with its adapters switched off (the base side of `slimtune eval`) is covered:
    the lean step computes the base model's logits; merged and switched off it is refused (PEFT
    unmerges on the fly then)."""
    model = make_model(tok, hidden=64, layers=2, seed=5)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      init_lora_weights=False))
    net = lora.get_base_model()
    assert LeanDecoder.covers(net) and not LeanDecoder.covers(net, adapters=False)
    with lora.disable_adapter():
        dec = LeanDecoder.build(net)
        assert dec is not None
        for ref, got in both_steps(net, tok):
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    with merged(lora):
        with lora.disable_adapter():
            assert LeanDecoder.build(net) is None


def test_half_turn_rotation_is_the_models_rotary(tok):
    """The packed one-token step rotates q and k by x @ (diag(cos) + P sin) with P = `_half_turn`:
    the model's own apply_rotary_pos_emb (rotate_half) to float rounding, at several positions."""
    from slimtune.lean_decode import _half_turn, _rope_of

    model = models(tok)["llama"]
    D = model.config.hidden_size // model.config.num_attention_heads
    pos = torch.tensor([[0], [3], [17], [250]])
    x = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(0))      # (B, heads, D)
    cos, sin = model.model.rotary_emb(x, pos)                                  # (B, 1, D)
    turn = torch.diag_embed(cos[:, 0]) + _half_turn(D) * sin[:, 0, None, :]
    ref = _rope_of(model)(x[:, :, None], x[:, :, None], cos, sin)[0][:, :, 0]  # (B, heads, D)
    torch.testing.assert_close(torch.bmm(x, turn), ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ref[1:], x[1:], atol=1e-3)                       # positions > 0 do rotate


def test_no_packed_copy_without_the_memory_for_it(tok, monkeypatch):
    """bf16 generation packs a bf16 copy of the weights only where it fits in half the available
    memory; otherwise it decodes with the weights cast once (unpacked), answers all the same."""
    import slimtune.machine as M
    from slimtune.lean_decode import room_to_pack

    model = models(tok)["llama"]
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(M, "available_memory", lambda: 4 * n - 1)
    assert not room_to_pack(model)
    monkeypatch.setattr(M, "available_memory", lambda: 4 * n)
    assert room_to_pack(model)
    monkeypatch.setattr(M, "available_memory", lambda: None)        # unknown (not Linux): assume it fits
    assert room_to_pack(model)
    monkeypatch.setattr(M, "available_memory", lambda: 1024)
    calls = []
    real = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, *a: calls.append(self.pack) or real(self, *a))
    out = generate_many(model, tok, CHATS[:3], GenSettings(max_new_tokens=6, autocast="bf16"), batch_size=3,
                        return_ids=True)
    assert calls and not any(calls) and all(len(o["ids"]) for o in out)


@pytest.mark.parametrize("pack", [False, True])
def test_a_dropped_decoder_frees_its_weights_without_the_garbage_collector(tok, pack):
    """No reference cycle in a decoder: its (packed) weight copies go when the last reference does,
    not when the cyclic collector next runs (GRPO builds one per step; a cycle held 0.3 GB more)."""
    import gc
    import weakref

    model = models(tok)["llama"]
    dec = LeanDecoder.build(model, torch.bfloat16, pack=pack)
    refs = [weakref.ref(dec), weakref.ref(dec.layers[0])]
    gc.disable()
    try:
        del dec
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


@pytest.mark.skipif(not __import__("slimtune.lean_decode", fromlist=["can_pack"]).can_pack("cpu"),
                    reason="no packed bf16 matmul (oneDNN bf16) on this CPU")
def test_kept_decoder_is_built_once_and_rebuilt_when_the_weights_change(tok, monkeypatch):
    """Inside `keep_decoders` the packed decoder is built once for calls and batches alike, with the
    answers of a fresh build; a weight changed in place, or an adapter merged or switched off,
    makes a new one (its answers those of the changed model); outside, nothing is kept."""
    from slimtune.generate import keep_decoders

    model = models(tok)["llama"]
    builds = []
    real = LeanDecoder.__init__
    monkeypatch.setattr(LeanDecoder, "__init__", lambda self, *a, **k: builds.append(True) or real(self, *a, **k))
    s = GenSettings(max_new_tokens=6, autocast="bf16")
    fresh = generate_many(model, tok, CHATS, s, batch_size=3, return_ids=True)   # 3 batches, one build
    assert builds == [True] and G._KEPT is None
    with keep_decoders():
        kept = [generate_many(model, tok, CHATS, s, batch_size=3, return_ids=True) for _ in range(2)]
        assert builds == [True, True]                                             # the second call reused it
        assert all([a["ids"] for a in k] == [a["ids"] for a in fresh] for k in kept)
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)                                       # in place: version moves
        flipped = generate_many(model, tok, CHATS, s, batch_size=3, return_ids=True)
        assert len(builds) == 3
    assert G._KEPT is None
    assert [a["ids"] for a in flipped] == [a["ids"] for a in generate_many(model, tok, CHATS, s, batch_size=3,
                                                                           return_ids=True)]
    assert [a["ids"] for a in flipped] != [a["ids"] for a in fresh]
    lora = peft.get_peft_model(models(tok)["llama"], peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    builds.clear()
    with keep_decoders():
        with merged(lora):
            tuned = generate_many(lora, tok, CHATS[:3], s, return_ids=True)
        with lora.disable_adapter():
            base = generate_many(lora, tok, CHATS[:3], s, return_ids=True)
        assert len(builds) == 2                                                   # merged, then switched off
    with lora.disable_adapter():
        assert [a["ids"] for a in base] == [a["ids"] for a in generate_many(lora, tok, CHATS[:3], s, return_ids=True)]
    assert [a["ids"] for a in base] != [a["ids"] for a in tuned]


@pytest.mark.skipif(not __import__("slimtune.lean_decode", fromlist=["can_mkl_pack"]).can_mkl_pack("cpu"),
                    reason="no MKL packed sgemm in this torch")
def test_mkl_laid_out_fp32_decoder_gives_the_plain_logits_bit_for_bit(tok, monkeypatch):
    """fp32 weights laid out for MKL's packed sgemm at the batch size: every step's logits equal the
    plain fp32 decoder's exactly, also after the batch shrinks (re-laid out) and below MKL_MIN_ROWS
    (the copy dropped); generate_many uses it for 8+ rows, with the same ids as without."""
    import slimtune.lean_decode as LD

    model = models(tok)["qwen2_bias"]                       # biases go through the packed call too
    chats = (CHATS * 2)[:10]
    prompts = [render_prompt(c, tok) for c in chats]
    ids, mask = _left_pad(prompts, tok.pad_token_id, "cpu")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    plain, mkl = LeanDecoder.build(model), LeanDecoder.build(model, rows=10)
    assert mkl.mkl and mkl.rows == 10 and mkl.head.mkl is not None and plain.head.mkl is None
    caches = [_Cache(ids.shape[1] + 6), _Cache(ids.shape[1] + 6)]
    with torch.no_grad():
        for c in caches:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c, use_cache=True)
    tokens, full, next_pos = torch.arange(10)[:, None] + 5, mask, pos[:, -1:] + 1
    for step in range(5):
        if step in (2, 4):                                  # rows leave the batch: 10 -> 8 -> 3
            keep = torch.arange(8 if step == 2 else 3)
            for c in caches:
                c.batch_select_indices(keep)
            tokens, full, next_pos = tokens[keep], full[keep], next_pos[keep]
        full = torch.cat([full, full.new_ones(len(tokens), 1)], dim=1)
        a, b = plain.step(tokens, next_pos, full, caches[0]), mkl.step(tokens, next_pos, full, caches[1])
        assert torch.equal(a, b)
        assert mkl.rows == (10 if step < 2 else 8 if step < 4 else 0)
        tokens, next_pos = a.argmax(-1, keepdim=True), next_pos + 1
    assert all(p.mkl is None for p in mkl._projections())  # 3 rows: below MKL_MIN_ROWS, the copies dropped
    fits = []
    real = LD._Proj.fit
    monkeypatch.setattr(LD._Proj, "fit", lambda self, rows: fits.append(rows) or real(self, rows))
    s = GenSettings(max_new_tokens=8)
    fast = generate_many(model, tok, chats, s, batch_size=10, return_ids=True)
    assert 10 in fits
    monkeypatch.setattr(LD, "MKL_MIN_ROWS", 10**6)
    monkeypatch.setattr(G, "MKL_MIN_ROWS", 10**6)
    fits.clear()
    slow = generate_many(model, tok, chats, s, batch_size=10, return_ids=True)
    assert not [r for r in fits if r] and [a["ids"] for a in fast] == [a["ids"] for a in slow]
