"""What happens around each step: the progress line, CSV/JSONL logs, and the stop rules.

The loop talks to loggers through one small interface (mlx-lm's tuner callbacks are the model):
`on_log(row)` for every logged step row ("loss" in it) and evaluation row ("eval_loss"),
`on_checkpoint(step, path)` after a checkpoint is complete, `on_end(summary)` once. Trackers and
tests hook in the same way (`train(cfg, callbacks=[...])`); they run on the main process only.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

from ..config import TrainCfg

class Callback:
    """Hooks the loop calls on the main process; override what you need."""

    def on_log(self, row: dict) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_end(self, summary: dict) -> None:
        pass


LOG_FIELDS = ["step", "epoch", "loss", "ce", "kl", "kl_lambda", "lr", "grad_norm", "tokens", "tokens_per_s",
              "elapsed_s", "eval_loss", "eval_ppl", "eval_kl", "general_kl"]


class RunLog(Callback):
    """Appends rows to train_log.csv and train_log.jsonl (one per logged step or evaluation)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.csv_path, self.jsonl_path = run_dir / "train_log.csv", run_dir / "train_log.jsonl"
        if resume_step is None:
            self.csv_path.write_text(",".join(LOG_FIELDS) + "\n")
            self.jsonl_path.write_text("")
        else:  # drop rows logged after the checkpoint we resume from: they will be logged again
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        rows = [json.loads(x) for x in self.jsonl_path.read_text().splitlines() if x.strip()] \
            if self.jsonl_path.exists() else []
        rows = [r for r in rows if r.get("step", 0) <= step]
        self.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def on_log(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items() if v is not None}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS, extrasaction="ignore").writerow(row)

    def rows(self) -> list[dict]:
        return [json.loads(x) for x in self.jsonl_path.read_text().splitlines() if x.strip()]


class Progress(Callback):
    """One live line on stderr: step, loss, lr, tokens/s, ETA; evaluation results on their own line."""

    def __init__(self, total_steps: int, enabled: bool = True):
        self.total, self.enabled = total_steps, enabled
        self.tty = sys.stderr.isatty()

    def on_log(self, row: dict) -> None:
        if "loss" in row:
            self.update(row["step"], row["loss"], row["lr"], row["tokens_per_s"], row["elapsed_s"])
        elif row.get("eval_loss") is not None:
            extra = "".join(f"  {k.replace('_', ' ')} {row[k]:.4f}" for k in ("eval_kl", "general_kl")
                            if row.get(k) is not None)
            ppl = f"  ppl {row['eval_ppl']:.2f}" if row.get("eval_ppl") is not None else ""  # none for preferences
            pref = f"  pref accuracy {row['eval_pref_accuracy']:.3f}" if row.get("eval_pref_accuracy") is not None else ""
            self.message(f"eval @ step {row['step']}: loss {row['eval_loss']:.4f}{ppl}{pref}{extra}")

    def update(self, step: int, loss: float, lr: float, tok_s: float, elapsed: float) -> None:
        if not self.enabled:
            return
        eta = elapsed / max(1, step) * (self.total - step)
        line = (f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  "
                f"elapsed {_hms(elapsed)}  eta {_hms(eta)}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\n" if self.tty else "") + text + "\n")
            sys.stderr.flush()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Stopper:
    """Wall-clock cap, plateau of the smoothed training loss, and held-out loss early stop.

    Its state is plain numbers, saved in checkpoints so a resumed run stops where it would have.
    """

    def __init__(self, cfg: TrainCfg, state: dict | None = None):
        self.cfg = cfg
        s = state or {}
        self.smoothed = s.get("smoothed")
        self.best_smoothed = s.get("best_smoothed", math.inf)
        self.since_best = s.get("since_best", 0)
        self.best_eval = s.get("best_eval", math.inf)
        self.evals_since_best = s.get("evals_since_best", 0)
        self.reason: str | None = None

    def state(self) -> dict:
        return {"smoothed": self.smoothed, "best_smoothed": self.best_smoothed, "since_best": self.since_best,
                "best_eval": self.best_eval, "evals_since_best": self.evals_since_best}

    def after_step(self, step: int, loss: float, elapsed_s: float) -> bool:
        c = self.cfg
        a = c.plateau_smoothing
        self.smoothed = loss if self.smoothed is None else a * self.smoothed + (1 - a) * loss
        if self.smoothed < self.best_smoothed - c.plateau_min_delta:
            self.best_smoothed, self.since_best = self.smoothed, 0
        else:
            self.since_best += 1
        if c.max_minutes is not None and elapsed_s >= c.max_minutes * 60:
            # the progress line's elapsed is training only; the cap counts loading and evaluations too
            self.reason = f"time cap of {c.max_minutes:g} min reached (loading and evaluations count)"
        elif c.plateau_patience and step >= c.plateau_min_steps and self.since_best >= c.plateau_patience:
            self.reason = (f"training loss plateaued: no improvement of {c.plateau_min_delta:g} "
                           f"in {self.since_best} steps")
        return self.reason is not None

    def after_eval(self, eval_loss: float) -> bool:
        if eval_loss < self.best_eval:
            self.best_eval, self.evals_since_best = eval_loss, 0
        else:
            self.evals_since_best += 1
        p = self.cfg.early_stop_patience
        if p and self.evals_since_best >= p:
            self.reason = f"held-out loss did not improve for {p} evaluations (best {self.best_eval:.4f})"
        return self.reason is not None


class Timer:
    def __init__(self, elapsed: float = 0.0):
        self.start, self.offset = time.perf_counter(), elapsed

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.start
