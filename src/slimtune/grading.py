"""Sweep runs grouped over seeds, and differences graded against the seed-to-seed noise.

A sweep that runs a configuration with several `train.seed` values (sweep.py `runs:`) measures
how far the seed alone moves each metric. Here:

    groups = group_by_config(rows)            # {config name: Group(n, mean, sd, runs) per metric}
    noise = groups["base"].sd                 # the base's seed-to-seed sd, per metric
    grade(groups["r-2"], groups["base"], "eval_loss", "=", noise["eval_loss"])

The rule (docs/study.md): a difference of means is beyond the noise when it exceeds
2 x s x sqrt(1/n_a + 1/n_b), s the base's seed-to-seed standard deviation of that metric (a
two-sided test at ~95% for normal noise, with s taken as known). A claim is "holds" when the
difference is beyond the noise in the claimed direction, "contradicted" when beyond it the other
way, "within noise" otherwise; a claim of no difference ("=") holds within the noise and is
contradicted beyond it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

SEED_KEY = "train.seed"


def config_of(combo: dict) -> dict:
    """A run's overrides without its seed: the configuration it repeats."""
    return {k: v for k, v in combo.items() if k != SEED_KEY}


@dataclass
class Group:
    """One configuration's runs over seeds: per metric the values, their mean and sd."""
    name: str
    overrides: dict
    runs: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    def mean(self, metric: str) -> float | None:
        v = self.values.get(metric) or []
        return statistics.fmean(v) if v else None

    def sd(self, metric: str) -> float | None:
        """Sample standard deviation (n - 1); None for fewer than two seeds."""
        v = self.values.get(metric) or []
        return statistics.stdev(v) if len(v) > 1 else None


def group_by_config(rows: list[dict], combos: dict[str, dict], metrics: list[str],
                    name_of=None) -> dict[str, Group]:
    """rows: one per run ({"run": name, metric: value}); combos: run name -> its overrides.
    Runs that differ only in train.seed share a group, named by name_of(overrides) ('base' for none)."""
    from .sweep import run_name
    name_of = name_of or (lambda o: run_name(o) if o else "base")
    groups: dict[str, Group] = {}
    for row in rows:
        overrides = config_of(combos[row["run"]])
        g = groups.setdefault(name_of(overrides), Group(name_of(overrides), overrides))
        g.runs.append(row["run"])
        for m in metrics:
            if isinstance(row.get(m), (int, float)) and not (isinstance(row[m], float) and math.isnan(row[m])):
                g.values.setdefault(m, []).append(float(row[m]))
    return groups


def threshold(sd: float, n_a: int, n_b: int, k: float = 2.0) -> float:
    """The smallest difference of two means (n_a and n_b seeds) beyond k noise sds."""
    return k * sd * math.sqrt(1 / n_a + 1 / n_b)


GRADES = ("holds", "within noise", "contradicted")


def grade(a: Group, b: Group, metric: str, claim: str, sd: float) -> tuple[str, float, float]:
    """Grade the claim "a <claim> b" on metric, claim one of '<', '>', '=' (lower / higher / no
    different). Returns (grade, mean(a) - mean(b), the threshold that difference had to pass)."""
    if claim not in ("<", ">", "="):
        raise ValueError(f"claim must be <, > or =, got {claim!r}")
    ma, mb = a.mean(metric), b.mean(metric)
    if ma is None or mb is None:
        raise ValueError(f"{metric}: no value for {a.name if ma is None else b.name}")
    diff, bar = ma - mb, threshold(sd, len(a.values[metric]), len(b.values[metric]))
    if abs(diff) <= bar:
        return ("holds" if claim == "=" else "within noise"), diff, bar
    if claim == "=":
        return "contradicted", diff, bar
    return ("holds" if (diff < 0) == (claim == "<") else "contradicted"), diff, bar


__all__ = ["Group", "group_by_config", "config_of", "threshold", "grade", "GRADES"]
