"""The loop: accumulation equals one big batch, packing equals no packing, a killed run resumes."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import make_model, make_tokenizer

from slimtune.config import MethodCfg, build_config
from slimtune.data.batching import collate, count_trained, pack, split_by_tokens
from slimtune.data.render import IGNORE, render_chat
from slimtune.train.forward import batch_loss, hidden_states
from slimtune.methods import apply_method
from slimtune.train.loop import accumulate_grads, train
from slimtune.train.objectives import make_objective

WORDS = "the quick brown fox jumps over lazy dog hello how are you today fine thank joke".split()


def chats(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pick = lambda k: " ".join(WORDS[j] for j in torch.randint(len(WORDS), (k,), generator=g))  # noqa: E731
        turns = [{"role": "user", "content": pick(3 + i % 5)}, {"role": "assistant", "content": pick(2 + i % 7)}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": pick(2)}, {"role": "assistant", "content": pick(4)}]
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


@pytest.fixture(scope="module")
def examples(tok):
    return [dict(zip(("input_ids", "labels"), render_chat(c, tok))) for c in chats(8)]


def lora_model(tok):
    model = apply_method(make_model(tok), MethodCfg(name="lora", r=4))
    with torch.no_grad():  # non-zero B so every LoRA parameter gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_pieces_give_the_whole_batch(tok, examples, pieces, kl_lambda):
    """The losses and gradients of `pieces` accumulated equal those of `examples` in one batch."""
    n_total = count_trained(examples)
    model = lora_model(tok)
    objective = make_objective(build_config({}, [f"loss.kl_lambda={kl_lambda}"]))
    s8 = accumulate_grads(model, [examples], n_total, tok.pad_token_id, objective)
    g8 = grads(model)
    model.zero_grad()
    s2 = accumulate_grads(model, pieces, n_total, tok.pad_token_id, objective)
    g2 = grads(model)
    assert s2["ce"] == pytest.approx(s8["ce"], rel=1e-5) and s2["kl"] == pytest.approx(s8["kl"], rel=1e-4, abs=1e-7)
    for n in g8:
        torch.testing.assert_close(g2[n], g8[n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kl_lambda", [0.0, 0.1])
def test_grad_accumulation_4x2_equals_one_batch_of_8(tok, examples, kl_lambda):
    assert_pieces_give_the_whole_batch(tok, examples, [examples[i:i + 2] for i in range(0, 8, 2)], kl_lambda)


def per_example_ce(model, batch, starts_ends, weight):
    h = hidden_states(model, batch)[:, :-1]
    logits = h @ weight.T
    tgt = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")
    return [float(ce[r, s:e][tgt[r, s:e] != IGNORE].sum()) for r, s, e in starts_ends]


def test_packed_and_unpacked_give_the_same_per_example_loss(tok, examples):
    model = make_model(tok)
    w = model.lm_head.weight
    packed = pack(examples, max_length=4096)
    assert len(packed) == 1 and packed[0]["n_examples"] == len(examples)
    row = packed[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    spans = [(0, a, b - 1) for a, b in zip(starts, starts[1:])]  # shifted: targets inside one example
    got = per_example_ce(model, collate(packed, tok.pad_token_id), spans, w)
    by_ids = {tuple(e["input_ids"]): e for e in examples}
    want = []
    for a, b in zip(starts, starts[1:]):
        ex = by_ids[tuple(row["input_ids"][a:b])]
        single = collate([ex], tok.pad_token_id)
        want += per_example_ce(model, single, [(0, 0, b - a - 1)], w)
    assert got == pytest.approx(want, rel=1e-4)
    # and the loop's loss agrees in total
    padded = batch_loss(model, collate(examples, tok.pad_token_id), normaliser=1.0)
    packed_loss = batch_loss(model, collate(packed, tok.pad_token_id), normaliser=1.0)
    assert float(packed_loss.ce_sum) == pytest.approx(float(padded.ce_sum), rel=1e-4)
    assert packed_loss.n_tokens == padded.n_tokens


def write_data(path, n=24):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats(n, seed=1)))
    return str(path)


def run_args(model_dir, data, out, **extra):
    base = {"model.name": model_dir, "data.train": data, "data.max_length": 64, "data.val_fraction": 0.2,
            "data.general_prompts": "", "train.batch_size": 4, "train.lr": 1e-2, "train.max_steps": 6,
            "train.progress": "false", "method.r": 4, "train.output_dir": str(out), "eval.max_examples": 4}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


KILLER = """
import os, signal, sys
from slimtune.config import build_config
from slimtune.train.callbacks import Callback
from slimtune.train.loop import train

class KillAfter(Callback):  # a real SIGKILL right after checkpoint N is complete
    def on_checkpoint(self, step, path):
        if step == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

