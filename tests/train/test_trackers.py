"""Trackers (`train.report_to`): TensorBoard event files hold what train_log.jsonl holds; trackers
that are missing or would reach the network unconfigured are refused before training."""

import json

import pytest
from test_loop import run_args, write_data

from slimtune.config import build_config
from slimtune.errors import ConfigError
from slimtune.train.loop import train
from slimtune.train.trackers import check_trackers, scalars


def test_tensorboard_events_match_the_log(tiny_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    data = write_data(tmp_path / "d.jsonl")
    train(build_config({}, run_args(tiny_dir, data, run, **{"train.max_steps": 3, "train.report_to": "[tensorboard]"})),
          log=lambda *a: None)
    ev = EventAccumulator(str(run / "tb"))
    ev.Reload()
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    got = [(e.step, e.value) for e in ev.Scalars("train/loss")]
    assert [s for s, _ in got] == [s for s, _ in losses] == [1, 2, 3]
    assert [v for _, v in got] == pytest.approx([v for _, v in losses], rel=1e-5)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    got_evals = {e.step: e.value for e in ev.Scalars("eval/loss")}
    assert got_evals.keys() == evals.keys() == {0, 3}
    assert list(got_evals.values()) == pytest.approx(list(evals.values()), rel=1e-5)
    assert "train/lr" in ev.Tags()["scalars"] and "config" in "".join(ev.Tags()["tensors"])


def test_off_by_default_and_refusals(tiny_dir, tmp_path, monkeypatch):
    assert build_config({}, []).train.report_to == []
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # pretend all are installed
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="WANDB_MODE=offline"):
        check_trackers(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(["wandb"])


def test_missing_tracker_is_named(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install mlflow"):
        check_trackers(["mlflow"])


def test_scalars_keep_numbers_only():
    assert scalars({"step": 3, "loss": 1.5, "kl": None, "stopped": "x", "grad_norm": float("nan"), "tokens": 7}) == \
        {"loss": 1.5, "tokens": 7.0}
