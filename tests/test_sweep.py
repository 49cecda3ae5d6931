"""A sweep runs every grid combination once, resumes, and ranks the runs in one table."""

import json

import pytest
import yaml
from test_loop import chats

from slimtune.errors import ConfigError
from slimtune.sweep import grid_runs, run_name, sweep


def test_grid_and_names():
    runs = grid_runs({"train.lr": [1e-3, 1e-2], "method.targets": ["attn", ["q_proj"]]})
    assert len(runs) == 4 and runs[0] == {"train.lr": 1e-3, "method.targets": "attn"}
    assert run_name(runs[1]) == "lr-0.001_targets-q_proj"
    with pytest.raises(ConfigError):
        grid_runs({"lr": [1]})


def tiny_config(tiny_dir, tmp_path, steps: int) -> dict:
    """A sweep's inline config: the tiny model on 16 chats, `steps` steps."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats(16, seed=2)))
    return {"model": {"name": tiny_dir}, "data": {"train": str(data), "max_length": 64, "general_prompts": None},
            "train": {"max_steps": steps, "progress": False}, "eval": {"max_examples": 4}}


def test_sweep_runs_ranks_and_resumes(tiny_dir, tmp_path):
    spec = {"config": tiny_config(tiny_dir, tmp_path, 2),
            "grid": {"train.lr": [1e-4, 3e-2], "method.r": [2]}, "output_dir": str(tmp_path / "sw"),
            "set": {"train.warmup_steps": 1, "method.alpha": 7}, "evaluate": False}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    rows = sweep(tmp_path / "s.yaml", log=lambda *_: None)
    assert len(rows) == 2
    table = (tmp_path / "sw" / "results.md").read_text()
    assert table.count("\n") == 4 and "eval_kl" in table
    assert (tmp_path / "sw" / "results.csv").exists()
    ranked = [l.split("|")[2].strip() for l in table.splitlines()[2:]]
    losses = {r["run"]: r["eval_loss"] for r in rows}
    assert losses[ranked[0]] <= losses[ranked[1]]
    for r in rows:  # efficiency beside quality
        assert r["trainable"] > 0 and r["adapter_mb"] > 0 and r["s_per_step"] > 0 and r["peak_rss_mb"] > 0
    assert "kl" in rows[0]["pareto"] or "kl" in rows[1]["pareto"]
    for r in rows:  # `set:` reached every run
        cfg = yaml.safe_load((tmp_path / "sw" / r["run"] / "config.yaml").read_text())
        assert cfg["train"]["warmup_steps"] == 1 and cfg["method"]["alpha"] == 7
    mtime = (tmp_path / "sw" / "lr-0.0001_r-2" / "summary.json").stat().st_mtime
    sweep(tmp_path / "s.yaml", log=lambda *_: None)  # finished runs are not run again
    assert (tmp_path / "sw" / "lr-0.0001_r-2" / "summary.json").stat().st_mtime == mtime


def test_bad_combination_fails_before_training(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"grid": {"train.optimizer": ["adamw", "sgd"]}}))
    with pytest.raises(ConfigError, match="sgd"):
        sweep(tmp_path / "s.yaml")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"grid": {"train.lr": [1e-3]}, "set": {"train.nope": 1}}))
    with pytest.raises(ConfigError, match="nope"):
        sweep(tmp_path / "t.yaml")


def test_shipped_sweeps_are_valid():
    from pathlib import Path

    from slimtune.config import build_config
    from slimtune.sweep import _override_strings, load_sweep, sweep_runs
    paths = sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml"))
    assert paths, "no shipped sweep found"
    for path in paths:
        base, grid, _ = load_sweep(path)
        runs, _ = sweep_runs(grid)
        assert len(runs) > 1, f"{path.name}: a sweep of one run"
        for combo in runs:  # every run's config builds and carries its grid values
            cfg = build_config(base, _override_strings(combo))
            for key, value in combo.items():
                section, name = key.split(".", 1)
                assert getattr(getattr(cfg, section), name) == value, f"{path.name}: {key}"


def test_pareto_front():
    from slimtune.sweep import pareto
    rows = [{"run": "a", "eval_loss": 1.0, "eval_kl": 0.5}, {"run": "b", "eval_loss": 1.2, "eval_kl": 0.1},
            {"run": "c", "eval_loss": 1.3, "eval_kl": 0.6}, {"run": "d", "eval_loss": 1.0, "eval_kl": 0.7},
            {"run": "e", "eval_loss": None, "eval_kl": 0.0}]
    assert pareto(rows, "eval_kl") == {"a", "b"}  # c is beaten by a on both, d ties a on loss with more KL


def test_one_factor_at_a_time():
    from slimtune.sweep import one_at_a_time, run_name
    runs = one_at_a_time({"train.lr": [1e-4, 1e-3], "method.r": [4]})
    assert runs == [{}, {"train.lr": 1e-4}, {"train.lr": 1e-3}, {"method.r": 4}]
    assert [run_name(r) for r in runs] == ["base", "lr-0.0001", "lr-0.001", "r-4"]


def test_runs_list_adds_named_runs_after_the_one_factor_runs(tmp_path):
    from slimtune.sweep import load_sweep, parse_shard, sweep_runs
    spec = {"config": {}, "vary": {"method.r": [2]},
            "runs": [{"train.seed": 1}, {"method.r": 2, "train.seed": 1}, {"method.r": 2}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    runs, keys = sweep_runs(load_sweep(tmp_path / "s.yaml")[1])
    assert [run_name(r) for r in runs] == ["base", "r-2", "seed-1", "r-2_seed-1"]  # r-2 listed twice: once
    assert keys == ["method.r", "train.seed"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"config": {}, "runs": [{"seed": 1}]}))
    with pytest.raises(ConfigError, match="runs must be"):
        load_sweep(tmp_path / "bad.yaml")
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) == (1, 1)
    for bad in ("3/2", "x", "0/2"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)


def test_two_shards_train_disjoint_runs_and_both_tables_see_them(tiny_dir, tmp_path):
    spec = {"config": tiny_config(tiny_dir, tmp_path, 1),
            "vary": {"method.r": [2]}, "runs": [{"train.seed": 1}], "output_dir": str(tmp_path / "sw"),
            "evaluate": False}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    first = sweep(tmp_path / "s.yaml", log=lambda *_: None, shard="1/2")  # runs 1 and 3: base, seed-1
    assert sorted(r["run"] for r in first) == ["base", "seed-1"]
    assert not (tmp_path / "sw" / "r-2").exists()
    second = sweep(tmp_path / "s.yaml", log=lambda *_: None, shard="2/2")
    assert sorted(r["run"] for r in second) == ["base", "r-2", "seed-1"]  # its own run and the other's
