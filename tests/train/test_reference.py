"""The loop and the loss against independent references: full logits in float64, written here,
sharing no code with slimtune/losses.py (only the model and PEFT's own adapter switch).

Each test names the mistake it is there to catch: a loss scaled by a constant, clipping removed,
an lr warm-up off by one, a KL warm-up ignored or not starting at 0, evaluation KL in the wrong
direction, KL positions 'all' / 'last_n' handled as 'trained' (or per packed row), the random
state not restored on resume.
"""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from test_loop import chats, lora_model, run_args, write_data
from tiny import make_model, make_tokenizer

from slimtune.config import build_config
from slimtune.data.batching import collate, pack
from slimtune.data.render import render_chat
from slimtune.train.heldout import heldout_metrics
from slimtune.train.callbacks import Callback
from slimtune.train.forward import KLTerm, batch_loss
from slimtune.train.loop import setup, step, train

IGNORE = -100


# ----------------------------------------------------------------------------- the references
def logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T-1, V) float64 log-probs of the next token, from the model's own full logits."""
    return model(input_ids=torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)


def positions(labels: list[int], kind: str, last_n: int = 64) -> torch.Tensor:
    """(T-1,) bool: shifted positions that get KL, per example."""
    trained = torch.tensor(labels[1:]) != IGNORE
    if kind == "trained":
        return trained
    every = torch.ones_like(trained)
    if kind == "all":
        return every
    every[: max(0, len(every) - last_n)] = False
    return every


def ref_sums(model, examples, kl_weight=0.0, kind="trained", last_n=64, direction="forward", base=None,
             want_kl=False):
    """(loss sum, CE sum, KL sum, trained tokens); the loss keeps its graph. KL(base || tuned) per
    position = sum_v p (log p - log q); base = `base` or the model with PEFT's adapters off."""
    ce = kl = torch.zeros((), dtype=torch.float64)
    n = 0
    for ex in examples:
        logq = logprobs(model, ex["input_ids"])
        tgt = torch.tensor(ex["labels"][1:])
        m = tgt != IGNORE
        ce = ce - logq[m].gather(1, tgt[m][:, None]).sum()
        n += int(m.sum())
        if kl_weight or base is not None or want_kl:
            with torch.no_grad():
                if base is not None:
                    logp = logprobs(base, ex["input_ids"])
                else:
                    with model.disable_adapter():
                        logp = logprobs(model, ex["input_ids"])
            pos = positions(ex["labels"], kind, last_n)
            a, b = (logp, logq) if direction == "forward" else (logq, logp)
            kl = kl + (a.exp() * (a - b))[pos].sum()
    return ce + kl_weight * kl, ce.detach(), kl.detach(), n


def float64_copy(model):
    return copy.deepcopy(model).double()


# ----------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("kl", [False, True], ids=["sft", "kl_sft"])
def test_steps_match_an_independent_reference(tiny_dir, tmp_path, kl):
    """Catches: loss or gradients scaled by a constant, clipping removed, lr warm-up off by one,
    KL warm-up ignored or starting above 0, the logged loss not being the objective's."""
    data = write_data(tmp_path / "d.jsonl", n=6)
    extra = {"train.max_steps": 3, "train.batch_size": 64, "data.val": data, "train.warmup_steps": 3,
             "train.lr": 1e-2, "train.grad_clip": 1e-7, "eval.kl": "false", "method.dropout": 0.0}
    if kl:
        extra.update({"loss.kl_lambda": 0.5, "loss.kl_warmup_steps": 2})
    s = setup(build_config({}, run_args(tiny_dir, data, tmp_path / "run", **extra)), log=lambda *a: None)
    with torch.no_grad():  # move LoRA B off zero so the tuned model differs from the base
        for n, p in s.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    examples = s.data.train  # one batch holds every example: each step sees all of them
    for t in range(3):
        lam = 0.5 * min(1.0, t / 2) if kl else 0.0
        ref = float64_copy(s.model)
        loss, ce, kl_sum, n = ref_sums(ref, examples, lam, want_kl=kl)
        (loss / n).backward()
        grads = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        if t == 0:  # AdamW's first step, by hand: lr / 3 (warm-up), gradient clipped to 1e-7
            lr1 = 1e-2 / 3
            expect = {}
            for k, p in ref.named_parameters():
                if p.requires_grad:
                    g = p.grad * min(1.0, 1e-7 / (float(norm) + 1e-6))
                    m_hat, v_hat = g, g * g  # bias-corrected moments after one step
                    expect[k] = p.detach() - lr1 * m_hat / (v_hat.sqrt() + 1e-8)
        row = step(s)
        assert row["loss"] == pytest.approx(float(loss) / n, rel=1e-5), f"step {t + 1} loss"
        assert row["ce"] == pytest.approx(float(ce) / n, rel=1e-5)
        assert row["grad_norm"] == pytest.approx(float(norm), rel=1e-4), f"step {t + 1} grad norm"
        assert row["lr"] == pytest.approx(1e-2 * (t + 1) / 3), f"step {t + 1} lr"
        if kl:
            assert row["kl_lambda"] == pytest.approx(lam) and row["kl"] == pytest.approx(float(kl_sum) / n, rel=1e-4)
        if t == 0:
            got = {k: p.detach().double() for k, p in s.model.named_parameters() if p.requires_grad}
            moved = max(float((expect[k] - ref.get_parameter(k).detach()).abs().max()) for k in expect)
            assert moved > 1e-4  # the step changed something, so the comparison means something
            for k in expect:
                torch.testing.assert_close(got[k], expect[k], atol=2e-6, rtol=1e-4, msg=f"{k} after step 1")


