"""Reading back what a run wrote, with one-line errors: a truncated or corrupt file names itself
and says what to do, never a traceback from safetensors or json.

Everything slimtune writes is written atomically (utils.atomic_*), so a damaged file comes from
outside: a disk that filled up, a copy cut short, a sync tool, a hand edit.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import SlimtuneError


def damaged(path: str | Path, why: str, fix: str) -> SlimtuneError:
    return SlimtuneError(f"{path} is truncated or corrupt ({why}); {fix}")


def check_safetensors(path: str | Path, fix: str) -> None:
    """Raise a SlimtuneError naming `path` unless its header and sizes are whole (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise damaged(path, str(e).splitlines()[0][:200] or type(e).__name__, fix) from None


def read_safetensors(path: str | Path, fix: str) -> dict:
    """load_file(path) with the damage reported as a SlimtuneError that names `path` and `fix`."""
    check_safetensors(path, fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise damaged(path, str(e).splitlines()[0][:200], fix) from None


def read_json(path: str | Path, fix: str):
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, f"not valid JSON: {e}", fix) from None
