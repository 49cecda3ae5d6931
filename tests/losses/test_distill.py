"""Distillation losses pinned to numbers: the divergences against TRL's GKD loss, the online loss
(chunked_loss with a teacher as reference) and the stored top-k loss against float64 full-logit
references written here from the definitions, not from the code under test.

TRL mapping (GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta,
temperature, reduction), trl 1.16), with p = teacher, q = student, both softmax(logits / tau):
  beta = 0      -> F.kl_div(log q, log p) = KL(p || q)   = slimtune "forward"
  beta = 1      -> F.kl_div(log p, log q) = KL(q || p)   = slimtune "reverse"
  0 < beta < 1  -> beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
                                                          = slimtune "jsd", jsd_beta = beta
  temperature   -> divides both logits; no tau^2 factor (slimtune multiplies by tau^2)
  "batchmean"   -> sum over trained rows and the vocabulary / number of rows with labels != -100
                   (without labels: / the first dimension); "sum" -> the sum; "mean" -> also / V
so  TRL(batchmean) * tau^2 == token_kl(p_logits, q_logits, direction, tau, beta)[labels != -100].mean().
"""

import os

import pytest
import torch
import torch.nn.functional as F

from slimtune.losses.distill import topk_distill_loss
from slimtune.losses.sft import DIRECTIONS, chunked_loss, token_kl

N, H, V = 13, 8, 11
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gkd_loss():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


# ---------------------------------------------------------------------------------------------
# float64 references, from the definitions


def div64(logp, logq, direction, beta):
    """Per-row divergence of teacher log-probs `logp` and student `logq`, (N, C) -> (N,)."""
    p, q = logp.exp(), logq.exp()
    if direction == "forward":
        return (p * (logp - logq)).sum(-1)
    if direction == "reverse":
        return (q * (logq - logp)).sum(-1)
    logm = (beta * p + (1 - beta) * q).log()
    return beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)


def _logits64(hidden, weight, bias, scale=None, softcap=None):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _leaves64(*tensors):
    """fp64 copies that require grad exactly where the originals do (None stays None)."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _grads(loss, tensors):
    """d loss / d each tensor that requires grad, in order."""
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, leaves)


def _inputs(seed=0, train_weight=True, with_bias=True, k=None):
    """Student hidden / weight / bias, targets with 3 untrained rows, and a different teacher."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_(train_weight)
    bias = (0.3 * torch.randn(V, generator=g)).requires_grad_(train_weight) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[0, 5, 6]] = -100
    t_hidden = hidden.detach() + 0.7 * torch.randn(N, H, generator=g)
    t_weight = weight.detach() + 0.5 * torch.randn(V, H, generator=g)  # a teacher, not the base
    t_bias = 0.3 * torch.randn(V, generator=g)
    return hidden, weight, bias, targets, t_hidden, t_weight, t_bias


# ---------------------------------------------------------------------------------------------
# 1. the divergences against TRL


