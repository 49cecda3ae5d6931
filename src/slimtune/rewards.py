"""Rewards for RL with verifiable rewards: verifiers by name, weighted and summed.

    specs: [{"name": "ifeval", "weight": 1.0}, {"name": "length", "max": 80, "weight": 0.2},
            {"name": "my_rewards:brevity"}, {"name": "rewards.py:score", "label": "mine"}]
    compute_rewards(specs, prompts, completions, columns, ended)
        -> total (n,) = sum_k weight_k x reward_k,  per_function {label: (n,)}

Built-in verifiers (one float per completion, 0..1):

    ifeval    the `slimtune eval` instruction checks (evaluate/ifeval.py) on the row's `constraints`
              column ([{"type": "bullets", "n": 3}, ...]): the share passed, or 1/0 with mode="all"
    exact     the answer (or the `extract` regex's first group) equals the row's gold `column`,
              case, surrounding spaces and a final . or ! ignored
    numeric   the last number in the answer (or in the `extract` group) equals the gold number within `tol`
    regex     `pattern` is found in the answer (re.search; `full=True`: the whole stripped answer)
    json      the whole answer (optionally in one ``` fence) is a JSON object with every one of `keys`
    length    1 inside [min, max] words (unit="tokens": tokens), falling linearly to 0 over `slack`
              outside (default half the bound): a smooth pull, not a cliff
    ended     the completion ended with the end-of-turn token (not cut by max_new_tokens)

Anything else with a ':' is a user function `module:function` or `path/to/file.py:function`,
called as fn(prompts=..., completions=..., **columns, **args) -> list[float] (TRL's signature:
columns are the rows' other fields, one list entry per completion). A reward that raises,
returns the wrong number of values or a non-number stops with the function and the row.
Spec parsing and the verifiers need no torch; compute_rewards returns tensors.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import hashlib
import math
import numbers
import re
import sys
from pathlib import Path

from .errors import ConfigError, DataError
from .evaluate import ifeval

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def _norm(s) -> str:
    return " ".join(str(s).split()).rstrip(".!").strip().lower()


def _extracted(text: str, extract: str | None) -> str | None:
    """The first group (or whole match) of the last match of `extract`; the text itself without one."""
    if extract is None:
        return text
    hits = list(re.finditer(extract, text))
    if not hits:
        return None
    return hits[-1].group(1) if hits[-1].groups() else hits[-1].group(0)


# --- built-in verifiers: (text, row, ended, n_tokens, **args) -> float


def r_ifeval(text, row, ended, n_tokens, column: str = "constraints", mode: str = "fraction") -> float:
    constraints = row.get(column)
    if isinstance(constraints, str):
        constraints = json.loads(constraints)
    if not isinstance(constraints, list) or not constraints:
        raise ValueError(f"column '{column}' must be a non-empty list of constraints, got {constraints!r}")
    for c in constraints:
        if not isinstance(c, dict) or c.get("type") not in ifeval.CHECKERS:
            raise ValueError(f"unknown constraint {c!r}; types: {', '.join(ifeval.CHECKERS)}")
    passed = [ifeval.check(text, c) for c in constraints]
    return float(all(passed)) if mode == "all" else sum(passed) / len(passed)


def r_exact(text, row, ended, n_tokens, column: str = "answer", extract: str | None = None) -> float:
    got = _extracted(text, extract)
    return float(got is not None and _norm(got) == _norm(row[column]))


def r_numeric(text, row, ended, n_tokens, column: str = "answer", extract: str | None = None,
              tol: float = 1e-6) -> float:
    got = _extracted(text, extract)
    numbers = NUMBER.findall(got or "")
    if not numbers:
        return 0.0
    gold = float(str(row[column]).replace(",", ""))
    return float(abs(float(numbers[-1].replace(",", "")) - gold) <= tol)


def r_regex(text, row, ended, n_tokens, pattern: str, full: bool = False) -> float:
    return float(bool(re.fullmatch(pattern, text.strip(), re.S) if full else re.search(pattern, text)))


def r_json(text, row, ended, n_tokens, keys: list[str] = ()) -> float:
    return float(ifeval.json_keys(text, list(keys)))


def r_length(text, row, ended, n_tokens, min: int = 0, max: int | None = None,  # noqa: A002
             unit: str = "words", slack: float | None = None) -> float:
    if unit == "tokens":
        if n_tokens is None:
            raise ValueError("unit 'tokens' needs the completions' token counts")
        n = n_tokens
    else:
        n = len(ifeval.WORD.findall(text))
    if n < min:
        gap, bound = min - n, min
    elif max is not None and n > max:
        gap, bound = n - max, max
    else:
        return 1.0
    width = slack if slack is not None else (bound / 2 or 1)
    return float(1.0 - gap / width) if gap < width else 0.0


def r_ended(text, row, ended, n_tokens) -> float:
    return float(ended)


BUILTINS = {"ifeval": r_ifeval, "exact": r_exact, "numeric": r_numeric, "regex": r_regex, "json": r_json,
            "length": r_length, "ended": r_ended}
CHOICES = {"mode": ("fraction", "all"), "unit": ("words", "tokens")}


# --- specs


def parse_specs(specs: list[dict]) -> list[dict]:
    """Check reward specs [{name, weight=1.0, label=name, **args}]; returns them with weight and
    label filled in. Unknown names, bad arguments and duplicate labels are ConfigErrors."""
    if not isinstance(specs, list) or not specs:
        raise ConfigError("rewards: expected a non-empty list like [{name: ifeval, weight: 1.0}]")
    out, labels = [], set()
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{where}: expected a mapping with a 'name', got {spec!r}")
        name = spec["name"]
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{where} ({name}): weight must be a number, got {weight!r}")
        label = str(spec.get("label", name))
        if label in labels:
            raise ConfigError(f"{where}: a second reward named '{label}'; give one a distinct 'label'")
        labels.add(label)
        args = {k: v for k, v in spec.items() if k not in ("name", "weight", "label")}
        if name in BUILTINS:
            _check_builtin_args(where, name, args)
        elif ":" not in name:
            raise ConfigError(f"{where}: unknown reward '{name}'; choose one of: {', '.join(BUILTINS)}, "
                              "or a function 'module:function' / 'path/to/file.py:function'")
        out.append({"name": name, "weight": float(weight), "label": label, "args": args})
    return out


def _check_builtin_args(where: str, name: str, args: dict) -> None:
    try:
        inspect.signature(BUILTINS[name]).bind("", {}, True, None, **args)
    except TypeError as e:
        params = [p for p in inspect.signature(BUILTINS[name]).parameters][4:]
        raise ConfigError(f"{where} ({name}): {e}; its arguments: {', '.join(params) or 'none'}") from None
    for key, choices in CHOICES.items():
        if key in args and args[key] not in choices:
            raise ConfigError(f"{where} ({name}): {key} must be one of {', '.join(choices)}, got {args[key]!r}")


def load_function(ref: str):
    """`module:function` or `path/to/file.py:function` -> the callable (ConfigError if missing)."""
    target, _, fname = ref.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"reward '{ref}': no file {path}")
            key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            mod_name = f"slimtune_reward_{path.stem}_{key}"
            module = sys.modules.get(mod_name)
            if module is None:  # imported once per file, like a module
                spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as e:  # noqa: BLE001 (the user's file: any error is reported with it)
                    del sys.modules[mod_name]
                    raise ConfigError(f"reward '{ref}': loading {path} failed: {type(e).__name__}: {e}") from None
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise ConfigError(f"reward '{ref}': cannot import '{target}' ({e})") from None
    fn = getattr(module, fname, None)
    if not callable(fn):
        raise ConfigError(f"reward '{ref}': '{target}' has no function '{fname}'")
    return fn


# --- computing


def _row_name(i: int, where: list[str] | None) -> str:
    return f"row {i}" + (f" ({where[i]})" if where and where[i] else "")


def _error(label: str, i: int, where: list[str] | None, msg: str) -> DataError:
    return DataError(f"reward '{label}' on {_row_name(i, where)}: {msg}")


def _builtin_values(spec, completions, columns, ended, n_tokens, where) -> list[float]:
    fn, vals = BUILTINS[spec["name"]], []
    for i, text in enumerate(completions):
        row = {k: v[i] for k, v in columns.items()}
        try:
            vals.append(fn(text, row, bool(ended[i]), None if n_tokens is None else n_tokens[i], **spec["args"]))
        except (KeyError, ValueError, TypeError, re.error) as e:
            msg = f"no column {e}" if isinstance(e, KeyError) else str(e)
            raise _error(spec["label"], i, where, msg) from None
    return vals


def _user_values(spec, fn, prompts, completions, columns, where) -> list[float]:
    clash = set(spec["args"]) & (set(columns) | {"prompts", "completions"})
    if clash:
        raise ConfigError(f"reward '{spec['label']}': argument(s) {sorted(clash)} clash with the data's columns")

    def call(idx):
        cols = {k: [v[i] for i in idx] for k, v in columns.items()}
        return fn(prompts=[prompts[i] for i in idx], completions=[completions[i] for i in idx], **cols, **spec["args"])

    n = len(completions)
    try:
        vals = call(range(n))
    except Exception as e:  # noqa: BLE001 (a user's function: any failure is reported with its row)
        for i in range(n):  # find the first row that fails alone, to name it
            try:
                call([i])
            except Exception as e_row:  # noqa: BLE001
                raise _error(spec["label"], i, where, f"{type(e_row).__name__}: {e_row}") from e_row
        raise DataError(f"reward '{spec['label']}' on rows 0-{n - 1}: {type(e).__name__}: {e}") from e
    if not hasattr(vals, "__len__") or len(vals) != n:
        got = len(vals) if hasattr(vals, "__len__") else type(vals).__name__
        raise ConfigError(f"reward '{spec['label']}' returned {got} values for {n} completions "
                          f"(rows 0-{n - 1}); it must return one float per completion")
    return list(vals)


def compute_rewards(specs: list[dict], prompts: list, completions: list[str], columns: dict[str, list],
                    ended: list[bool], *, n_tokens: list[int] | None = None, where: list[str] | None = None,
                    functions: dict | None = None):
    """Rewards of n completions: (total (n,) fp32 tensor, {label: (n,) tensor}).

    prompts: n prompts (text or messages), repeated for the G completions of each; completions: n
    answer texts; columns: {column: n values} (the rows' other fields, e.g. "constraints", "answer");
    ended: n bools (ended with the end-of-turn token); n_tokens: n token counts (length, unit tokens);
    where: n places like "train.jsonl:12" for errors; functions: {name: callable} already loaded
    (load_function), else user functions are imported here.
    """
    import torch

    specs = parse_specs(specs)
    n = len(completions)
    for key, vals in [("prompts", prompts), ("ended", ended), *columns.items()]:
        if len(vals) != n:
            raise ValueError(f"{key}: {len(vals)} values for {n} completions")
    per = {}
    for spec in specs:
        if spec["name"] in BUILTINS:
            vals = _builtin_values(spec, completions, columns, ended, n_tokens, where)
        else:
            fn = (functions or {}).get(spec["name"]) or load_function(spec["name"])
            vals = _user_values(spec, fn, prompts, completions, columns, where)
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise _error(spec["label"], i, where, f"returned {v!r}, not a finite number")
        per[spec["label"]] = torch.tensor([float(v) for v in vals], dtype=torch.float32)
    total = torch.zeros(n)
    for spec in specs:
        total += spec["weight"] * per[spec["label"]]
    return total, per
