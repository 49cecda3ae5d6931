"""GRPO pieces: advantages, the completion mask and the clipped loss against TRL 1.16's own
GRPOTrainer (its `_generate_and_score_completions` and `_compute_loss`, with generation and the
model's log-probs replaced by fixed numbers), and against float64 references written here as
plain loops."""

import math

import pytest
import torch

from slimtune.losses.grpo import completion_mask, group_advantages, grpo_loss, no_signal_share

EOT, PAD = 1, 2  # <|im_end|> and <|endoftext|> in tiny.make_tokenizer("chatml")
G, T = 3, 5
# Raw generated rows (N = 2 prompts x 3, T = 5): tokens after the first EOT are junk to be masked.
RAW = torch.tensor([
    [40, 41, EOT, 50, 51],     # ends at 2
    [40, 41, 42, 43, 44],      # truncated
    [EOT, 60, 61, 62, 63],     # ends at 0: one token
    [45, 46, 47, EOT, 47],     # ends at 3
    [45, 46, 47, 48, EOT],     # ends at the last position
    [45, 46, 47, 48, 49],      # truncated
])
REWARDS = torch.tensor([0.0, 1.0, 0.5, 0.25, 2.0, -1.0])  # with OLD: rows 0 and 4 clip low and high
EQUAL_GROUP = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 0.2])


def fixed_logps(seed):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(6, T, generator=g, dtype=torch.float64) * 3 - 0.05


LOGPS, OLD, REF = fixed_logps(0), fixed_logps(1), fixed_logps(2)
OLD = LOGPS + (OLD - LOGPS) * 0.3  # ratios spread over ~[0.5, 2]: both clips active


# --- the completion mask


def test_completion_mask_keeps_through_the_first_eot_and_masks_truncated_rows_on_request():
    mask, ended = completion_mask(RAW, [EOT])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1] * 5, [1] * 5]
    assert ended.tolist() == [True, False, True, True, True, False]
    cut, _ = completion_mask(RAW, [EOT], mask_truncated=True)
    assert cut.sum(1).tolist() == [3, 0, 1, 4, 5, 0]
    two, _ = completion_mask(torch.tensor([[5, 7, 9, EOT]]), [EOT, 7])  # several end-of-turn ids
    assert two.tolist() == [[1, 1, 0, 0]]


# --- advantages


def test_group_advantages_by_group_std_batch_std_and_none_float64_loops():
    r = REWARDS.double()
    for scale in ("group", "batch", "none"):
        got = group_advantages(r, G, scale)
        for i in range(6):
            grp = [float(x) for x in r[i // G * G:i // G * G + G]]
            mean = sum(grp) / G
            pool = grp if scale == "group" else [float(x) for x in r]
            m = sum(pool) / len(pool)
            std = math.sqrt(sum((x - m) ** 2 for x in pool) / (len(pool) - 1))  # Bessel, as TRL
            want = (float(r[i]) - mean) / (1.0 if scale == "none" else std + 1e-4)
            assert float(got[i]) == pytest.approx(want, abs=1e-12), (scale, i)


def test_a_group_with_all_equal_rewards_has_zero_advantage_and_counts_as_no_signal():
    for scale in ("group", "batch", "none"):
        adv = group_advantages(EQUAL_GROUP, G, scale)
        assert adv[:G].abs().max() == 0
        assert adv[G:].abs().min() > 0.1
    assert no_signal_share(EQUAL_GROUP, G) == 0.5
    assert no_signal_share(REWARDS, G) == 0.0
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 4)


# --- float64 references written as loops, one per aggregation


def loop_loss(logps, old, adv, mask, ref, beta, lo, hi, loss_type, max_len=None, num_items=None):
    """Plain Python floats; tensors only come in and go out as nested lists."""
    logps, old, adv, mask, ref = (x.tolist() for x in (logps, old, adv, mask, ref))
    per_seq, total, n_tok = [], 0.0, 0
    for i in range(len(logps)):
        s, k = 0.0, 0
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            a = adv[i]
            l_t = -min(ratio * a, min(max(ratio, 1 - lo), 1 + hi) * a)
            if beta:
                d = ref[i][t] - logps[i][t]
                l_t += beta * (math.exp(d) - d - 1) * ratio
            s, k = s + l_t, k + 1
        per_seq.append(s / max(k, 1))
        total, n_tok = total + s, n_tok + k
    if loss_type == "grpo":
        return sum(per_seq) / len(per_seq)
    if loss_type == "bnpo":
        return total / n_tok
    if loss_type == "dr_grpo":
        return total / (len(logps) * max_len)
    return total / (num_items or n_tok)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_each_aggregation_equals_a_float64_loop(loss_type, beta):
    mask, _ = completion_mask(RAW, [EOT])
    adv = group_advantages(REWARDS.double(), G)
    kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=8)
    out = grpo_loss(LOGPS, OLD, adv, mask, REF, **kw)
    want = loop_loss(LOGPS, OLD, adv, mask, REF, beta, 0.2, 0.28, loss_type, 8)
    assert float(out.loss) == pytest.approx(want, abs=1e-12)
    if loss_type == "dapo":  # divided by the tokens of the whole generation batch, not this piece
        out = grpo_loss(LOGPS, OLD, adv, mask, REF, **{**kw, "num_items": 40})
        assert float(out.loss) == pytest.approx(loop_loss(LOGPS, OLD, adv, mask, REF, beta,
                                                          0.2, 0.28, "dapo", num_items=40), abs=1e-12)