CASES = [(0.0, "forward"), (1.0, "reverse"), (0.1, "jsd"), (0.5, "jsd"), (0.9, "jsd")]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta,direction", CASES)
def test_token_kl_equals_trl_generalized_jsd(gkd_loss, beta, direction, temperature):
    g = torch.Generator().manual_seed(3)
    student = (3 * torch.randn(2, 7, V, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(2, 7, V, generator=g)
    labels = torch.randint(0, V, (2, 7), generator=g)
    labels[0, :3] = labels[1, :2] = -100  # prompt positions
    theirs = gkd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    mask = labels != -100
    ours = token_kl(teacher[mask], student[mask], direction, temperature, jsd_beta=beta or 0.5)
    ours = ours.mean() / temperature**2
    torch.testing.assert_close(ours, theirs, **TOL)
    # and the gradients they hand the student
    torch.testing.assert_close(torch.autograd.grad(ours, student)[0], torch.autograd.grad(theirs, student)[0], **TOL)


@pytest.mark.parametrize("beta,direction", CASES)
def test_trl_reductions(gkd_loss, beta, direction):
    """"sum" is the sum over rows; "batchmean" without labels divides by the first dimension."""
    g = torch.Generator().manual_seed(4)
    student, teacher = 2 * torch.randn(9, V, generator=g), 2 * torch.randn(9, V, generator=g)
    rows = token_kl(teacher, student, direction, 2.0, jsd_beta=beta or 0.5) / 4.0
    total = gkd_loss(student, teacher, beta=beta, temperature=2.0, reduction="sum")
    torch.testing.assert_close(rows.sum(), total, **TOL)
    torch.testing.assert_close(rows.mean(), gkd_loss(student, teacher, beta=beta, temperature=2.0), **TOL)


def test_trl_jsd_endpoints_are_special_cases(gkd_loss):
    """TRL's beta = 0 is KL(p || q), yet its JSD tends to 0 as beta -> 0: only the endpoints are KLs."""
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(4, V, generator=g), torch.randn(4, V, generator=g)
    kl = gkd_loss(student, teacher, beta=0.0)
    assert float(kl) > 0.05
    assert float(gkd_loss(student, teacher, beta=1e-6)) < 1e-5


# ---------------------------------------------------------------------------------------------
# 2. online distillation = chunked_loss with the teacher as reference


def _online64(hidden, weight, bias, targets, t_hidden, t_weight, t_bias, alpha, tau, direction,
              beta, transform):
    z = _logits64(hidden, weight, bias, *transform)
    t = _logits64(t_hidden, t_weight, t_bias, *transform)
    mask = targets != -100
    ce = F.cross_entropy(z, targets, ignore_index=-100, reduction="sum")
    d = div64(t[mask].div(tau).log_softmax(-1), z[mask].div(tau).log_softmax(-1), direction, beta)
    return (alpha * ce + (1 - alpha) * tau**2 * d.sum()) / int(mask.sum())


@pytest.mark.parametrize("transform", [(None, None), (0.8, 4.0)], ids=["plain", "scale_softcap"])
@pytest.mark.parametrize("train_weight", [True, False], ids=["weight_trains", "weight_frozen"])
@pytest.mark.parametrize("chunk_size", [4, 5])  # neither divides N = 13
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_online_distill_equals_float64_reference(direction, temperature, chunk_size, train_weight, transform):
    hidden, weight, bias, targets, t_hidden, t_weight, t_bias = _inputs(train_weight=train_weight)
    alpha, beta, n = 0.3, 0.3, N - 3
    out = chunked_loss(hidden, weight, targets, bias=bias, ref_hidden=t_hidden, ref_weight=t_weight,
                       ref_bias=t_bias, kl_lambda=(1 - alpha) / alpha, normaliser=n / alpha,
                       temperature=temperature, direction=direction, jsd_beta=beta, chunk_size=chunk_size,
                       logit_scale=transform[0], logit_softcap=transform[1])
    leaves = _leaves64(hidden, weight, bias)
    ref = _online64(*leaves, targets, t_hidden, t_weight, t_bias, alpha, temperature, direction, beta, transform)
    torch.testing.assert_close(out.loss.double(), ref, **TOL)
    grads, ref_grads = _grads(out.loss, (hidden, weight, bias)), _grads(ref, leaves)
    assert len(grads) == (3 if train_weight else 1)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **TOL)


# ---------------------------------------------------------------------------------------------
# 3. the stored top-k loss


def _stored(t_logits, k, tau):
    """What the teacher store holds: the top-k ids and fp32 log softmax(logits / tau) there."""
    ids = t_logits.topk(k, -1).indices
    return ids, t_logits.double().div(tau).log_softmax(-1).gather(1, ids).float()


def _restricted64(hidden, weight, bias, targets, t_logits, ids, alpha, tau, direction, beta, tail,
                  transform=(None, None), norm=None):
    """The online loss restricted to the same k ids, in fp64 with the teacher's full logits:
    bucket = the k ids + everything else as one category; renorm = the k ids, renormalised."""
    z = _logits64(hidden, weight, bias, *transform)
    ce = F.cross_entropy(z, targets, ignore_index=-100, reduction="sum")
    member = torch.zeros(z.shape, dtype=torch.bool).scatter(1, ids, True)

    def categories(logits):
        prob = logits.double().div(tau).softmax(-1)
        top = prob.gather(1, ids)
        if tail == "bucket":
            return torch.cat([top, prob.masked_fill(member, 0).sum(-1, keepdim=True)], 1).log()
        return (top / top.sum(-1, keepdim=True)).log()

    d = div64(categories(t_logits), categories(z), direction, beta)
    norm = norm or int((targets != -100).sum())
    return (alpha * ce + (1 - alpha) * tau**2 * d.sum()) / norm


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_topk_with_whole_vocabulary_equals_online_loss(direction, temperature, tail):
    """K = V: no tail, nothing to renormalise, so the stored loss is the online loss (1e-6)."""
    hidden, weight, bias, targets, t_hidden, t_weight, t_bias = _inputs()
    targets[[0, 5, 6]] = torch.tensor([1, 2, 3])  # the store's rows are all trained positions
    alpha = 0.3
    t_logits = t_hidden @ t_weight.T + t_bias   # the fp32 teacher logits chunked_loss builds
    ids = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i)) for i in range(N)])
    logps = t_logits.div(temperature).log_softmax(-1).gather(1, ids)  # any order of the ids
    kw = dict(bias=bias, temperature=temperature, direction=direction, jsd_beta=0.3, chunk_size=4)
    out = topk_distill_loss(hidden, weight, targets, ids, logps, alpha=alpha, tail=tail, **kw)
    online = chunked_loss(hidden, weight, targets, ref_hidden=t_hidden, ref_weight=t_weight, ref_bias=t_bias,
                          kl_lambda=(1 - alpha) / alpha, normaliser=N / alpha, **kw)
    tight = dict(atol=1e-6, rtol=1e-6)
    for a, b in [(out.loss, online.loss), (out.ce_sum, online.ce_sum), (out.kl_sum, online.kl_sum)]:
        torch.testing.assert_close(a, b, **tight)
    assert (out.n_tokens, out.n_kl_tokens) == (online.n_tokens, online.n_kl_tokens) == (N, N)
    for a, b in zip(_grads(out.loss, (hidden, weight, bias)), _grads(online.loss, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, **tight)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_topk_alpha_endpoints(alpha):
    """alpha = 1 is plain CE; alpha = 0 the divergence alone (chunked_loss with no CE rows)."""
    hidden, weight, bias, targets, t_hidden, t_weight, t_bias = _inputs()
    t_logits = t_hidden @ t_weight.T + t_bias
    ids = t_logits.argsort(-1, descending=True)
    logps = t_logits.log_softmax(-1).gather(1, ids)
    out = topk_distill_loss(hidden, weight, targets, ids, logps, alpha=alpha, bias=bias, chunk_size=5)
    if alpha == 1.0:
        ref = chunked_loss(hidden, weight, targets, bias=bias, chunk_size=5)
    else:  # every row gets the divergence; CE on none; same normaliser (the CE rows)
        ref = chunked_loss(hidden, weight, torch.full_like(targets, -100), bias=bias, ref_hidden=t_hidden,
                           ref_weight=t_weight, ref_bias=t_bias, kl_mask=torch.ones(N, dtype=torch.bool),
                           kl_lambda=1.0, normaliser=N - 3, chunk_size=5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(_grads(out.loss, (hidden, weight, bias)), _grads(ref.loss, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_topk_equals_online_loss_restricted_to_the_same_k(direction, temperature, tail, k):
    hidden, weight, bias, targets, t_hidden, t_weight, t_bias = _inputs()
    t_logits = _logits64(t_hidden, t_weight, t_bias)
    ids, logps = _stored(t_logits, k, temperature)
    out = topk_distill_loss(hidden, weight, targets, ids, logps, alpha=0.4, temperature=temperature,
                            direction=direction, jsd_beta=0.3, tail=tail, bias=bias, chunk_size=4)
    leaves = _leaves64(hidden, weight, bias)
    ref = _restricted64(*leaves, targets, t_logits, ids, 0.4, temperature, direction, 0.3, tail)
    torch.testing.assert_close(out.loss.double(), ref, **TOL)
    for a, b in zip(_grads(out.loss, (hidden, weight, bias)), _grads(ref, leaves)):
        torch.testing.assert_close(a.double(), b, **TOL)
    if tail == "renorm" and k == 1:  # one category: no divergence, no gradient from it
        assert float(out.kl_sum) == pytest.approx(0.0, abs=1e-5)  # fp32 rounding of log m


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_topk_head_transforms_and_normaliser(tail):
    """The head's scale and soft-cap, a frozen weight (no weight grad), an explicit normaliser."""
    hidden, weight, bias, targets, t_hidden, t_weight, t_bias = _inputs(train_weight=False)
    t_logits = _logits64(t_hidden, t_weight, t_bias, 0.8, 4.0)
    ids, logps = _stored(t_logits, 3, 2.0)
    out = topk_distill_loss(hidden, weight, targets, ids, logps, alpha=0.2, temperature=2.0, tail=tail,
                            bias=bias, logit_scale=0.8, logit_softcap=4.0, normaliser=40, chunk_size=3)
    leaves = _leaves64(hidden, weight, bias)
    ref = _restricted64(*leaves, targets, t_logits, ids, 0.2, 2.0, "forward", 0.5, tail, (0.8, 4.0), 40)
    torch.testing.assert_close(out.loss.double(), ref, **TOL)
    (g,), (rg,) = _grads(out.loss, (hidden, weight, bias)), _grads(ref, leaves)
    torch.testing.assert_close(g.double(), rg, **TOL)


def test_topk_accumulates_like_one_batch():
    """Two halves with the whole batch's normaliser sum to the whole batch, loss and grads."""
    hidden, weight, bias, targets, t_hidden, t_weight, t_bias = _inputs()
    ids, logps = _stored(_logits64(t_hidden, t_weight, t_bias), 4, 1.0)
    kw = dict(bias=bias, normaliser=N - 3, chunk_size=4)
    whole = topk_distill_loss(hidden, weight, targets, ids, logps, **kw)
    parts = sum(topk_distill_loss(hidden[s], weight, targets[s], ids[s], logps[s], **kw).loss
                for s in (slice(0, 6), slice(6, N)))
    torch.testing.assert_close(parts, whole.loss, **TOL)
    for a, b in zip(_grads(parts, (hidden, weight, bias)), _grads(whole.loss, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, **TOL)


def test_topk_tail_covered_to_rounding_stays_finite():
    """A top k holding all the teacher's mass (sum exp >= 1 in fp32) leaves a floored, finite tail."""
    hidden, weight, bias, targets, *_ = _inputs()
    t_logits = torch.full((N, V), -200.0)
    t_logits[:, :3] = torch.randn(N, 3)
    ids, logps = _stored(t_logits, 3, 1.0)
    for direction in DIRECTIONS:
        out = topk_distill_loss(hidden, weight, targets, ids, logps, direction=direction, bias=bias)
        grads = _grads(out.loss, (hidden, weight, bias))
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)


def test_topk_no_grad_and_low_precision():
    hidden, weight, bias, targets, t_hidden, t_weight, t_bias = _inputs()
    ids, logps = _stored(_logits64(t_hidden, t_weight, t_bias), 4, 1.0)
    with torch.no_grad():
        out = topk_distill_loss(hidden, weight, targets, ids, logps, bias=bias)
    assert not out.loss.requires_grad
    bf = topk_distill_loss(hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16(), targets,
                           ids.int(), logps, bias=bias.detach().bfloat16())  # int32 ids, as stored
    torch.testing.assert_close(bf.loss.float(), out.loss, atol=0.05, rtol=0.02)
    bf.loss.backward()


@pytest.mark.parametrize("change,match", [
    (dict(ids=torch.zeros(N, 2, dtype=torch.long)), "repeat"),
    (dict(ids=torch.full((N, 2), V)), r"\[0, 11\)"),
    (dict(ids=torch.zeros(N, V + 1, dtype=torch.long)), "1 <= K <= V"),
    (dict(logps=torch.zeros(N, 3)), "must both be"),
    (dict(tail="drop"), "bucket, renorm"),
    (dict(alpha=1.5), "alpha"),
    (dict(direction="jsd", jsd_beta=1.0), "jsd_beta"),
])
def test_topk_bad_arguments(change, match):
    hidden, weight, _, targets, *_ = _inputs()
    args = dict(ids=torch.stack([torch.arange(2)] * N), logps=torch.full((N, 2), -1.0))
    args.update(change)
    ids, logps = args.pop("ids"), args.pop("logps")
    with pytest.raises(ValueError, match=match):
        topk_distill_loss(hidden, weight, targets, ids, logps, **args)
