"""Preference objectives: chunked log-probs and every loss against float64 full-logit references
written here, and against TRL's trainers on the same tiny model, batch and adapter."""

import copy
import math

import pytest
from tolerance import assert_fp32_close
import torch
import torch.nn.functional as F
from tiny import make_model, make_tokenizer

from slimtune.config import MethodCfg, build_config
from slimtune.data.preference import render_pair
from slimtune.losses.preference import token_logps
from slimtune.methods import apply_method
from slimtune.train.objectives import OBJECTIVES
from slimtune.train.objectives.kto import KTO
from slimtune.train.objectives.paired import collate_sequences

WORDS = "the quick brown fox jumps over lazy dog hello how are you today fine thank joke".split()


def text(g, k):
    return " ".join(WORDS[j] for j in torch.randint(len(WORDS), (k,), generator=g))


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


@pytest.fixture(scope="module")
def pairs(tok):
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": text(g, 2 + i), "chosen": text(g, 1 + i % 3), "rejected": text(g, 3 + (i * 2) % 5)}
            for i in range(6)]
    return [render_pair(r, tok, path="t.jsonl", line=i + 1)[0] for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def unpaired(pairs):
    out = []
    for i, p in enumerate(pairs[:4]):
        out.append({"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids" if i % 3 else "rejected_ids"],
                    "label": bool(i % 3), "where": p["where"]})
    return out


def lora_model(tok, dtype=torch.float32, scale=0.5):
    model = apply_method(make_model(tok), MethodCfg(name="lora", r=4, targets="attn_mlp")).to(dtype)
    with torch.no_grad():  # non-zero B: the tuned model differs from its base
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def cfg_for(name, **loss):
    return build_config({"loss": {"objective": name, **loss}})


# --- float64 references: full logits from the model's own forward, formulas written out here


def ref_seq_logps(model, batch, adapters=True):
    """(B,) sums of log-probs of the labelled tokens, and (B,) their counts, from full logits."""
    ctx = model.disable_adapter() if not adapters else torch.enable_grad()
    with ctx:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    t = batch["labels"][:, 1:]
    m = t != -100
    tok_lp = logp.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * m
    return tok_lp.sum(1), m.sum(1).double()


def reference_loss(name, model, batch, cfg, n):
    lc = cfg.loss
    lp, ln = ref_seq_logps(model, batch)
    with torch.no_grad():
        rlp, _ = ref_seq_logps(model, batch, adapters=False)
    ls = lambda x: math.log(1) - torch.log1p(torch.exp(-x))  # noqa: E731 log sigmoid, written out
    if name == "kto":
        lab = batch["label"]
        kb = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        with torch.no_grad():
            z0 = max(0.0, float((ref_seq_logps(model, kb)[0] - ref_seq_logps(model, kb, False)[0]).mean()))
        r = lp - rlp
        per = torch.where(lab, lc.kto_desirable_weight * (1 - torch.sigmoid(lc.beta * (r - z0))),
                          lc.kto_undesirable_weight * (1 - torch.sigmoid(lc.beta * (z0 - r))))
        return per.sum()
    c, r, rc, rr, lc_, lr = lp[:n], lp[n:], rlp[:n], rlp[n:], ln[:n], ln[n:]
    if name == "dpo":
        x = lc.beta * ((c - rc) - (r - rr))
        per = -(1 - lc.label_smoothing) * ls(x) - lc.label_smoothing * ls(-x)
    elif name == "ipo":
        per = ((c - rc) / lc_ - (r - rr) / lr - 1 / (2 * lc.beta)) ** 2
    elif name == "orpo":
        pc, pr = c / lc_, r / lr
        odds = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731 log(p / (1 - p))
        per = -pc - lc.orpo_lambda * ls(odds(pc) - odds(pr))
    elif name == "simpo":
        x = lc.simpo_beta * (c / lc_ - r / lr) - lc.simpo_gamma
        per = -(1 - lc.label_smoothing) * ls(x) - lc.label_smoothing * ls(-x)
    return per.sum()


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("name, knobs", [("dpo", {}), ("dpo", {"label_smoothing": 0.2, "beta": 0.5}),
                                         ("ipo", {"beta": 0.3}), ("orpo", {"orpo_lambda": 0.5}),
                                         ("simpo", {"label_smoothing": 0.1}),
                                         ("kto", {"kto_undesirable_weight": 1.7, "beta": 0.4})])