def test_on_policy_loss_is_minus_the_advantage_mean_and_its_gradient_is_the_policy_gradient():
    logps = LOGPS.clone().requires_grad_()
    mask, _ = completion_mask(RAW, [EOT])
    adv = group_advantages(REWARDS.double(), G)
    out = grpo_loss(logps, None, adv, mask, loss_type="bnpo")
    n = mask.sum()
    assert float(out.loss) == pytest.approx(float(-(adv[:, None] * mask).sum() / n))
    out.loss.backward()
    assert torch.allclose(logps.grad, -adv[:, None] * mask / n)
    assert out.clip_region == 0 and out.tokens == int(n)


def test_clip_shares_count_only_the_active_side_of_the_clip():
    logps = torch.zeros(2, 2, dtype=torch.float64)
    old = torch.tensor([[-0.5, 0.5], [-0.5, 0.5]], dtype=torch.float64)  # ratios e^.5 = 1.65, e^-.5 = 0.61
    out = grpo_loss(logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), epsilon_low=0.2, epsilon_high=0.28)
    # row 0 (A > 0): 1.65 > 1.28 clipped high; row 1 (A < 0): 0.61 < 0.8 clipped low
    assert (out.clip_high, out.clip_low, out.clip_region) == (0.25, 0.25, 0.5)
    assert (out.clip_low_min, out.clip_high_max) == (0.0, 0.5)


# --- TRL parity: TRL's own trainer, with generation and the model's log-probs replaced

trl = pytest.importorskip("trl")


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.fixture(scope="module")
def tok():
    from tiny import make_tokenizer

    t = make_tokenizer("chatml")
    assert (t.convert_tokens_to_ids("<|im_end|>"), t.pad_token_id) == (EOT, PAD)
    return t


def trl_grpo(tok, rewards, **kw):
    """A real GRPOTrainer on a tiny model (beta 0 at build: TRL would load a reference by name;
    beta is set on it afterwards, _compute_loss reads it from there)."""
    from datasets import Dataset
    from tiny import make_model

    kw = {"per_device_train_batch_size": 6, **kw}
    args = trl.GRPOConfig(output_dir="/tmp/slimtune-trl-grpo", use_cpu=True, report_to=[], num_generations=G,
                          max_completion_length=T, **kw)
    reward = lambda prompts, completions, **_: [float(r) for r in rewards]  # noqa: E731
    tr = trl.GRPOTrainer(model=make_model(tok), reward_funcs=[reward], args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"prompt": "hi"}] * 2))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # set by transformers' training loop
    return tr


def trl_score(tr, raw):
    """TRL's advantages, completion mask and token count for generated rows `raw` (N, T)."""
    lists = []
    for row in raw.tolist():  # what TRL's generation hands on: each row cut after its first EOT
        lists.append(row[:row.index(EOT) + 1] if EOT in row else row)
    tr._generate_single_turn = lambda *a, **k: (lists, None)
    return tr._generate_and_score_completions([{"prompt": "hello"}] * G + [{"prompt": "how are you"}] * G)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_advantages_and_mask_equal_trls(tok, scale, mask_truncated):
    tr = trl_grpo(tok, REWARDS, scale_rewards=scale, mask_truncated_completions=mask_truncated)
    out = trl_score(tr, RAW)
    mask, _ = completion_mask(RAW, [EOT], mask_truncated=mask_truncated)
    assert torch.equal(out["completion_mask"].long(), mask)
    assert int(out["num_items_in_batch"]) == int(mask.sum())
    assert torch.allclose(group_advantages(REWARDS, G, scale), out["advantages"], atol=1e-6)
    assert tr._metrics["train"]["frac_reward_zero_std"][-1] == 0.0
    tr2 = trl_grpo(tok, EQUAL_GROUP, scale_rewards="group")
    assert torch.allclose(group_advantages(EQUAL_GROUP, G), trl_score(tr2, RAW)["advantages"], atol=1e-6)
    assert tr2._metrics["train"]["frac_reward_zero_std"][-1] == no_signal_share(EQUAL_GROUP, G)


