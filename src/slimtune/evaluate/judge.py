"""Optional pairwise judge: an OpenAI-compatible chat endpoint says which of two answers is better.

    (prompt, base, tuned) --ask(A=base, B=tuned)--> "A" | "B" | "tie"
                          --ask(A=tuned, B=base)--> "A" | "B" | "tie"   (the swap cancels position bias)
    per sample: tuned gets 1 per order it wins, 0.5 per tie; its score is the mean of the two

Any server speaking POST /v1/chat/completions works (vLLM, llama.cpp's server, Ollama, a hosted
API); stdlib urllib only. Set JUDGE_API_KEY to send `Authorization: Bearer ...`. Off by default:
`slimtune eval RUN --judge URL --judge-model NAME`.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request

from ..errors import SlimtuneError

SYSTEM = ("You are a careful, impartial judge of chat assistant answers. Compare two answers to the same "
          "user message for helpfulness, correctness, following the user's instructions, and clarity. "
          "Ignore answer order and length as such. Reply with exactly one token: A, B, or tie.")
TEMPLATE = "[User message]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\nWhich answer is better? Reply A, B, or tie."
VERDICT = re.compile(r"\b(A|B|tie)\b", re.I)


def endpoint(url: str) -> str:
    """Full chat-completions URL from a server root, a /v1 root, or the full URL."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def ask(url: str, model: str, prompt: str, a: str, b: str, timeout: float = 60.0) -> str:
    """One verdict, 'A', 'B' or 'tie' ('tie' when the reply names none). Raises SlimtuneError when
    the server cannot be reached or answers with something that is not a chat completion."""
    body = {"model": model, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": TEMPLATE.format(prompt=prompt, a=a or "(empty)", b=b or "(empty)")}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("JUDGE_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['JUDGE_API_KEY']}"
    req = urllib.request.Request(endpoint(url), data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read().decode())
        text = reply["choices"][0]["message"]["content"] or ""
    except urllib.error.HTTPError as e:
        raise SlimtuneError(f"judge at {endpoint(url)} answered HTTP {e.code}: {e.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise SlimtuneError(f"cannot reach the judge at {endpoint(url)}: {getattr(e, 'reason', e)}") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise SlimtuneError(f"the judge at {endpoint(url)} did not answer with a chat completion "
                            "(expected choices[0].message.content)") from None
    m = VERDICT.search(text)
    return "tie" if m is None else m.group(1).upper() if m.group(1).lower() != "tie" else "tie"


def judge_pairs(url: str, model: str | None, rows: list[dict], log=None, timeout: float = 60.0) -> dict:
    """Judge every row {prompt, base: {text}, tuned: {text}} (or plain strings) in both orders.

    Returns {"summary": {judge_model, samples, tuned_win_rate, base_win_rate, tie_rate, consistent_share},
    "per_sample": [{base_first, tuned_first, tuned_score}]}. tuned_score is 1 (tuned won both
    orders), 0.5 (split or tie), 0 (base won both); consistent_share: samples whose two verdicts agree.
    """
    if not model:
        raise SlimtuneError("--judge needs --judge-model NAME (the model the endpoint should use)")
    text = (lambda x: x["text"] if isinstance(x, dict) else x)
    per = []
    for i, r in enumerate(rows):
        base, tuned = text(r["base"]), text(r["tuned"])
        v1 = ask(url, model, r["prompt"], base, tuned, timeout)  # A = base
        v2 = ask(url, model, r["prompt"], tuned, base, timeout)  # A = tuned
        s1 = {"A": 0.0, "B": 1.0, "tie": 0.5}[v1]
        s2 = {"A": 1.0, "B": 0.0, "tie": 0.5}[v2]
        per.append({"base_first": v1, "tuned_first": v2, "tuned_score": (s1 + s2) / 2})
        if log and (i + 1) % 10 == 0:
            log(f"judged {i + 1}/{len(rows)}")
    n = max(1, len(per))
    scores = [p["tuned_score"] for p in per]
    summary = {"judge_model": model, "url": endpoint(url), "samples": len(per),
               "tuned_win_rate": sum(scores) / n, "base_win_rate": sum(1 - s for s in scores) / n,
               "tuned_wins": sum(s == 1.0 for s in scores), "base_wins": sum(s == 0.0 for s in scores),
               "tie_rate": sum(s == 0.5 for s in scores) / n,
               "consistent_share": sum((p["base_first"], p["tuned_first"]) in {("A", "B"), ("B", "A"), ("tie", "tie")}
                                       for p in per) / n}
    return {"summary": summary, "per_sample": per}
