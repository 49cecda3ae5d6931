"""The pairwise judge against a fake OpenAI-compatible server on 127.0.0.1 (no network)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from slimtune.errors import SlimtuneError
from slimtune.evaluate.judge import endpoint, judge_pairs, verdict


class FakeJudge(BaseHTTPRequestHandler):
    """Prefers the answer containing 'good'; with `biased`, always says A (a position-biased judge)."""

    biased = False
    busy = 0  # answer HTTP 429 this many times first
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        user = body["messages"][-1]["content"]
        a = user.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
        b = user.split("[Answer B]\n", 1)[1].split("\n\nWhich answer", 1)[0]
        verdict = "A" if self.biased else "A" if "good" in a and "good" not in b else \
            "B" if "good" in b and "good" not in a else "tie"
        status, content = 200, f"{verdict}."
        if "think" in user:  # a reasoning judge: its block names both answers before the verdict
            content = f"<think>Answer A says one thing, B another; A is short.</think>\n\n{verdict}"
        if "vague" in user:
            content = "A better answer is B"  # names both: no verdict
        if "busy" in user and type(self).busy > 0:
            type(self).busy -= 1
            status = 429
        if "down" in user:
            status = 503
        out = b'{"nothing": 1}' if "broken" in user else \
            json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(status)
        if status != 200:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeJudge.requests, FakeJudge.biased, FakeJudge.busy = [], False, 0
    srv = HTTPServer(("127.0.0.1", 0), FakeJudge)
    srv.timeout = 5
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()
    t.join(5)


ROWS = [{"prompt": "p1", "base": {"text": "meh"}, "tuned": {"text": "a good answer"}},
        {"prompt": "p2", "base": "good base", "tuned": "bad tuned"},
        {"prompt": "p3", "base": "same", "tuned": "same"}]


def test_both_orders_and_scores(server):
    res = judge_pairs(server, "fake-judge", ROWS, timeout=5)
    assert [p["tuned_score"] for p in res["per_sample"]] == [1.0, 0.0, 0.5]
    assert res["per_sample"][0] == {"base_first": "B", "tuned_first": "A", "tuned_score": 1.0}
    s = res["summary"]
    assert s["samples"] == 3 and s["tuned_win_rate"] == 0.5 and s["base_win_rate"] == 0.5
    assert s["tuned_wins"] == 1 and s["base_wins"] == 1 and s["tie_rate"] == 1 / 3 and s["consistent_share"] == 1.0
    assert len(FakeJudge.requests) == 6 and all(p == "/v1/chat/completions" for p, _ in FakeJudge.requests)
    path, body = FakeJudge.requests[0]
    assert body["model"] == "fake-judge" and body["temperature"] == 0
    assert "[Answer A]\nmeh" in body["messages"][1]["content"]          # base first ...
    assert "[Answer A]\na good answer" in FakeJudge.requests[1][1]["messages"][1]["content"]  # ... then swapped


def test_position_bias_cancels(server):
    FakeJudge.biased = True  # always "A": each side wins once, so every sample is a draw
    res = judge_pairs(server + "/v1", "j", ROWS[:2], timeout=5)
    assert [p["tuned_score"] for p in res["per_sample"]] == [0.5, 0.5]
    assert res["summary"]["consistent_share"] == 0.0


def test_errors_are_one_line(server):
    with pytest.raises(SlimtuneError, match="did not answer with a chat completion"):
        judge_pairs(server, "j", [{"prompt": "broken", "base": "a", "tuned": "b"}], timeout=5)
    with pytest.raises(SlimtuneError, match="cannot reach the judge"):
        judge_pairs("http://127.0.0.1:9", "j", ROWS[:1], timeout=2)
    with pytest.raises(SlimtuneError, match="--judge-model"):
        judge_pairs(server, None, ROWS)


def test_endpoint_forms():
    full = "http://h:1/v1/chat/completions"
    assert endpoint("http://h:1") == endpoint("http://h:1/") == endpoint("http://h:1/v1") == endpoint(full) == full


def test_reasoning_blocks_are_skipped_and_replies_without_a_verdict_are_counted(server):
    rows = [{"prompt": "think p1", "base": "meh", "tuned": "a good answer"},
            {"prompt": "vague p2", "base": "x", "tuned": "y"}]
    logs = []
    res = judge_pairs(server, "j", rows, log=logs.append, timeout=5)
    assert res["per_sample"][0] == {"base_first": "B", "tuned_first": "A", "tuned_score": 1.0}
    vague = res["per_sample"][1]
    assert (vague["base_first"], vague["tuned_first"], vague["tuned_score"]) == (None, None, 0.5)
    assert vague["unread_replies"] == ["A better answer is B"] * 2
    assert res["summary"]["unread_share"] == 0.5 and "2 of 4 replies named no verdict" in logs[-1]


@pytest.mark.parametrize("reply, want", [("B", "B"), ("[[A]]", "A"), ("Tie.", "tie"), ("Answer B is better.", "B"),
                                         ("I prefer B: it is clearer.", "B"), ("<think>A or B?</think>A", "A"),
                                         ("<think>A is long, B is", None), ("A better answer is B", None), ("", None)])
def test_verdict_reading(reply, want):
    assert verdict(reply) == want


def test_rate_limits_are_retried_and_a_server_that_stays_down_says_so(server):
    FakeJudge.busy = 3
    res = judge_pairs(server, "j", [{"prompt": "busy", "base": "meh", "tuned": "good"}], timeout=5)
    assert res["per_sample"][0]["tuned_score"] == 1.0 and len(FakeJudge.requests) == 5  # 3 refused + 2
    with pytest.raises(SlimtuneError, match="HTTP 503.*after 4 retries"):
        judge_pairs(server, "j", [{"prompt": "down", "base": "a", "tuned": "b"}], timeout=5)
