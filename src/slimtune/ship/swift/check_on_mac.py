"""On a Mac (macOS 15+, `pip install coremltools numpy`): run Model.mlpackage with Core ML and
compare its greedy answers with transformers' (reference.json, written by slimtune at export).

    python check_on_mac.py EXPORT_FOLDER [--compute-units all|cpu] [--function ctx_2048]

Prints one JSON line: prompts, greedy_equal (answers identical to transformers'), per prompt the
index of the first differing token, and every function's input / output / state names as loaded.
Exit status 0 when every answer is identical, 1 otherwise (fp16 may part from fp32 at near-ties).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def mask(T: int, end: int) -> np.ndarray:
    """(1, 1, T, END) fp16: 0 where query t (position END - T + t) may see key s, -1e4 after it."""
    pos = np.arange(end - T, end)[:, None]
    return np.where(np.arange(end)[None, :] <= pos, 0.0, -1e4).astype(np.float16)[None, None]


def greedy(model, ids: list[int], n: int, stops: set[int], context: int) -> list[int]:
    """The loop of Generator.swift: prefill, then one token a call, the KV cache in an MLState."""
    state = model.make_state()
    logits = model.predict({"inputIds": np.array([ids], dtype=np.int32), "causalMask": mask(len(ids), len(ids))},
                           state=state)["logits"]
    out, end = [], len(ids)
    for _ in range(n):
        t = int(np.argmax(logits[0, -1].astype(np.float32)))
        out.append(t)
        if t in stops or end >= context:
            break
        end += 1
        logits = model.predict({"inputIds": np.array([[t]], dtype=np.int32), "causalMask": mask(1, end)},
                               state=state)["logits"]
    return out


def check(folder: str | Path, compute_units: str = "all", function: str | None = None) -> dict:
    import coremltools as ct

    folder = Path(folder)
    ref = json.loads((folder / "reference.json").read_text())
    function = function or ref["function"]
    units = {"all": ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY}[compute_units]
    model = ct.models.MLModel(str(folder / "Model.mlpackage"), compute_units=units, function_name=function)
    context = int(function.rsplit("_", 1)[1])
    stops = set(ref["stop_ids"])
    differ = []
    for a in ref["answers"]:
        got = greedy(model, a["prompt_ids"], len(a["greedy_ids"]), stops, context)
        want = a["greedy_ids"]
        if got != want:
            differ.append(next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want))))
    spec = model.get_spec().description
    d = next((f for f in spec.functions if f.name == function), spec)
    return {"function": function, "compute_units": compute_units, "prompts": len(ref["answers"]),
            "greedy_equal": len(ref["answers"]) - len(differ), "first_difference_at": differ,
            "inputs": [i.name for i in d.input], "outputs": [o.name for o in d.output],
            "states": [s.name for s in d.state]}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--compute-units", default="all", choices=["all", "cpu"])
    p.add_argument("--function", help="default: the one reference.json was made for")
    a = p.parse_args()
    res = check(a.folder, a.compute_units, a.function)
    print(json.dumps(res))
    sys.exit(0 if res["greedy_equal"] == res["prompts"] else 1)
