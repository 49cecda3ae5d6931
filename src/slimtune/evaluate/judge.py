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
import time
import urllib.error
import urllib.request

from ..errors import SlimtuneError

SYSTEM = ("You are a careful, impartial judge of chat assistant answers. Compare two answers to the same "
          "user message for helpfulness, correctness, following the user's instructions, and clarity. "
          "Ignore answer order and length as such. Reply with exactly one token: A, B, or tie.")
TEMPLATE = "[User message]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\nWhich answer is better? Reply A, B, or tie."
ONLY = re.compile(r"^\W*(A|B|tie)\W*$", re.I)            # the whole reply is the verdict: "B", "[[A]]", "Tie."
NAMED = re.compile(r"\b(?:answer|verdict|choice)\W*(A|B)\b|\[\[(A|B|tie)\]\]", re.I)  # "Answer B is better"
TOKEN = re.compile(r"\b(A|B|tie)\b", re.I)
THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)  # reasoning models' blocks (unclosed: cut off)
RETRY = {429, 500, 502, 503, 504}


def endpoint(url: str) -> str:
    """Full chat-completions URL from a server root, a /v1 root, or the full URL."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a judge's reply, or None when it names no single verdict.

    Reasoning blocks (<think>...</think>) are dropped first. A reply that is only the verdict is
    read as such; else "Answer B" / "[[B]]" forms; else the verdict when exactly one of A / B / tie
    appears as a word. "A better answer is B" names both, so it is None, not a guess."""
    text = THINK.sub(" ", text or "").strip()
    for pattern in (ONLY, NAMED):
        m = pattern.search(text)
        if m:
            v = next(g for g in m.groups() if g)
            return "tie" if v.lower() == "tie" else v.upper()
    found = {("tie" if t.lower() == "tie" else t.upper()) for t in TOKEN.findall(text)}
    return found.pop() if len(found) == 1 else None


def ask(url: str, model: str, prompt: str, a: str, b: str, timeout: float = 60.0, max_tokens: int = 16,
        retries: int = 4) -> tuple[str | None, str]:
    """(verdict or None, the reply's text). HTTP 429 / 5xx and timeouts are retried `retries` times,
    waiting as the server's Retry-After says (else 1, 2, 4, 8 s). Raises SlimtuneError when the server
    cannot be reached, refuses, or answers with something that is not a chat completion."""

    body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": TEMPLATE.format(prompt=prompt, a=a or "(empty)", b=b or "(empty)")}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("JUDGE_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['JUDGE_API_KEY']}"
    req = urllib.request.Request(endpoint(url), data=json.dumps(body).encode(), headers=headers, method="POST")
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                reply = json.loads(resp.read().decode())
            text = reply["choices"][0]["message"]["content"] or ""
            return verdict(text), text
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace")
            if e.code in RETRY and attempt < retries:
                wait = e.headers.get("Retry-After") if e.headers else None
                time.sleep(min(float(wait), 60.0) if wait and wait.replace(".", "").isdigit() else 2.0 ** attempt)
                continue
            raise SlimtuneError(f"judge at {endpoint(url)} answered HTTP {e.code}: {detail}"
                                + (f" (after {retries} retries)" if e.code in RETRY else "")) from None
        except (TimeoutError, ConnectionResetError) as e:
            if attempt < retries:
                time.sleep(2.0 ** attempt)
                continue
            raise SlimtuneError(f"the judge at {endpoint(url)} did not answer ({e}) after {retries} retries") from None
        except (urllib.error.URLError, OSError) as e:
            raise SlimtuneError(f"cannot reach the judge at {endpoint(url)}: {getattr(e, 'reason', e)}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise SlimtuneError(f"the judge at {endpoint(url)} did not answer with a chat completion "
                                "(expected choices[0].message.content)") from None
    raise AssertionError("unreachable")


def judge_pairs(url: str, model: str | None, rows: list[dict], log=None, timeout: float = 60.0,
                max_tokens: int = 16) -> dict:
    """Judge every row {prompt, base: {text}, tuned: {text}} (or plain strings) in both orders.

    Returns {"summary": {judge_model, samples, tuned_win_rate, base_win_rate, tie_rate, consistent_share},
    "per_sample": [{base_first, tuned_first, tuned_score}]}. tuned_score is 1 (tuned won both
    orders), 0.5 (split or tie), 0 (base won both); consistent_share: samples whose two verdicts agree;
    unread_share: replies that named no verdict (scored 0.5, their text kept in `unread_replies`).
    """
    if not model:
        raise SlimtuneError("--judge needs --judge-model NAME (the model the endpoint should use)")
    text = (lambda x: x["text"] if isinstance(x, dict) else x)
    per, unread = [], []
    for i, r in enumerate(rows):
        base, tuned = text(r["base"]), text(r["tuned"])
        v1, t1 = ask(url, model, r["prompt"], base, tuned, timeout, max_tokens)  # A = base
        v2, t2 = ask(url, model, r["prompt"], tuned, base, timeout, max_tokens)  # A = tuned
        s1 = {"A": 0.0, "B": 1.0, "tie": 0.5, None: 0.5}[v1]
        s2 = {"A": 1.0, "B": 0.0, "tie": 0.5, None: 0.5}[v2]
        row = {"base_first": v1, "tuned_first": v2, "tuned_score": (s1 + s2) / 2}
        for v, t in ((v1, t1), (v2, t2)):
            if v is None:  # kept, counted and shown: a judge that does not answer is not a tie
                row.setdefault("unread_replies", []).append(t[:300])
                unread.append(t)
        per.append(row)
        if log and (i + 1) % 10 == 0:
            log(f"judged {i + 1}/{len(rows)}")
    n = max(1, len(per))
    if unread and log:
        log(f"judge: {len(unread)} of {2 * len(per)} replies named no verdict (scored as ties; e.g. "
            f"{unread[0][:80]!r}); a reasoning judge may need a larger --judge-max-tokens")
    scores = [p["tuned_score"] for p in per]
    summary = {"judge_model": model, "url": endpoint(url), "samples": len(per),
               "tuned_win_rate": sum(scores) / n, "base_win_rate": sum(1 - s for s in scores) / n,
               "tuned_wins": sum(s == 1.0 for s in scores), "base_wins": sum(s == 0.0 for s in scores),
               "tie_rate": sum(s == 0.5 for s in scores) / n,
               "unread_share": len(unread) / max(1, 2 * len(per)),
               "consistent_share": sum((p["base_first"], p["tuned_first"]) in {("A", "B"), ("B", "A"), ("tie", "tie")}
                                       for p in per) / n}
    return {"summary": summary, "per_sample": per}
