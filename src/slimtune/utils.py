"""Small shared helpers: atomic writes (nothing is ever left half-written), seeding, timing."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """$SLIMTUNE_CACHE, else ~/.cache/slimtune. Converted models live in <cache>/models/<name>,
    cached data in <cache>/data."""
    return Path(os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune").expanduser()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    _atomic_write(path, text, "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (an Arrow file written to memory first)."""
    _atomic_write(path, data, "wb")


def _atomic_write(path: str | Path, text: str | bytes, mode: str) -> None:
    with atomic_file(path) as tmp, open(tmp, mode) as f:
        f.write(text)


@contextmanager
def atomic_file(path: str | Path, mode: int = 0o644):
    """`with atomic_file(path) as tmp:` write `tmp` (a path beside `path`) any way you like; on
    success it is fsynced and renamed over `path` (readers see the old file or the new one, never
    half of one); on an exception it is deleted and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def eval_mode(model):
    """`with eval_mode(model):` dropout off for the block, the model's previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_dir(final: str | Path):
    """Context manager: yields a temporary folder beside `final`, renamed onto it on success.

    A crash mid-write leaves only a `.tmp-*` folder that is ignored and cleaned next time.
    """
    @contextmanager
    def _cm():
        final_p = Path(final)
        final_p.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final_p.parent, prefix=f".tmp-{final_p.name}-"))
        try:
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if final_p.exists():
                old = final_p.with_name(f".old-{final_p.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final_p, old)
                os.replace(tmp, final_p)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final_p)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return _cm()


def seed_everything(seed: int) -> None:
    import torch  # here, so the file helpers import without torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:  # numpy is optional at run time
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB since the last `reset_peak_rss()`: Linux's
    VmHWM, else ru_maxrss (the whole life of the process; KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> None:
    """Start a new peak for `peak_rss_mb` (Linux: the high-water mark is reset through
    /proc/self/clear_refs), so runs in one process (a sweep) each report their own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak stays the process's whole life


def quiet_libraries() -> None:
    """Our own progress lines are the ones to read: no per-tensor loading bars, no deprecation
    noise that PEFT triggers inside transformers."""
    import warnings

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
