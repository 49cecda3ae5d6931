"""Chunked CE + KL against the naive full-logits path, hand-computed divergences, and docs/kl.md."""

import math
import re
from pathlib import Path

import pytest
import torch

from slimtune.losses.sft import chunked_loss, reference_loss, token_kl

N, H, V = 13, 8, 11
DOC = Path(__file__).resolve().parents[2] / "docs" / "kl.md"


def _inputs(seed=0, dtype=torch.float32, train_weight=False, with_bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    ref_hidden = hidden.detach() + 0.5 * torch.randn(N, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_(train_weight)
    bias = (0.1 * torch.randn(V, generator=g)).to(dtype).requires_grad_(train_weight) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[0, 5, 6]] = -100  # e.g. prompt tokens
    return hidden, weight, bias, ref_hidden, targets


def _run(fn, hidden, weight, bias, targets, scale=1.0, **kw):
    """Loss and grads of `scale * loss` w.r.t. hidden (and weight/bias when they train)."""
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    out = fn(hidden, weight, targets, bias=bias, **kw)
    (scale * out.loss).backward()
    return out, [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])  # 5 does not divide 13; 64 > N
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_chunked_matches_reference(chunk_size, direction):
    hidden, weight, bias, ref_hidden, targets = _inputs(train_weight=True, with_bias=True)
    kw = dict(ref_hidden=ref_hidden, kl_lambda=0.3, direction=direction, jsd_beta=0.3,
              chunk_size=chunk_size)
    ref, ref_grads = _run(reference_loss, hidden, weight, bias, targets, scale=2.5, **kw)
    out, grads = _run(chunked_loss, hidden, weight, bias, targets, scale=2.5, **kw)
    assert (out.n_tokens, out.n_kl_tokens) == (N - 3, N - 3)
    for a, b in [(out.loss, ref.loss), (out.ce_sum, ref.ce_sum), (out.kl_sum, ref.kl_sum)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(grads) == 3
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not out.ce_sum.requires_grad and not out.kl_sum.requires_grad


@pytest.mark.parametrize("opts", [
    dict(temperature=2.0),
    dict(logit_softcap=3.0),
    dict(kl_mask=torch.ones(N, dtype=torch.bool)),  # KL on every row, CE only where targets != -100
    dict(normaliser=100),
    dict(ref_weight=torch.randn(V, H, generator=torch.Generator().manual_seed(9))),  # full FT copy
], ids=["tau2", "softcap", "kl_all_rows", "normaliser", "ref_weight"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_chunked_matches_reference_options(opts, direction):
    """Frozen weight (the LoRA case): only hidden gets a grad, weight.grad stays None."""
    hidden, weight, _, ref_hidden, targets = _inputs(seed=1)
    kw = dict(ref_hidden=ref_hidden, kl_lambda=0.5, direction=direction, chunk_size=4, **opts)
    ref, (ref_g,) = _run(reference_loss, hidden, weight, None, targets, **kw)
    out, (g,) = _run(chunked_loss, hidden, weight, None, targets, **kw)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.kl_sum, ref.kl_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)
    assert weight.grad is None
    assert out.n_kl_tokens == (N if "kl_mask" in opts else N - 3)


def test_ce_only_matches_cross_entropy():
    hidden, weight, _, _, targets = _inputs(train_weight=True)
    out, (gh, gw) = _run(chunked_loss, hidden, weight, None, targets, chunk_size=3)
    logits = hidden @ weight.T
    expect = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    eh, ew = torch.autograd.grad(expect, (hidden, weight))
    torch.testing.assert_close(out.loss, expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gh, eh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, ew, atol=1e-6, rtol=1e-5)
    assert out.kl_sum == 0 and out.n_kl_tokens == 0


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_kl_zero_against_itself(direction):
    hidden, weight, _, _, targets = _inputs()
    out = chunked_loss(hidden, weight, targets, ref_hidden=hidden.detach(), ref_weight=weight,
                       kl_lambda=1.0, direction=direction, chunk_size=4)
    assert abs(out.kl_sum.item()) < 1e-7
    if direction != "jsd":  # log p - log q is exactly 0 here; jsd goes through log m
        assert out.kl_sum.item() == 0.0


def test_lambda_zero_is_exactly_plain_ce():
    hidden, weight, _, ref_hidden, targets = _inputs(train_weight=True)
    plain, g_plain = _run(chunked_loss, hidden, weight, None, targets, chunk_size=4)
    with_ref, g_ref = _run(chunked_loss, hidden, weight, None, targets, chunk_size=4,
                           ref_hidden=ref_hidden, kl_lambda=0.0)
    assert torch.equal(plain.loss, with_ref.loss)
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_ref))
    assert with_ref.kl_sum > 0 and with_ref.n_kl_tokens == N - 3  # still reported (KL warm-up)