train(build_config({}, sys.argv[1:]), log=lambda *a: None, callbacks=[KillAfter()])
"""


def test_killed_run_resumes_to_the_same_adapter(tiny_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cmd = [sys.executable, "-m", "slimtune.cli", "train"]
    ref, crashed = tmp_path / "ref", tmp_path / "crash"
    subprocess.run(cmd + run_args(tiny_dir, data, ref), check=True, capture_output=True)
    (tmp_path / "killer.py").write_text(KILLER)
    p = subprocess.run([sys.executable, str(tmp_path / "killer.py")] +
                       run_args(tiny_dir, data, crashed, **{"train.save_every": 1}),
                       env=dict(os.environ, KILL_AFTER="3"), capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]  # SIGKILL
    assert not (crashed / "adapter_model.safetensors").exists()
    assert (crashed / "checkpoints" / "latest").read_text().strip() == "step-000003"
    p = subprocess.run(cmd + run_args(tiny_dir, data, crashed, **{"train.save_every": 1, "train.resume": "true"}),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stderr
    a = load_file(str(ref / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    steps = [r["step"] for r in map(json.loads, (crashed / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step logged twice


def test_train_writes_a_loadable_run_and_stops_on_time_cap(tiny_dir, tmp_path):
    import peft
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    cfg = build_config({}, run_args(tiny_dir, data, out, **{"train.max_steps": 50, "train.max_minutes": 0.0001,
                                                            "eval.every": 2}))
    summary = train(cfg, log=lambda *_: None)
    assert summary["steps"] == 1 and "time cap" in summary["stopped"]
    for f in ["adapter_model.safetensors", "adapter_config.json", "config.yaml", "train_log.csv",
              "train_log.jsonl", "time_metrics.json", "summary.json", "tokenizer_config.json"]:
        assert (out / f).exists(), f
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_minutes"] == 0.0001
    times = json.loads((out / "time_metrics.json").read_text())
    assert {"setup_s", "train_s", "total_s", "steps_per_s", "trained_tokens_per_s", "peak_rss_mb"} <= times.keys()
    base = type(make_model(make_tokenizer())).from_pretrained(tiny_dir)
    model = peft.PeftModel.from_pretrained(base, out)  # plain PEFT, no slimtune
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert summary["before"]["eval_loss"] is not None and summary["after"]["eval_loss"] is not None


def test_plateau_stop(tiny_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = build_config({}, run_args(tiny_dir, data, tmp_path / "run", **{
        "train.max_steps": 40, "train.lr": 1e-9, "train.plateau_patience": 3, "train.plateau_min_delta": 0.5}))
    summary = train(cfg, log=lambda *_: None)
    assert "plateau" in summary["stopped"] and summary["steps"] < 40


def test_loss_falls_over_a_short_run(tiny_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=16)
    cfg = build_config({}, run_args(tiny_dir, data, tmp_path / "run", **{
        "train.max_steps": 12, "data.val": data, "train.lr": 3e-2}))
    s = train(cfg, log=lambda *_: None)
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"] - 0.05


def test_existing_run_is_not_overwritten(tiny_dir, tmp_path):
    from slimtune.errors import ConfigError
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    cfg = build_config({}, run_args(tiny_dir, "x.jsonl", tmp_path / "run"))
    with pytest.raises(ConfigError, match="resume"):
        train(cfg)


def test_split_by_tokens_bounds_padded_size_and_keeps_every_row(examples):
    lengths = sorted(len(e["input_ids"]) for e in examples)
    budget = 2 * lengths[-1]
    pieces = split_by_tokens(examples, budget)
    assert len(pieces) > 1
    assert all(len(p) * max(len(r["input_ids"]) for r in p) <= budget for p in pieces)
    assert sorted(id(r) for p in pieces for r in p) == sorted(id(r) for r in examples)
    assert split_by_tokens(examples, len(examples) * lengths[-1]) == [examples]  # fits: unchanged
    assert split_by_tokens(examples, 0) == [examples]  # 0: never split
    assert [len(p) for p in split_by_tokens(examples, 1)] == [1] * len(examples)  # one row at least


@pytest.mark.parametrize("kl_lambda", [0.0, 0.1])
def test_token_budget_pieces_give_the_whole_batch_gradient(tok, examples, kl_lambda):
    pieces = split_by_tokens(examples, 3 * max(len(e["input_ids"]) for e in examples))
    assert 1 < len(pieces) < len(examples)
    assert_pieces_give_the_whole_batch(tok, examples, pieces, kl_lambda)


def test_train_with_a_token_budget_matches_whole_batches(tiny_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    adapters = []
    for name, budget in (("whole", 0), ("pieces", 64)):  # max_length 64: one row per piece
        out = tmp_path / name
        train(build_config({}, run_args(tiny_dir, data, out, **{"train.micro_batch_tokens": budget,
                                                                 "train.max_steps": 3})), log=lambda *a: None)
        adapters.append(load_file(str(out / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for k in adapters[0]:
        torch.testing.assert_close(adapters[1][k], adapters[0][k], atol=1e-5, rtol=1e-4)


def test_split_seed_keeps_the_held_out_set_while_train_seed_changes_the_run(tiny_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    runs = {}
    for name, extra in {"s0": {}, "s1": {"train.seed": 1}, "s1_split0": {"train.seed": 1, "data.split_seed": 0}}.items():
        cfg = build_config({}, run_args(tiny_dir, data, tmp_path / name, **{"train.max_steps": 2, **extra}))
        runs[name] = train(cfg, log=lambda *_: None)
    before = {k: s["before"]["eval_loss"] for k, s in runs.items()}  # LoRA starts at B=0: the base's loss
    assert before["s1_split0"] == pytest.approx(before["s0"], rel=1e-6)   # the same held-out chats
    assert before["s1"] != pytest.approx(before["s0"], rel=1e-4)          # train.seed alone re-draws them
    a = load_file(str(tmp_path / "s0" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "s1_split0" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)                    # but initialisation and order differ