# ----------------------------------------------------------------------------- evaluation and KL
@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


@pytest.fixture(scope="module")
def examples(tok):
    return [dict(zip(("input_ids", "labels"), render_chat(c, tok))) for c in chats(6)]


def perturbed_lora(tok):
    model = lora_model(tok)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_eval_loss_and_kl_match_the_reference(tok, examples):
    """Catches: evaluation KL in the reverse direction, a per-token mean over the wrong count."""
    model = perturbed_lora(tok)
    with torch.no_grad():
        ev = heldout_metrics(model, examples, tok.pad_token_id, batch_size=4)
        _, ce, fwd, n = ref_sums(float64_copy(model), examples, base=None, kl_weight=1.0)
        _, _, rev, _ = ref_sums(float64_copy(model), examples, kl_weight=1.0, direction="reverse")
    assert ev["loss"] == pytest.approx(float(ce) / n, rel=1e-5)
    assert ev["kl"] == pytest.approx(float(fwd) / n, rel=1e-4)
    assert abs(float(fwd) - float(rev)) > 1e-3 * float(fwd)  # the directions differ here


@pytest.mark.parametrize("kind", ["trained", "all", "last_n"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_kl_positions_per_example(tok, examples, kind, packed):
    """Catches: 'all' treated as 'trained', 'last_n' counted per packed row, a row's last position dropped."""
    model = perturbed_lora(tok)
    term = dataclasses.replace(KLTerm.metric(), positions=kind, last_n=5)
    rows = pack(examples, max_length=4096) if packed else examples
    assert not packed or len(rows) == 1
    with torch.no_grad():
        out = batch_loss(model, collate(rows, tok.pad_token_id), term, normaliser=1.0)
        _, _, kl_ref, _ = ref_sums(float64_copy(model), examples, kl_weight=1.0, kind=kind, last_n=5)
    want_n = sum(int(positions(e["labels"], kind, 5).sum()) for e in examples)
    assert out.n_kl_tokens == want_n
    assert float(out.kl_sum) == pytest.approx(float(kl_ref), rel=1e-4)


@pytest.mark.parametrize("method", ["dora", "full"])
def test_kl_reference_for_dora_and_full_fine_tuning(tok, examples, method):
    """DoRA's base is its adapters off; a full fine-tune's is a frozen copy: KL 0 at the start,
    then the reference value once the weights move."""
    from slimtune.config import MethodCfg
    from slimtune.methods import apply_method

    base = make_model(tok)
    ref_model = copy.deepcopy(base).requires_grad_(False) if method == "full" else None
    model = apply_method(base, MethodCfg(name=method, r=4))
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        assert float(batch_loss(model, batch, KLTerm.metric(), ref_model=ref_model).kl_sum) == pytest.approx(0, abs=1e-6)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        got = batch_loss(model, batch, KLTerm.metric(), normaliser=1.0, ref_model=ref_model)
        _, _, want, _ = ref_sums(float64_copy(model).eval(), examples, kl_weight=1.0,
                                 base=None if ref_model is None else float64_copy(ref_model))
    assert float(want) > 1e-3
    assert float(got.kl_sum) == pytest.approx(float(want), rel=1e-4)


# ----------------------------------------------------------------------------- resume
class StopAt(Callback):
    """Interrupts the run right after checkpoint `step` (as a crash would, but in-process)."""

    class Stop(Exception):
        pass

    def __init__(self, step):
        self.step = step

    def on_checkpoint(self, step, path):
        if step == self.step:
            raise self.Stop()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "lion", "schedulefree"])
def test_resume_with_dropout_and_every_optimizer(tiny_dir, tmp_path, optimizer):
    """Catches: the random state (dropout masks) or an optimizer's state not restored on resume."""
    data = write_data(tmp_path / "d.jsonl", n=16)
    kw = {"train.max_steps": 4, "train.save_every": 2, "method.dropout": 0.3, "train.optimizer": optimizer,
          "train.lr": 1e-2, "eval.kl": "false"}
    train(build_config({}, run_args(tiny_dir, data, tmp_path / "ref", **kw)), log=lambda *a: None)
    cut = tmp_path / "cut"
    with pytest.raises(StopAt.Stop):
        train(build_config({}, run_args(tiny_dir, data, cut, **kw)), log=lambda *a: None, callbacks=[StopAt(2)])
    torch.manual_seed(1234)  # whatever state the process is in, resume must restore the run's own
    train(build_config({}, run_args(tiny_dir, data, cut, **kw, **{"train.resume": "true"})), log=lambda *a: None)
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    losses = [r["loss"] for r in map(json.loads, (cut / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    ref_losses = [r["loss"] for r in map(json.loads, (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines())
                  if "loss" in r]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
