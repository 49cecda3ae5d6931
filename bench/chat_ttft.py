"""Time to a chat turn's first token, with the packed decoder built per turn and kept across turns
(`generate.keep_decoders`, as `slimtune chat` runs), on the embedded SmolLM2 in bf16.

    PYTHONPATH=src python bench/chat_ttft.py --rounds 4

One short user turn, a 16-token answer; medians over rounds (kept: the median of 3 turns after a
first one that builds). Prints the milliseconds; needs a CPU with packed bf16 (oneDNN) to differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slimtune.generate import generate, keep_decoders  # noqa: E402
from slimtune.models import load_model, load_tokenizer  # noqa: E402


class _First:
    """A streamer that notes when the first token arrives."""

    def __init__(self):
        self.at = None

    def put(self, ids):
        self.at = self.at or time.perf_counter()

    def end(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    tok, model = load_tokenizer(args.model), load_model(args.model).eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]

    def turn() -> float:
        s, t = _First(), time.perf_counter()
        generate(model, tok, chat, 16, streamer=s, autocast="bf16")
        return s.at - t

    res = {"built_per_turn_ms": [], "kept_ms": []}
    for _ in range(args.rounds):
        res["built_per_turn_ms"].append(turn())
        with keep_decoders():
            turn()
            res["kept_ms"].append(statistics.median([turn() for _ in range(3)]))
    print(json.dumps({k: round(statistics.median(v) * 1e3) for k, v in res.items()}))


if __name__ == "__main__":
    main()
