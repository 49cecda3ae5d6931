"""GRPO objective on tiny random models: sampled rows, the loss against full-logit references for
each aggregation, micro-batches adding up to the batch, rewards' errors, samples.jsonl, the loop."""

import json

import pytest
import torch
from tiny import make_model, make_tokenizer
from tolerance import assert_fp32_close

from slimtune.config import MethodCfg, build_config
from slimtune.errors import DataError
from slimtune.losses.grpo import grpo_loss
from slimtune.methods import apply_method
from slimtune.train.objectives import OBJECTIVES

PROMPTS = ["hello how are you", "tell me a joke", "what is the capital of France", "the quick brown fox",
           "summarise this text", "translate to French"]

# A reward that prefers a token: the share of the letter 'e' among the completion's characters.
REWARD = '''
def e_share(prompts, completions, **columns):
    return [c.count("e") / max(1, len(c)) for c in completions]

def fails_on_fox(prompts, completions, **columns):
    return [1 / 0 if "fox" in p[-1]["content"] else 0.0 for p in prompts]
'''


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}], "topic": i}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    (tmp_path / "rw.py").write_text(REWARD)
    return tmp_path


def cfg_for(data, *over):
    return build_config({}, [f"data.train={data / 'prompts.jsonl'}", "data.val_fraction=0", "loss.objective=grpo",
                             f"grpo.rewards=[{{name: '{data / 'rw.py'}:e_share'}}]", "grpo.num_generations=4",
                             "grpo.max_new_tokens=6", f"train.output_dir={data / 'run'}", "data.general_prompts=",
                             "train.mixed_precision=no", *over])


def lora_model(tok):
    model = apply_method(make_model(tok), MethodCfg(name="lora", r=4, targets="attn_mlp"))
    with torch.no_grad():  # non-zero B: the policy differs from its base
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def objective(data, tok, *over):
    obj = OBJECTIVES["grpo"](cfg_for(data, *over))
    prepared = obj.prepare_data(tok)
    return obj, prepared.train


def full_logit_logps(model, rows, pad, adapters=True):
    """(B, Tc) log-probs of each row's completion tokens from the model's own full logits on the
    rows one per completion ([prompt, completion], right-padded), float64."""
    from slimtune.train.objectives.paired import collate_sequences

    batch = collate_sequences([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad)
    ctx = model.disable_adapter() if not adapters else torch.enable_grad()
    with ctx:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp = logits[:, :-1].log_softmax(-1)
    t = batch["labels"][:, 1:]
    tok_lp = lp.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)
    Tc = max(len(r["completion_ids"]) for r in rows)
    per = [tok_lp[i][t[i] != -100] for i in range(len(t))]
    return torch.stack([torch.nn.functional.pad(r, (0, Tc - len(r))) for r in per])


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_prompt_rows_keep_columns_and_errors_name_the_line(data, tok):
    from slimtune.data.prompts import prompt_rows

    rows, dropped = prompt_rows(str(data / "prompts.jsonl"), tok)
    assert len(rows) == 6 and not dropped and rows[1]["columns"] == {"topic": 1}
    assert rows[0]["where"].endswith("prompts.jsonl:1") and rows[0]["messages"][-1]["role"] == "user"
    bad = data / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"answer": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        prompt_rows(str(bad), tok)
    text = data / "text.jsonl"
    text.write_text(json.dumps({"question": "hello there", "gold": "4"}) + "\n")
    rows, _ = prompt_rows(str(text), tok, columns={"prompt": "question"})
    assert rows[0]["messages"] == [{"role": "user", "content": "hello there"}] and rows[0]["columns"] == {"gold": "4"}
    with pytest.raises(DataError, match="text.jsonl:1"):
        prompt_rows(str(text), tok, max_prompt_tokens=3, drop_long=False)


