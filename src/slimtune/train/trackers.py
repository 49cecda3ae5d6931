"""Experiment trackers (`train.report_to`): callbacks that copy each logged row to a tracker.

    tensorboard  event files in RUN/tb (local; `tensorboard --logdir RUN/tb`)
    wandb        Weights & Biases: needs WANDB_API_KEY (or `wandb login`), or WANDB_MODE=offline
    mlflow       MLFLOW_TRACKING_URI if set, else a local store in RUN/mlruns
    trackio      local by default (trackio's own store); a Space only if TRACKIO_SPACE_ID is set

Off unless listed; the main process only. Nothing reaches the network unless the user set it up:
wandb without credentials or WANDB_MODE is refused before training rather than prompting, and
mlflow without a tracking URI writes files in the run folder.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from ..errors import ConfigError
from .callbacks import Callback

PIP = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def scalars(row: dict) -> dict[str, float]:
    """The row's finite numbers, by name ("step" left out: it is the x axis)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _tag(key: str) -> str:
    return f"eval/{key.removeprefix('eval_')}" if key.startswith(("eval_", "general_")) else f"train/{key}"


class TensorBoard(Callback):
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.writer.add_text("config", "```yaml\n" + _yaml(config) + "\n```", 0)

    def on_log(self, row):
        for k, v in scalars(row).items():
            self.writer.add_scalar(_tag(k), v, row["step"])
        self.writer.flush()

    def on_end(self, summary):
        self.writer.close()


class WandB(Callback):
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slimtune"), name=run_dir.name,
                              dir=str(run_dir), config=config)

    def on_log(self, row):
        self.run.log({_tag(k): v for k, v in scalars(row).items()}, step=row["step"])

    def on_end(self, summary):
        self.run.finish()


class MLflow(Callback):
    def __init__(self, run_dir: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({f"{s}.{k}": str(v)[:250] for s, sec in config.items() for k, v in sec.items()})

    def on_log(self, row):
        self.mlflow.log_metrics({_tag(k).replace("/", "."): v for k, v in scalars(row).items()}, step=row["step"])

    def on_end(self, summary):
        self.mlflow.end_run()


class Trackio(Callback):
    def __init__(self, run_dir: Path, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "slimtune"), name=run_dir.name, config=config,
                     space_id=os.environ.get("TRACKIO_SPACE_ID") or None)

    def on_log(self, row):
        self.trackio.log({_tag(k): v for k, v in scalars(row).items()}, step=row["step"])

    def on_end(self, summary):
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def check_trackers(names: list[str]) -> None:
    """Before any model loads: every tracker installed, and wandb set up (it would prompt or call home)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to lists {name}, which is not installed: pip install {PIP[name]}")
    if "wandb" in names and not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
                                 or _netrc_has("api.wandb.ai")):
        raise ConfigError("train.report_to lists wandb, but wandb has no credentials: run `wandb login`, set "
                          "WANDB_API_KEY, or WANDB_MODE=offline to keep the run local")


def make_trackers(names: list[str], run_dir: Path, config: dict) -> list[Callback]:
    check_trackers(names)
    return [TRACKERS[n](run_dir, config) for n in names]


def _netrc_has(host: str) -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return path.is_file() and host in path.read_text(errors="ignore")


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
