"""scripts/study_report.py: presets are written from the quickstart with their overrides, and the
claims are graded from committed run records."""

import importlib.util
import json
from pathlib import Path

import pytest

from slimtune.config import load_config
from slimtune.grading import group_by_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("study_report", ROOT / "scripts" / "study_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(values: dict[str, tuple[dict, list[float]]]):
    """{config: (overrides, [loss per seed])} -> rows and combos as the report reads them."""
    out, combos = [], {}
    for name, (over, losses) in values.items():
        for seed, loss in enumerate(losses):
            run = name if seed == 0 else (f"{name}_seed-{seed}" if over else f"seed-{seed}")
            combos[run] = dict(over, **({"train.seed": seed} if seed else {}))
            out.append({"run": run, "eval_loss": loss, "eval_loss_before": 2.0, "eval_kl": 0.3,
                        "general_kl": 0.4 - 0.2 * over.get("loss.kl_lambda", 0), "trainable": 4e6 * over.get("method.r", 16) / 16,
                        "adapter_mb": 18.0, "s_per_step": 4.0})
    return out, combos


def test_presets_follow_the_numbers_and_load(report, tmp_path):
    r, combos = rows({"base": ({}, [1.70, 1.71, 1.69, 1.70, 1.70]),
                      "optimizer-lion": ({"train.optimizer": "lion"}, [1.60, 1.61, 1.59]),
                      "r-2": ({"method.r": 2}, [1.70, 1.71, 1.70]),
                      "kl_lambda-0.5": ({"loss.kl_lambda": 0.5}, [1.75])})
    groups = group_by_config(r, combos, report.METRICS + ["eval_loss_before"])
    noise = {m: groups["base"].sd(m) or 0.01 for m in report.METRICS}
    presets = report.choose_presets(groups, noise)
    assert presets["best_quality"]["group"].name == "optimizer-lion"
    assert "beyond the noise" in presets["best_quality"]["why"]
    assert presets["best_efficiency"]["group"].name == "r-2"    # fewest parameters, loss not worse
    assert presets["most_surgical"]["group"].name == "kl_lambda-0.5"
    for name, choice in presets.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(report.preset_yaml(name, choice, groups["base"]))
        cfg = load_config(path)
        for key, value in choice["group"].overrides.items():
            section, field = key.split(".", 1)
            assert getattr(getattr(cfg, section), field) == value, (name, key)
        assert cfg.train.output_dir == f"runs/{name}" and cfg.train.max_steps == 40
        assert "held-out loss 2.0000 -> " in path.read_text()


def test_a_tie_is_called_a_tie(report):
    r, combos = rows({"base": ({}, [1.70, 1.72, 1.68, 1.70, 1.70]),
                      "optimizer-lion": ({"train.optimizer": "lion"}, [1.695])})
    groups = group_by_config(r, combos, report.METRICS + ["eval_loss_before"])
    noise = {m: groups["base"].sd(m) or 0.01 for m in report.METRICS}
    assert "a tie" in report.choose_presets(groups, noise)["best_quality"]["why"]
    checks = {(c["a"], c["metric"]): c for c in report.graded(groups, noise)}
    assert checks[("optimizer-lion", "eval_loss")]["grade"] == "holds"       # claimed "=": a tie holds
    assert checks[("r-2", "eval_loss")]["grade"] == "not run"


def test_the_committed_runs_rebuild_the_page(report, tmp_path):
    """The committed records alone (no run folders) give every section of docs/study.md."""
    store = ROOT / "docs" / "study" / "runs"
    if not any(store.glob("*.json")):
        pytest.skip("no committed study runs")
    rows_, combos = report.collect(None, ROOT / "configs" / "sweeps" / "study.yaml", store)
    assert rows_ and all(json.loads((store / f"{r['run']}.json").read_text())["overrides"] == combos[r["run"]]
                         for r in rows_)


def test_seed_verdicts(report):
    g = lambda grade: {"grade": grade}  # noqa: E731
    assert report.verdict([(g("holds"), True), (g("holds"), True)]) == "holds here"
    assert report.verdict([(g("holds"), True), (g("within noise"), True)]) == "partly (the rest within noise)"
    assert report.verdict([(g("holds"), True), (g("holds"), False)]) == "contradicted here"   # a check against it held
    assert report.verdict([(g("contradicted"), True)]) == "contradicted here"
    assert report.verdict([(g("within noise"), True), (g("within noise"), False)]) == "within noise"
    assert report.verdict([]) == "not tested"
    checks = {(c[1], c[2], c[3], c[4]) for c in report.CHECKS}
    assert all(k in checks for _, keys, _ in report.SEED for k, _ in keys)  # every seed row's comparison is graded