def trl_loss(tr, inputs, logps):
    """TRL's `_compute_loss` with the model's per-token log-probs replaced by `logps` (N, T)."""
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    return tr._compute_loss(tr.model, inputs)


CASES = [(lt, beta, scale) for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.05)
         for scale in ("group", "batch", "none")]


@pytest.mark.parametrize("loss_type, beta, scale", CASES)
def test_loss_and_gradient_equal_trls_compute_loss(tok, loss_type, beta, scale):
    tr = trl_grpo(tok, REWARDS, loss_type=loss_type, scale_rewards=scale, epsilon=0.2, epsilon_high=0.28,
                  mask_truncated_completions=True)
    inputs = trl_score(tr, RAW)
    tr.beta = beta
    inputs = {**inputs, "old_per_token_logps": OLD.float(), "ref_per_token_logps": REF.float()}
    want_logps = LOGPS.float().clone().requires_grad_()
    want = trl_loss(tr, inputs, want_logps)
    want.backward()

    mask, _ = completion_mask(RAW, [EOT], mask_truncated=True)
    logps = LOGPS.float().clone().requires_grad_()
    out = grpo_loss(logps, OLD.float(), group_advantages(REWARDS, G, scale), mask, REF.float(), beta=beta,
                    epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T)
    out.loss.backward()
    assert abs(float(want)) > 1e-3
    assert float(out.loss) == pytest.approx(float(want), abs=1e-5)
    assert torch.allclose(logps.grad, want_logps.grad, atol=1e-5)
    assert logps.grad.abs().max() > 1e-3
    m = {k: v[-1] for k, v in tr._metrics["train"].items()}
    assert out.clip_low == pytest.approx(m["clip_ratio/low_mean"], abs=1e-6)
    assert out.clip_high == pytest.approx(m["clip_ratio/high_mean"], abs=1e-6)
    assert out.clip_region == pytest.approx(m["clip_ratio/region_mean"], abs=1e-6)
    assert out.clip_low_min == pytest.approx(m["clip_ratio/low_min"], abs=1e-6)
    assert out.clip_high_max == pytest.approx(m["clip_ratio/high_max"], abs=1e-6)
    assert out.clip_region > 0
    if beta:
        assert out.kl == pytest.approx(m["kl"], abs=1e-6) and out.kl > 0


def test_on_policy_equals_trl_without_old_logps(tok):
    """num_iterations = 1: TRL stores no old log-probs and uses logps.detach() (ratio 1)."""
    tr = trl_grpo(tok, REWARDS, loss_type="grpo")
    inputs = trl_score(tr, RAW)
    assert "old_per_token_logps" not in inputs
    want_logps = LOGPS.float().clone().requires_grad_()
    want = trl_loss(tr, inputs, want_logps)
    want.backward()
    logps = LOGPS.float().clone().requires_grad_()
    out = grpo_loss(logps, None, group_advantages(REWARDS, G), completion_mask(RAW, [EOT])[0], loss_type="grpo")
    out.loss.backward()
    assert float(out.loss) == pytest.approx(float(want), abs=1e-6)
    assert torch.allclose(logps.grad, want_logps.grad, atol=1e-6)


def test_dapo_across_accumulation_equals_trl_and_one_big_batch(tok):
    """TRL divides each micro-batch of a dapo step by the tokens of the whole generation batch
    (num_items_in_batch x accumulation / steps_per_generation); two halves sum to the whole."""
    tr = trl_grpo(tok, REWARDS, loss_type="dapo", gradient_accumulation_steps=2, per_device_train_batch_size=3)
    inputs = trl_score(tr, RAW)  # one generation batch of 6, trained in 2 micro-batches of 3
    tr.current_gradient_accumulation_steps = 2
    mask = completion_mask(RAW, [EOT])[0]
    adv = group_advantages(REWARDS, G)
    whole = grpo_loss(LOGPS.float(), OLD.float(), adv, mask, loss_type="dapo")
    total = 0.0
    for half in (slice(0, 3), slice(3, 6)):
        piece = {k: (v[half] if torch.is_tensor(v) and v.dim() and k != "num_items_in_batch" else v)
                 for k, v in inputs.items()}
        piece["old_per_token_logps"] = OLD.float()[half]
        want = trl_loss(tr, piece, LOGPS.float()[half])
        out = grpo_loss(LOGPS.float()[half], OLD.float()[half], adv[half], mask[half], loss_type="dapo",
                        num_items=inputs["num_items_in_batch"])
        assert float(out.loss) == pytest.approx(float(want), abs=1e-6)
        total += float(out.loss)
    assert total == pytest.approx(float(whole.loss), abs=1e-6)