# Two tokens, three words. Base p and tuned q written out so each divergence has a closed form.
P = [[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]
Q = [[0.25, 0.5, 0.25], [0.4, 0.4, 0.2]]
LN2 = math.log(2)
HAND = {
    # sum_v p (ln p - ln q): row 1 = .5 ln 2 + .25 ln .5 + 0; row 2 = .8 ln 2 + .1 ln .25 + .1 ln .5
    "forward": [0.25 * LN2, 0.5 * LN2],
    # sum_v q (ln q - ln p): row 1 = .25 ln .5 + .5 ln 2; row 2 = .4 ln .5 + .4 ln 4 + .2 ln 2
    "reverse": [0.25 * LN2, 0.6 * LN2],
    # beta = 0.5: m1 = (.375, .375, .25), m2 = (.6, .25, .15)
    "jsd": [0.5 * (0.5 * math.log(.5 / .375) + 0.25 * math.log(.25 / .375))
            + 0.5 * (0.25 * math.log(.25 / .375) + 0.5 * math.log(.5 / .375)),
            0.5 * (0.8 * math.log(.8 / .6) + 0.1 * math.log(.1 / .25) + 0.1 * math.log(.1 / .15))
            + 0.5 * (0.4 * math.log(.4 / .6) + 0.4 * math.log(.4 / .25) + 0.2 * math.log(.2 / .15))],
}


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_directions_by_hand(direction):
    p_logits, q_logits = torch.tensor(P).log(), torch.tensor(Q).log()
    got = token_kl(p_logits, q_logits, direction, 1.0, 0.5)
    torch.testing.assert_close(got, torch.tensor(HAND[direction]), atol=1e-6, rtol=0)
    # the same through chunked_loss: hidden = log q and weight = I make the logits log q
    targets = torch.tensor([1, 0])
    out = chunked_loss(q_logits, torch.eye(3), targets, ref_hidden=p_logits, kl_lambda=0.1,
                       direction=direction, chunk_size=1)
    ce = -math.log(0.5) - math.log(0.4)
    assert out.ce_sum.item() == pytest.approx(ce, abs=1e-6)
    assert out.loss.item() == pytest.approx((ce + 0.1 * sum(HAND[direction])) / 2, abs=1e-6)


def test_jsd_beta_convention():
    """beta weighs the base: beta * KL(p||m) + (1 - beta) * KL(q||m), m = beta p + (1 - beta) q."""
    m = [0.25 * 0.5 + 0.75 * 0.25, 0.25 * 0.25 + 0.75 * 0.5, 0.25]  # (.3125, .4375, .25)
    kl_pm = 0.5 * math.log(.5 / m[0]) + 0.25 * math.log(.25 / m[1])
    kl_qm = 0.25 * math.log(.25 / m[0]) + 0.5 * math.log(.5 / m[1])
    got = token_kl(torch.tensor(P[:1]).log(), torch.tensor(Q[:1]).log(), "jsd", 1.0, 0.25)
    assert got.item() == pytest.approx(0.25 * kl_pm + 0.75 * kl_qm, abs=1e-7)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_temperature_scales_by_tau_squared(direction):
    # logits = tau * log p, so softmax(logits / tau) = p: the divergence is the hand value x tau^2
    tau = 2.0
    got = token_kl(tau * torch.tensor(P).log(), tau * torch.tensor(Q).log(), direction, tau, 0.5)
    torch.testing.assert_close(got, tau**2 * torch.tensor(HAND[direction]), atol=1e-6, rtol=0)


def test_normaliser_accumulates_like_one_batch():
    hidden, weight, _, ref_hidden, targets = _inputs(train_weight=True)
    kw = dict(ref_hidden=ref_hidden, kl_lambda=0.2, chunk_size=4)
    whole, (gh, gw) = _run(chunked_loss, hidden, weight, None, targets, **kw)
    total = int((targets != -100).sum())
    weight.grad, hidden.grad, loss = None, None, 0.0
    for rows in (slice(0, 6), slice(6, N)):
        h = hidden[rows]
        out = chunked_loss(h, weight, targets[rows], normaliser=total, chunk_size=4,
                           ref_hidden=ref_hidden[rows], kl_lambda=0.2)
        out.loss.backward()
        loss += out.loss.item()
    assert loss == pytest.approx(whole.loss.item(), abs=1e-6)
    torch.testing.assert_close(hidden.grad, gh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad, gw, atol=1e-6, rtol=1e-5)


def test_bf16_close_to_fp32():
    hidden, weight, _, ref_hidden, targets = _inputs(train_weight=True)
    kw = dict(ref_hidden=ref_hidden, kl_lambda=0.5, chunk_size=5)
    ref, (rh, rw) = _run(chunked_loss, hidden, weight, None, targets, **kw)
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    out, (gh, gw) = _run(chunked_loss, hb, wb, None, targets, ref_hidden=ref_hidden.bfloat16(),
                         kl_lambda=0.5, chunk_size=5)
    assert gh.dtype == gw.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, atol=0.05, rtol=0.02)
    torch.testing.assert_close(gh.float(), rh, atol=0.02, rtol=0.05)
    torch.testing.assert_close(gw.float(), rw, atol=0.02, rtol=0.05)