def test_begin_step_is_reproducible_and_groups_are_centred(data, tok):
    obj, rows = objective(data, tok)
    model = lora_model(tok)
    a = obj.begin_step(model, rows[:2], step=3)
    b = obj.begin_step(model, rows[:2], step=3)
    assert len(a) == 8 and [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    assert [r["advantage"] for r in a] == [r["advantage"] for r in b]
    # a prompt's completions do not depend on the other prompts of its batch
    alone = obj.begin_step(model, rows[1:2], step=3)
    assert [r["completion_ids"] for r in alone] == [r["completion_ids"] for r in a[4:]]
    other = obj.begin_step(model, rows[:2], step=4)
    assert [r["completion_ids"] for r in other] != [r["completion_ids"] for r in a]
    for g in range(2):
        adv = torch.tensor([r["advantage"] for r in a[4 * g:4 * g + 4]])
        assert abs(float(adv.sum())) < 1e-4
    assert all(r["reward"] == pytest.approx(r["rewards"][next(iter(r["rewards"]))]) for r in a)
    assert model.training  # begin_step leaves the mode as it found it (train)


@pytest.mark.parametrize("loss_type, beta", [("dapo", 0.0), ("grpo", 0.04), ("dr_grpo", 0.0), ("bnpo", 0.1)])
def test_loss_equals_grpo_loss_on_full_logits_and_pieces_sum_to_the_batch(data, tok, loss_type, beta, monkeypatch):
    obj, rows = objective(data, tok, f"grpo.loss_type={loss_type}", f"grpo.beta={beta}", "loss.chunk_size=5")
    model = lora_model(tok).double()
    step_rows = obj.begin_step(model, rows[:3], step=0)
    import slimtune.train.precision as P
    real, seen = P.grouped_attention, []
    monkeypatch.setattr(P, "grouped_attention", lambda *a, **k: seen.append(a[0].shape) or real(*a, **k))
    step_rows[1]["loss"] = False  # a masked completion (as grpo.mask_truncated makes them)
    units = obj.units(step_rows)
    want_units = (sum(len(r["completion_ids"]) for r in step_rows if r["loss"]) if loss_type in ("dapo", "bnpo")
                  else len(step_rows))
    assert units == want_units
    pad = tok.pad_token_id
    whole = obj.collate(step_rows, pad)
    assert whole["input_ids"].shape[0] == 3  # the 12 completions packed by prompt: 3 rows
    out = obj(model, whole, units, 0)
    out.loss.backward()
    assert seen and seen[0][0] == 3  # the packed rows attended group by group (grouped_attention)
    got = grads(model)
    model.zero_grad()
    # the reference: TRL's formula on the whole batch (one micro-batch), from full logits, one row per completion
    lp = full_logit_logps(model, step_rows, pad)
    with torch.no_grad():
        ref = full_logit_logps(model, step_rows, pad, adapters=False) if beta else None
    want = grpo_loss(lp, None, whole["advantage"].double(), whole["loss_mask"].double(), ref, beta=beta,
                     loss_type=loss_type if loss_type != "bnpo" else "dapo", max_completion_length=6).loss
    want.backward()
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5, abs=1e-8)
    for k, v in grads(model).items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6 * float(v.abs().max()) + 1e-12)
    model.zero_grad()
    for piece in (step_rows[:1], step_rows[1:7], step_rows[7:]):  # micro-batches of the same step
        obj(model, obj.collate(piece, pad), units, 0).loss.backward()
    for k, v in grads(model).items():
        assert_fp32_close(v, got[k], magnitude=got[k].abs().max())


