"""pack_shared_prefix: a prompt's completions in one row compute what each computes alone in its
own [prompt, completion] row (positions, attention, the predicting position of every token)."""

import torch
from tiny import make_model, make_tokenizer

from slimtune.data.batching import pack_shared_prefix


def test_layout_mask_and_predicting_positions():
    prompts = [[1, 2, 3], [1, 2, 3], [7, 8]]
    completions = [[10, 11], [20], [30, 31, 32]]
    b = pack_shared_prefix(prompts, completions, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20], [7, 8, 30, 31, 32, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 4, 0]]
    m = b["attention_mask"][:, 0]
    # completion 2 (index 5) sees the prompt and itself, not completion 1
    assert m[0, 5].tolist() == [True, True, True, False, False, True]
    assert m[0, 4].tolist() == [True, True, True, True, True, False]
    assert m[0, 2].tolist() == [True, True, True, False, False, False]      # the prompt: causal
    assert m[1, 5].tolist() == [False] * 5 + [True]                         # padding: itself only
    assert not m[1, :5, 5].any()                                            # nobody attends to padding
    # token t is predicted at the prompt's last position (t = 0), else at its previous token
    assert b["pred_at"].tolist() == [2, 3, 2, 6 + 1, 6 + 2, 6 + 3]
    assert b["target_ids"].tolist() == [10, 11, 20, 30, 31, 32] and b["lengths"].tolist() == [2, 1, 3]


def test_packed_logits_equal_one_row_per_completion():
    tok = make_tokenizer("chatml")
    model = make_model(tok, hidden=64, layers=2, seed=3).double().eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (7, 7, 7, 4, 4)]
    prompts[1] = prompts[2] = prompts[0]
    prompts[4] = prompts[3]
    completions = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (3, 5, 1, 4, 2)]
    b = pack_shared_prefix(prompts, completions, pad_id=0)
    assert b["input_ids"].shape[0] == 2
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                       attention_mask=b["attention_mask"]).logits.flatten(0, 1)[b["pred_at"]]
        alone = torch.cat([model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) + len(c) - 1]
                           for p, c in zip(prompts, completions)])
    torch.testing.assert_close(packed, alone, atol=1e-9, rtol=1e-9)
    assert torch.equal(b["target_ids"], torch.tensor([t for c in completions for t in c]))


def test_grouped_attention_equals_the_masked_attention_values_and_grads():
    """grouped_attention (prompts causal, each completion against [its prompt, itself]) computes what
    SDPA computes over the whole row under pack_shared_prefix's mask, at every real position, and
    the same gradients: unequal prompts, an empty completion, a prompt longer than another row's,
    grouped query heads (4 query heads on 2 key/value heads), float64."""
    import torch.nn.functional as F

    from slimtune.train.precision import grouped_attention

    g = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3, 4, 5]] * 3 + [[7, 8]] * 2 + [[9, 9, 9]]
    completions = [[11, 12, 13], [14], [15, 16, 17, 18], [19, 20], [], [21, 22, 23, 24, 25]]
    b = pack_shared_prefix(prompts, completions, pad_id=0)
    R, _, T, _ = b["attention_mask"].shape
    q = torch.randn(R, 4, T, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(R, 2, T, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=b["attention_mask"], enable_gqa=True).transpose(1, 2)
    got = grouped_attention(q, k, v, b["groups"])
    real = b["input_ids"] != 0                                    # (R, T): padding positions are never read
    assert got.shape == want.shape and int(real.sum()) == (5 + 3 + 1 + 4) + (2 + 2 + 0) + (3 + 5)
    torch.testing.assert_close(got[real], want[real], atol=1e-12, rtol=1e-12)
    w = torch.randn(want.shape, dtype=torch.float64, generator=g) * real[:, :, None, None]
    for a, e in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    layout = b["groups"]
    assert layout["cmask"].shape == (6, 1, 5, 5 + 5) and layout["pmask"].shape == (3, 1, 5, 5)
    assert layout["cmask"].any(-1).all() and layout["pmask"].any(-1).all()   # no query without a key (no NaN)