def test_objective_matches_float64_full_logit_reference(tok, pairs, unpaired, name, knobs):
    cfg = cfg_for(name, chunk_size=7, **knobs)  # odd chunks: rows of one sequence span chunks
    obj = OBJECTIVES[name](cfg)
    rows = unpaired if name == "kto" else pairs
    model = lora_model(tok, torch.float64)
    batch = obj.collate(rows, tok.pad_token_id)
    out = obj(model, batch, normaliser=len(rows), step=0)
    out.loss.backward()
    got = lora_grads(model)
    model.zero_grad()
    want = reference_loss(name, model, batch, cfg, len(rows)) / len(rows)
    want.backward()
    ref = lora_grads(model)
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    assert out.sums["loss"] == pytest.approx(float(want) * len(rows), rel=1e-5)
    assert set(got) == set(ref) and len(got) > 0
    scale = max(float(v.abs().max()) for v in ref.values())
    for k in ref:  # the loss does its softmax math in fp32: compare at fp32 precision of the largest grad
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5 * scale)


def test_token_logps_values_kl_and_grads_match_float64(tok):
    g = torch.Generator().manual_seed(0)
    N, H, V = 23, 16, 50
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    rh = torch.randn(N, H, generator=g, dtype=torch.float64)
    t = torch.randint(V, (N,), generator=g)
    coef = torch.randn(N, generator=g, dtype=torch.float64)
    for scale, cap in ((None, None), (0.5, None), (None, 3.0), (0.5, 2.0)):  # affine, and through the soft-cap
        def logits(x):
            z = (x @ w.T + b) * (scale or 1.0)
            return z if cap is None else cap * torch.tanh(z / cap)
        lq = logits(h).log_softmax(-1)
        want = lq.gather(1, t[:, None]).squeeze(1)
        with torch.no_grad():
            lp = logits(rh).log_softmax(-1)
        want_kl = (lp.exp() * (lp - lq)).sum(-1).detach()
        gw = torch.autograd.grad((want * coef).sum(), (h, w, b))
        for chunk in (1, 5, 100):
            out = token_logps(h, w, t, bias=b, ref_hidden=rh, chunk_size=chunk, logit_softcap=cap, logit_scale=scale)
            torch.testing.assert_close(out.logps.double(), want.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.ref_logps.double(), lp.gather(1, t[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.kl.double(), want_kl, rtol=1e-4, atol=1e-6)
            got = torch.autograd.grad((out.logps * coef).sum(), (h, w, b))
            for a, e in zip(got, gw):
                torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


def test_pieces_of_a_batch_sum_to_the_whole_batch(tok, pairs):
    obj = OBJECTIVES["dpo"](cfg_for("dpo"))
    model = lora_model(tok)
    obj(model, obj.collate(pairs, tok.pad_token_id), len(pairs), 0).loss.backward()
    whole = lora_grads(model)
    model.zero_grad()
    for piece in (pairs[:1], pairs[1:4], pairs[4:]):
        obj(model, obj.collate(piece, tok.pad_token_id), len(pairs), 0).loss.backward()
    # the pieces sum the same float32 terms in another order: equal to epsilon x the gradients' size
    for k, v in lora_grads(model).items():
        assert_fp32_close(v, whole[k], magnitude=whole[k].abs().max())


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_precomputed_reference_equals_the_live_one(tok, pairs, unpaired, name):
    obj = OBJECTIVES[name](cfg_for(name, precompute_reference=True))
    rows = copy.deepcopy(unpaired if name == "kto" else pairs)
    model = lora_model(tok)
    live = obj(model, obj.collate(rows, tok.pad_token_id), len(rows), 0)
    obj.before_training(model, rows, tok.pad_token_id)
    assert all("ref_logps" in r for r in rows)
    batch = obj.collate(rows, tok.pad_token_id)
    assert "ref_logps" in batch
    cached = obj(model, batch, len(rows), 0)
    assert float(cached.loss) == pytest.approx(float(live.loss), rel=1e-5)


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_evaluation_with_the_base_cached_equals_a_fresh_one_after_training_moves(tok, pairs, unpaired, name):
    """Evaluation keeps the base's hidden states per batch (KTO: its rows and its mismatched rows);
    after the adapter moves, the cached evaluation must equal one that runs the base again."""
    obj = OBJECTIVES[name](cfg_for(name))
    rows = unpaired if name == "kto" else pairs
    model = lora_model(tok)
    cache = {}
    obj.evaluate(model, rows, tok.pad_token_id, batch_size=2, ref_cache=cache)
    assert len(cache) == (4 if name == "kto" else 3)  # KTO: 2 batches x (rows, mismatched rows)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(-1.5)
    cached = obj.evaluate(model, rows, tok.pad_token_id, batch_size=2, ref_cache=cache)
    fresh = obj.evaluate(model, rows, tok.pad_token_id, batch_size=2)
    assert cached.keys() == fresh.keys() and cached["eval_kl"] > 0
    for k, v in fresh.items():
        assert cached[k] == (None if v is None else pytest.approx(v, rel=1e-5)), k


def test_full_fine_tuning_uses_the_frozen_copy_and_trains_the_head(tok, pairs):
    model = make_model(tok)
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    obj = OBJECTIVES["dpo"](cfg_for("dpo", chunk_size=5))
    batch = obj.collate(pairs, tok.pad_token_id)
    out = obj(model, batch, len(pairs), 0, ref_model=ref)
    out.loss.backward()
    head = model.get_output_embeddings().weight
    got = head.grad.clone()
    model.zero_grad()
    lp, _ = ref_seq_logps(model, batch)
    with torch.no_grad():
        rlp, _ = ref_seq_logps(ref, batch)
    n = len(pairs)
    want = -F.logsigmoid(0.1 * ((lp[:n] - rlp[:n]) - (lp[n:] - rlp[n:]))).sum() / n
    want.backward()
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(got, head.grad, rtol=1e-4, atol=1e-7)


def test_evaluate_and_summarize_report_the_preference_metrics(tok, pairs):
    obj = OBJECTIVES["dpo"](cfg_for("dpo"))
    model = lora_model(tok)
    cache = {}
    ev = obj.evaluate(model, pairs, tok.pad_token_id, batch_size=4, ref_cache=cache)
    assert len(cache) == 2  # base hidden states cached per batch
    ev2 = obj.evaluate(model, pairs, tok.pad_token_id, batch_size=4, ref_cache=cache)
    assert ev2 == pytest.approx(ev)
    for k in ("eval_loss", "eval_accuracy", "eval_margin", "eval_rewards_chosen", "eval_rewards_rejected",
              "eval_logps_chosen", "eval_logps_rejected", "eval_kl", "eval_pref_accuracy", "eval_pref_margin"):
        assert ev[k] is not None and math.isfinite(ev[k]), k
    assert ev["eval_kl"] > 0 and 0 <= ev["eval_accuracy"] <= 1
    base = apply_method(make_model(tok), MethodCfg(name="lora", r=4))  # B = 0: the tuned model is the base
    ev0 = obj.evaluate(base, pairs, tok.pad_token_id, batch_size=4)
    assert ev0["eval_loss"] == pytest.approx(math.log(2)) and ev0["eval_kl"] == pytest.approx(0, abs=1e-6)


# --- TRL parity: the same tiny model, batch and adapter; TRL's ref = the adapter switched off

trl = pytest.importorskip("trl")


def trl_trainer(Trainer, Config, tok, dataset_rows, **kw):
    from datasets import Dataset
    from peft import LoraConfig

    args = Config(output_dir="/tmp/slimtune-trl-parity", per_device_train_batch_size=2, report_to=[],
                  use_cpu=True, **kw)
    tr = Trainer(model=make_model(tok), args=args, train_dataset=Dataset.from_list(dataset_rows),
                 processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # TRL's adapter starts at B = 0: perturb it after TRL built it
        g = torch.Generator().manual_seed(2)
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    tr.model.train()
    return tr


PAIR_ROWS = [{"prompt": "hello", "chosen": "fine", "rejected": "the dog"}] * 2


@pytest.mark.parametrize("loss_type, name", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trl_dpotrainer(tok, pairs, loss_type, name):
    tr = trl_trainer(trl.DPOTrainer, trl.DPOConfig, tok, PAIR_ROWS, beta=0.2, max_length=None, loss_type=loss_type)
    batch = tr.data_collator([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs])
    want = float(tr.compute_loss(tr.model, batch))
    obj = OBJECTIVES[name](cfg_for(name, beta=0.2))
    out = obj(tr.model, obj.collate(pairs, tok.pad_token_id), len(pairs), 0)
    assert abs(want - math.log(2)) > 1e-2  # the adapter moved the model: not the trivial log 2
    assert float(out.loss) == pytest.approx(want, abs=1e-4)
    m = {k: v[-1] for k, v in tr._metrics["train"].items()}
    row = obj.summarize(out.sums, len(pairs), 0)
    assert row["margin"] == pytest.approx(m["rewards/margins"], abs=1e-4)
    assert row["accuracy"] == pytest.approx(m["rewards/accuracies"])
    assert row["logps_chosen"] == pytest.approx(m["logps/chosen"], abs=1e-3)


def test_kto_equals_trl_ktotrainer(tok, unpaired):
    rows = [{"prompt": "hello", "completion": "fine", "label": True}, {"prompt": "hi", "completion": "dog", "label": False}]
    tr = trl_trainer(trl.KTOTrainer, trl.KTOConfig, tok, rows, max_length=None, beta=0.3, undesirable_weight=1.4)
    ex = [{k: u[k] for k in ("prompt_ids", "completion_ids", "label")} for u in unpaired]
    comps = [u["completion_ids"] for u in unpaired]
    for e, c in zip(ex, comps[-1:] + comps[:-1]):  # TRL's mismatched pairs: (x_i, y_{i-1})
        e["KL_completion_ids"] = c
    want = float(tr.compute_loss(tr.model, tr.data_collator(ex)))
    obj = KTO(cfg_for("kto", beta=0.3, kto_undesirable_weight=1.4))
    out = obj(tr.model, obj.collate(unpaired, tok.pad_token_id), len(unpaired), 0)
    assert float(out.loss) == pytest.approx(want, abs=1e-4)
    assert obj.summarize(out.sums, len(unpaired), 0)["kto_z0"] == pytest.approx(tr._metrics["train"]["kl"][-1], abs=1e-4)


def test_kto_one_row_piece_pairs_with_another_rows_completion(tok, unpaired):
    """A micro-batch of one row has no (x_i, y_{i-1}): its mismatched pair takes another training
    row's completion (never its own), the same one every time; two or more rows shift as TRL."""
    obj = KTO(cfg_for("kto"))
    model = lora_model(tok)
    obj.before_training(model, unpaired, tok.pad_token_id)
    for row in unpaired:
        b = obj.collate([row], tok.pad_token_id)
        own = b["input_ids"][0][b["labels"][0] != -100].tolist()
        other = b["kl_input_ids"][0][b["kl_labels"][0] != -100].tolist()
        assert other != own and other in [u["completion_ids"] for u in unpaired]
        assert torch.equal(obj.collate([row], tok.pad_token_id)["kl_input_ids"], b["kl_input_ids"])
    two = obj.collate(unpaired[:2], tok.pad_token_id)
    first = two["kl_input_ids"][0][two["kl_labels"][0] != -100].tolist()
    assert first == unpaired[1]["completion_ids"]  # (x_0, y_{-1}) within the batch


def cpo_batch(rows, pad_id):
    b = {}
    for k in ("chosen", "rejected"):
        c = collate_sequences([r["prompt_ids"] for r in rows], [r[f"{k}_ids"] for r in rows], pad_id)
        b[f"{k}_input_ids"], b[f"{k}_attention_mask"], b[f"{k}_labels"] = c["input_ids"], c["attention_mask"], c["labels"]
    return b


def test_simpo_equals_trl_cpo_simpo(tok, pairs):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tr = trl_trainer(CPOTrainer, CPOConfig, tok, PAIR_ROWS, max_length=64, loss_type="simpo", cpo_alpha=0.0,
                     beta=2.5, simpo_gamma=0.7)
    want, _ = tr.get_batch_loss_metrics(tr.model, cpo_batch(pairs, tok.pad_token_id))
    obj = OBJECTIVES["simpo"](cfg_for("simpo", simpo_beta=2.5, simpo_gamma=0.7))
    out = obj(tr.model, obj.collate(pairs, tok.pad_token_id), len(pairs), 0)
    assert float(out.loss) == pytest.approx(float(want), abs=1e-4)


def test_orpo_equals_trl_orpo(tok, pairs):
    """TRL takes ORPO's NLL over prompt + answer tokens, as one token mean over the batch; slimtune
    over the answer, per pair (the paper's L_SFT). The odds-ratio term must agree everywhere, and
    the whole loss where both NLLs are the same numbers: one-token prompts, equal answer lengths."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tr = trl_trainer(ORPOTrainer, ORPOConfig, tok, PAIR_ROWS, max_length=64, beta=0.3)
    obj = OBJECTIVES["orpo"](cfg_for("orpo", orpo_lambda=0.3))
    want, metrics = tr.get_batch_loss_metrics(tr.model, cpo_batch(pairs, tok.pad_token_id))
    out = obj(tr.model, obj.collate(pairs, tok.pad_token_id), len(pairs), 0)
    lens = torch.tensor([len(p["chosen_ids"]) for p in pairs], dtype=torch.float64)
    sc_lp = obj.forward(tr.model, obj.collate(pairs, tok.pad_token_id))[1]["logps"][:len(pairs)].detach().double()
    nll = float((-sc_lp / lens).mean())
    assert float(out.loss) - nll == pytest.approx(float(want) - metrics["nll_loss"], abs=1e-4)
    same = [{"prompt_ids": p["prompt_ids"][-1:], "chosen_ids": p["chosen_ids"][:2], "rejected_ids": p["rejected_ids"],
             "where": p["where"]} for p in pairs]
    want, _ = tr.get_batch_loss_metrics(tr.model, cpo_batch(same, tok.pad_token_id))
    out = obj(tr.model, obj.collate(same, tok.pad_token_id), len(same), 0)
    assert float(out.loss) == pytest.approx(float(want), abs=1e-4)


# --- the one loop, end to end on a tiny model


def write_pairs(path, n=12):
    import json

    g = torch.Generator().manual_seed(3)
    rows = [{"prompt": text(g, 3), "chosen": "fine thank you", "rejected": text(g, 6) + " " + text(g, 6)}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name, extra", [("dpo", {"loss.precompute_reference": True}), ("ipo", {}),
                                         ("orpo", {}), ("simpo", {}), ("kto", {})])
def test_train_each_objective_end_to_end_and_preference_accuracy_rises(tiny_dir, tmp_path, name, extra):
    import json

    from slimtune.train.loop import train

    data = write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / name
    cfg = build_config({}, [f"model.name={tiny_dir}", f"data.train={data}", f"data.val={data}",
                            f"train.output_dir={out}", "train.max_steps=8", "train.batch_size=4", "train.lr=2e-2",
                            "train.progress=false", "method.r=4", f"loss.objective={name}", "data.general_prompts=",
                            "train.micro_batch_tokens=120"] + [f"{k}={v}" for k, v in extra.items()])
    s = train(cfg, log=lambda *_: None)
    b, a = s["before"], s["after"]
    assert a["eval_pref_margin"] > b["eval_pref_margin"] and a["eval_loss"] < b["eval_loss"]
    assert a["eval_margin"] > b["eval_margin"]  # the objective's implicit reward margin
    if name != "kto":  # KTO moves slower at beta 0.1: its margin rises, the accuracy not yet in 8 steps
        assert a["eval_pref_accuracy"] > b["eval_pref_accuracy"]
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    step = next(r for r in logged if "lr" in r)
    for k in ("loss", "rewards_chosen", "rewards_rejected", "margin", "logps_chosen", "logps_rejected"):
        assert step[k] is not None and math.isfinite(step[k]), k
    if name in ("ipo", "kto"):  # the reference ran this step: KL to base is logged
        assert step["kl"] is not None and step["kl"] >= 0


def test_slimtune_eval_of_a_dpo_run_reports_preference_metrics_base_vs_tuned(tiny_dir, tmp_path):
    from slimtune.evaluate.suite import evaluate_run, format_table
    from slimtune.train.loop import train

    data = write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "dpo"
    train(build_config({}, [f"model.name={tiny_dir}", f"data.train={data}", f"train.output_dir={out}",
                            "train.max_steps=6", "train.batch_size=4", "train.lr=2e-2", "train.progress=false",
                            "loss.objective=dpo", "eval.max_new_tokens=4", "data.val_fraction=0.25"]),
          log=lambda *_: None)
    res = evaluate_run(str(out), max_prompts=2, log=lambda m: None)
    h = res["heldout"]
    assert h["objective"] == "dpo" and h["examples"] == 3 and "held-out split" in h["data"]
    assert h["base"]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the base is its own reference
    assert h["base"]["accuracy"] == 0 and h["tuned"]["loss"] < h["base"]["loss"]
    assert h["tuned"]["pref_margin"] > h["base"]["pref_margin"] and h["kl_to_base"] > 0
    table = format_table(res)
    assert "preference accuracy" in table and "reward accuracy" in table
    assert res["generation"]["tuned"]["answers"] == 2


@pytest.mark.parametrize("name", ["dpo", "simpo", "kto"])
def test_eval_takes_training_s_preference_numbers_only_for_the_weights_it_measured(tiny_dir, tmp_path, name):
    """Training evaluated the base (step 0) and the final weights on the held-out rows: `slimtune
    eval` reuses those numbers, equal to measuring again; other weights in the folder are measured."""
    from safetensors.torch import load_file, save_file

    from slimtune.evaluate.suite import evaluate_run
    from slimtune.train.loop import train

    data = write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / name
    train(build_config({}, [f"model.name={tiny_dir}", f"data.train={data}", f"train.output_dir={out}",
                            "train.max_steps=4", "train.batch_size=4", "train.lr=2e-2", "train.progress=false",
                            f"loss.objective={name}", "eval.max_new_tokens=2", "data.val_fraction=0.25"]),
          log=lambda *_: None)
    kw = dict(max_prompts=1, log=lambda m: None, ifeval="")
    reused = evaluate_run(str(out), out=str(tmp_path / "a.json"), **kw)["heldout"]
    fresh = evaluate_run(str(out), out=str(tmp_path / "b.json"), reuse=False, **kw)["heldout"]
    assert "from_training" in reused and "from_training" not in fresh
    for side in ("base", "tuned"):
        for k, v in fresh[side].items():
            assert reused[side][k] == (None if v is None else pytest.approx(v, rel=1e-4, abs=1e-5)), (side, k)
    assert reused["kl_to_base"] == pytest.approx(fresh["kl_to_base"], rel=1e-4, abs=1e-6)
    assert reused["general_kl"] == pytest.approx(fresh["general_kl"], rel=1e-4, abs=1e-6)
    path = out / "adapter_model.safetensors"
    save_file({k: v * 3 if "lora_B" in k else v for k, v in load_file(str(path)).items()}, str(path))
    changed = evaluate_run(str(out), out=str(tmp_path / "c.json"), **kw)["heldout"]
    assert "from_training" not in changed and changed["kl_to_base"] != pytest.approx(fresh["kl_to_base"], rel=1e-3)


def test_data_pairs_takes_the_models_own_answer_as_rejected(tiny_dir, tmp_path):
    import json

    from slimtune.cli import main

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                    {"role": "assistant", "content": "fine thank you"}]}) + "\n"
                           for i in range(3)))
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pairs", str(sft), "--model", tiny_dir, "--out", str(out), "--max-new-tokens", "5"]) in (0, None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    from slimtune.generate import generate
    from slimtune.runfolder import load_run

    model, tok, _ = load_run(tiny_dir)
    want = generate(model, tok, [{"role": "user", "content": "hello 0"}], 5)["text"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "hello 0"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "fine thank you"}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": want}]
    render_pair(rows[0], tok)  # a valid preference row


def test_report_plots_preference_metrics(tmp_path):
    from slimtune.evaluate.report import make_plots

    rows = [{"step": 0, "eval_loss": 0.69, "eval_margin": 0.0, "eval_accuracy": 0.0, "eval_pref_accuracy": 0.4},
            {"step": 1, "loss": 0.6, "rewards_chosen": 0.1, "rewards_rejected": -0.1, "margin": 0.2, "accuracy": 0.75,
             "lr": 1e-3, "tokens_per_s": 10.0},
            {"step": 1, "eval_loss": 0.5, "eval_margin": 0.3, "eval_accuracy": 0.8, "eval_pref_accuracy": 0.7}]
    made = make_plots(rows, tmp_path)
    assert {"loss", "rewards", "preference"} <= set(made) and all(p.stat().st_size > 1000 for p in made.values())
    assert "rewards" not in make_plots([{"step": 1, "loss": 1.0, "lr": 1e-3}], tmp_path / "sft")