def test_a_loop_step_trains_the_adapter_only_and_logs_the_rewards(data, tiny_dir):
    from slimtune.train.loop import setup, step

    cfg = cfg_for(data, f"model.name={tiny_dir}", "train.batch_size=2", "train.grad_accum=2", "train.lr=1e-2",
                  "train.micro_batch_tokens=60", "train.progress=false", "grpo.samples_every=1", "eval.kl=false",
                  f"grpo.rewards=[{{name: '{data / 'rw.py'}:e_share', label: e}}, {{name: ended, weight: 0.5}}]")
    s = setup(cfg, log=lambda *_: None)
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    row = step(s)
    changed = {n for n, p in s.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable and all("lora_" in n for n in changed)
    assert changed == trainable or len(changed) >= len(trainable) // 2
    for k in ("loss", "reward", "reward_std", "reward/e", "reward/ended", "no_signal", "completion_length",
              "completion_length_max", "truncated", "clip_region", "entropy"):
        assert row[k] is not None and row[k] == row[k], k
    assert row["kl"] is None and 0 <= row["no_signal"] <= 1 and row["entropy"] > 0
    assert row["completion_length_max"] <= 6 and 0 < row["completion_length"] <= 6
    samples = [json.loads(x) for x in (data / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4 and {"prompt", "completion", "reward", "rewards", "advantage"} <= samples[0].keys()
    assert set(samples[0]["rewards"]) == {"e", "ended"}
    ev = s.objective.evaluate(s.model, s.data.train, tok_pad(s), 4)
    assert ev["eval_loss"] == pytest.approx(-ev["eval_reward"]) and "eval_reward/e" in ev


def tok_pad(s):
    return s.tokenizer.pad_token_id


def test_a_failing_reward_names_the_function_and_the_row(data, tok):
    obj, rows = objective(data, tok, f"grpo.rewards=[{{name: '{data / 'rw.py'}:fails_on_fox', label: fox}}]")
    with pytest.raises(DataError, match=r"reward 'fox' on row 4 \(.*prompts.jsonl:4\).*ZeroDivisionError"):
        obj.begin_step(lora_model(tok), rows[2:4], step=0)


def test_num_iterations_reuses_the_completions_against_their_stored_log_probs(data, tok):
    obj, rows = objective(data, tok, "grpo.num_iterations=2")
    model = lora_model(tok)
    first = obj.begin_step(model, rows[:2], step=0)
    assert all(len(r["old_logps"]) == len(r["completion_ids"]) for r in first)
    batch = obj.collate(first, tok.pad_token_id)
    lp = full_logit_logps(model, first, tok.pad_token_id).float()
    torch.testing.assert_close(batch["old_logps"], lp.detach(), atol=1e-5, rtol=1e-5)
    again = obj.begin_step(model, rows[2:4], step=1)  # the next step trains on the same completions
    assert again is first
    assert obj.begin_step(model, rows[2:4], step=2) is not first


def test_config_refuses_grpo_without_rewards_and_bad_knobs(tmp_path):
    from slimtune.errors import ConfigError

    with pytest.raises(ConfigError, match="grpo.rewards"):
        OBJECTIVES["grpo"](build_config({}, ["loss.objective=grpo"]))
    with pytest.raises(ConfigError, match="grpo.loss_type"):
        build_config({}, ["grpo.loss_type=ppo"])
    with pytest.raises(ConfigError, match="num_generations"):
        build_config({}, ["grpo.num_generations=1"])


def test_slimtune_eval_of_a_grpo_run_shows_rewards_and_instruction_following(data, tiny_dir, gen_cache):
    from slimtune.evaluate.suite import evaluate_run, format_table
    from slimtune.train.loop import train

    summary = train(cfg_for(data, f"model.name={tiny_dir}", "data.val_fraction=0.34", "train.max_steps=2",
                            "train.batch_size=2", "train.lr=1e-2", "train.progress=false", "eval.max_new_tokens=3",
                            "eval.max_examples=2"), log=lambda *_: None)
    assert summary["before"]["eval_reward"] is not None and summary["after"]["eval_reward"] is not None
    res = evaluate_run(str(data / "run"), max_prompts=1, log=lambda m: None)
    h = res["heldout"]
    assert h["objective"] == "grpo" and h["examples"] == 2 and "from_training" in h
    assert h["base"]["reward"] == pytest.approx(summary["before"]["eval_reward"])
    assert res["ifeval"] is not None and res["ifeval"]["tuned"]["prompts"] > 0  # shown by default for RL runs
    fresh = evaluate_run(str(data / "run"), max_prompts=1, log=lambda m: None, reuse=False, ifeval="",
                         out=str(data / "b.json"))["heldout"]
    for side in ("base", "tuned"):  # measured again: training's numbers (step 0 = the base)
        assert fresh[side]["reward"] == pytest.approx(h[side]["reward"], abs=1e-6), side
    table = format_table(res)
    assert "held-out mean reward" in table and "IFEval prompts passed" in table


def test_report_plots_rewards_and_signal(tmp_path):
    from slimtune.evaluate.report import make_plots

    rows = [{"step": 0, "eval_reward": 0.2}, {"step": 1, "loss": 0.0, "reward": 0.3, "no_signal": 0.5, "truncated": 0.2,
                                              "clip_region": 0.0, "lr": 1e-4},
            {"step": 2, "loss": 0.01, "reward": 0.4, "no_signal": 0.25, "truncated": 0.1, "clip_region": 0.01, "lr": 1e-4}]
    made = make_plots(rows, tmp_path)
    assert {"rl_reward", "rl_signal"} <= set(made)


def test_token_logps_entropy_equals_the_full_softmax_entropy():
    from slimtune.losses.preference import token_logps

    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(13, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    t = torch.randint(40, (13,), generator=g)
    for bias, scale, cap in ((None, None, None), (b, 0.7, None), (b, None, 2.0)):  # affine heads, and soft-capped
        z = h.double() @ w.double().T + (0 if bias is None else bias.double())
        z = z * (scale or 1.0)
        z = z if cap is None else cap * torch.tanh(z / cap)
        lp = z.log_softmax(-1)
        want = -(lp.exp() * lp).sum(-1)
        for chunk in (1, 4, 100):
            for grad in (False, True):  # with a grad the softmax is shared with d logp / d h
                out = token_logps(h.requires_grad_(grad), w, t, bias=bias, chunk_size=chunk, entropy=True,
                                  logit_scale=scale, logit_softcap=cap)
                torch.testing.assert_close(out.entropy.double(), want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(out.logps.double(), lp.gather(1, t[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    assert token_logps(h, w, t).entropy is None


def test_split_keeps_groups_whole_within_the_token_budget(data, tok):
    """Micro-batches hold whole groups (each prompt computed once), at most the budget of packed
    tokens each; a group over the budget is cut into runs that each carry the prompt; every
    completion lands in exactly one piece. An attention that cannot take the mask: one row each."""
    obj, _ = objective(data, tok)
    obj.attention = "sdpa"
    rows = [{"prompt_ids": [g] * (5 + g), "completion_ids": [1] * (3 + i), "i": 4 * g + i} for g in range(3) for i in range(4)]
    for budget in (0, 200, 60, 40, 25, 15):
        pieces = obj.split(rows, budget)
        assert sorted(r["i"] for p in pieces for r in p) == list(range(12))
        for p in pieces:
            b = obj.collate([{**r, "loss": True, "advantage": 0.0} for r in p], 0)
            if budget and len(p) > 1:
                assert b["input_ids"].numel() <= budget
            prompts = [tuple(r["prompt_ids"]) for r in p]
            assert b["input_ids"].shape[0] == len(set(prompts))  # each prompt once in its piece
        if budget in (0, 200):
            assert len(pieces) == 1
        if budget == 60:  # groups are 5+g + 18 = 23..25 tokens packed: two to a piece, never cut
            assert all(len({r["prompt_ids"][0] for r in p}) <= 2 for p in pieces)
            assert {len([r for p in pieces for r in p if r["prompt_ids"][0] == g]) for g in range(3)} == {4}
            assert all(len([r for r in p if r["prompt_ids"][0] == g]) in (0, 4) for p in pieces for g in range(3))
    obj.attention = "flash_attention_2"
    b = obj.collate([{**r, "loss": True, "advantage": 0.0} for r in rows], 0)
    assert b["input_ids"].shape[0] == 12 and "labels" in b
    cut = obj.split(rows, 15)  # every group over the budget: runs of its completions, each with the prompt
    assert len([p for p in cut if p[0]["prompt_ids"][0] == 0]) >= 2


def test_eager_attention_gets_an_additive_mask_and_the_same_loss(data, tok):
    """An eager-attention model gets the packed rows with an additive mask over the whole row (no
    group layout: only the registered SDPA computes grouped) and the loss the SDPA model gets."""
    obj, rows = objective(data, tok, "loss.chunk_size=5")
    model = lora_model(tok).double()
    step_rows = obj.begin_step(model, rows[:2], step=0)
    assert obj.attention == "slimtune_sdpa"
    grouped = obj.collate(step_rows, tok.pad_token_id)
    want = obj(model, grouped, obj.units(step_rows), 0).loss
    model.get_base_model().set_attn_implementation("eager")
    obj.attention = "eager"
    batch = obj.collate(step_rows, tok.pad_token_id)
    assert "groups" not in batch and batch["attention_mask"].is_floating_point()
    assert float(obj(model, batch, obj.units(step_rows), 0).loss) == pytest.approx(float(want), rel=1e-9)