def test_no_grad_evaluation():
    hidden, weight, _, ref_hidden, targets = _inputs(train_weight=True)
    with torch.no_grad():
        out = chunked_loss(hidden, weight, targets, ref_hidden=ref_hidden, chunk_size=4)
    expect = reference_loss(hidden, weight, targets, ref_hidden=ref_hidden)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.kl_sum, expect.kl_sum, atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    hidden, weight, _, _, targets = _inputs()
    with pytest.raises(ValueError, match="ref_hidden"):
        chunked_loss(hidden, weight, targets, kl_lambda=0.1)
    with pytest.raises(ValueError, match="direction"):
        chunked_loss(hidden, weight, targets, ref_hidden=hidden, direction="sideways")


def _floats(cells):
    return [float(x) for x in re.findall(r"\d+\.\d+", cells)]


def test_docs_worked_example():
    """Read the inputs and every printed number from docs/kl.md and recompute them."""
    text = DOC.read_text()
    rows = re.findall(r"^\| (\d) \| (\w+) \| ([\d., ]+) \| ([\d., ]+) \|$", text, re.M)
    vocab = re.search(r"vocabulary `\[(.*?)\]`", text, re.I).group(1).replace('"', "").split(", ")
    assert len(rows) == 4 and len(vocab) == 3
    targets = torch.tensor([vocab.index(r[1]) for r in rows])
    p = torch.tensor([_floats(r[2]) for r in rows], dtype=torch.float64)
    q = torch.tensor([_floats(r[3]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(p.sum(1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(q.sum(1), torch.ones(4, dtype=torch.float64))

    ce = -q.log().gather(1, targets[:, None]).squeeze(1)
    entropy = -(p * p.log()).sum(1)
    cross = -(p * q.log()).sum(1)
    kl = token_kl(p.log(), q.log(), "forward", 1.0, 0.5)
    torch.testing.assert_close(kl, cross - entropy)
    expect = torch.stack([ce, entropy, cross, kl], 1)  # (4, 4) columns as in the doc

    table = re.findall(r"^\| (\d|sum|mean) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    printed = {r[0]: torch.tensor([float(x) for x in r[1:]], dtype=torch.float64) for r in table}
    assert set(printed) == {"1", "2", "3", "4", "sum", "mean"}
    for i in range(4):
        torch.testing.assert_close(printed[str(i + 1)], expect[i], atol=1e-4, rtol=0)
    torch.testing.assert_close(printed["sum"], expect.sum(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(printed["mean"], expect.mean(0), atol=1e-4, rtol=0)

    lam, loss = re.search(r"With lambda = ([\d.]+): .*= \*\*([\d.]+)\*\*", text).groups()
    out = chunked_loss(q.log().float(), torch.eye(3), targets, ref_hidden=p.log().float(),
                       kl_lambda=float(lam), chunk_size=3)
    assert out.loss.item() == pytest.approx(float(loss), abs=1e-4)
