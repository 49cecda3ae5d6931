"""Run a GGUF through llama.cpp (llama-cpp-python) and print what it computed, as one JSON line.

    python bench/llama_cpp_answer.py MODEL.gguf "PROMPT TEXT" [N_NEW]

Runs in its own environment (llama-cpp-python and numpy only; no torch, no slimtune), so the
answer comes from a reader slimtune did not write. The prompt is the text of an already rendered
chat; special tokens in it (<|im_start|>) are parsed as tokens, and no BOS is added, as
transformers' apply_chat_template does. Prints {prompt_ids, greedy_ids, greedy_text, last_logits}.
"""

import json
import sys

import numpy as np
from llama_cpp import Llama


def main(path: str, prompt: str, n_new: int = 8) -> dict:
    llm = Llama(model_path=path, n_ctx=1024, n_threads=1, logits_all=True, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.eval(ids)
    last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    out = []
    for _ in range(n_new):  # greedy: argmax of the last logits, one token at a time
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    return {"prompt_ids": ids, "greedy_ids": out, "greedy_text": text, "last_logits": last.tolist()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 8)))
