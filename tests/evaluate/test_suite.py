"""`slimtune eval`: every field of the result, computed on a tiny trained run."""

import json

import pytest
from test_run import make_run

from slimtune.config import build_config
from slimtune.errors import SlimtuneError
from slimtune.evaluate.suite import evaluate_run, format_table
from slimtune.evaluate.style import banned_hits, has_code_block, has_heading, has_list, stray_tags, style_metrics
from slimtune.train.loop import train

STYLE_FIELDS = {"answers", "list_share", "heading_share", "code_block_share", "banned_share", "banned_hits",
                "banned_by_phrase", "stray_tag_share", "stray_tags", "mean_tokens", "ended_share", "tokens_per_s",
                "loop_share", "distinct_1", "distinct_2", "longest_repeat_mean", "longest_repeat_max",
                "hit_limit_share"}

pytestmark = pytest.mark.usefixtures("gen_cache")  # base answers cached in a fresh folder per test


def ifeval_file(path):
    rows = [{"id": "a", "prompt": "Say hi in lowercase.", "constraints": [{"type": "lowercase"}]},
            {"id": "b", "prompt": "One word please.", "constraints": [{"type": "words", "max": 1}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_chats(path, n=12):
    rows = [{"messages": [{"role": "user", "content": f"List {i} things"},
                          {"role": "assistant", "content": f"- item {i}\n- another\nAs an AI, done."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_train(tmp_path, base_dir, method="lora"):
    """A real (2-step) run folder from slimtune.train.loop."""
    cfg = build_config({"model": {"name": base_dir},
                        "data": {"train": write_chats(tmp_path / "train.jsonl"), "max_length": 64},
                        "method": {"name": method},
                        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False,
                                  "output_dir": str(tmp_path / f"run-{method}")},
                        "eval": {"max_new_tokens": 4, "max_examples": 4}})
    train(cfg, log=lambda m: None)
    return cfg.train.output_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tiny import save_tiny

    tmp = tmp_path_factory.mktemp("evalrun")
    return tiny_train(tmp, save_tiny(tmp / "base"))


def test_eval_json_has_every_field(trained_run, tmp_path):
    res = evaluate_run(trained_run, max_prompts=3, log=lambda m: None, ifeval=ifeval_file(tmp_path / "if.jsonl"))
    on_disk = json.loads(open(f"{trained_run}/eval.json").read())
    assert on_disk == json.loads(json.dumps(res))
    h = res["heldout"]
    assert h["examples"] >= 1 and h["tokens"] > 0 and "held-out split" in h["data"]
    for side in ("base", "tuned"):
        assert h[side]["loss"] > 0 and h[side]["ppl"] > 1
    assert h["tuned"]["loss"] != h["base"]["loss"]  # lr 1e-2 for 2 steps moves it
    assert h["kl_to_base"] > 0 and h["general_kl"] > 0
    g = res["generation"]
    assert g["n_prompts"] == 3 and g["max_new_tokens"] == 4 and "I'm sorry" in g["banned_phrases"]
    for side in ("base", "tuned"):
        assert set(g[side]) == STYLE_FIELDS
        assert g[side]["answers"] == 3 and 1 <= g[side]["mean_tokens"] <= 4 and g[side]["tokens_per_s"] > 0
    assert len(res["samples"]) == 3 and set(res["samples"][0]) == {"prompt", "base", "tuned"}
    ife = res["ifeval"]
    for side in ("base", "tuned"):
        assert ife[side]["prompts"] == 2 and set(ife[side]["by_type"]) == {"words", "lowercase"}
        assert 0 <= ife[side]["prompt_pass"] <= ife[side]["constraint_pass"] <= 1
    table = format_table(res)
    for label in ("held-out loss", "KL to base, general prompts", "answers with stray template tags",
                  "ended with end-of-turn", "generation tokens/s", "answers caught in a loop", "distinct-2",
                  "IFEval prompts passed", "IFEval: all lowercase (1)"):
        assert label in table
    # eval_samples.jsonl: one row per prompt (3 eval + 2 IFEval) with both answers and their metrics,
    # the same answers as eval.json's samples and the same pass rates recomputed from the rows
    rows = [json.loads(x) for x in open(f"{trained_run}/eval_samples.jsonl")]
    assert [r["set"] for r in rows] == ["eval"] * 3 + ["ifeval"] * 2
    assert [r["tuned"]["text"] for r in rows[:3]] == [s["tuned"] for s in res["samples"]]
    assert {"loop", "distinct_1", "longest_repeat", "hit_limit", "list", "banned", "n_tokens"} <= set(rows[0]["base"])
    for side in ("base", "tuned"):
        oks = [ok for r in rows[3:] for ok in r[side]["ifeval_pass"]]
        assert sum(oks) / len(oks) == ife[side]["constraint_pass"]
        assert g[side]["hit_limit_share"] == sum(r[side]["hit_limit"] for r in rows[:3]) / 3


def test_second_eval_reads_base_answers_from_the_cache(trained_run, tmp_path, monkeypatch):
    first = evaluate_run(trained_run, max_prompts=2, out=str(tmp_path / "a.json"), log=lambda m: None, ifeval="")
    assert not first["generation"]["base_cached"]
    from slimtune.evaluate import base_vs_tuned

    calls = []
    real = base_vs_tuned.generate_many
    monkeypatch.setattr(base_vs_tuned, "generate_many",
                        lambda m, t, chats, *a, **k: calls.append(len(chats)) or real(m, t, chats, *a, **k))
    again = evaluate_run(trained_run, max_prompts=2, out=str(tmp_path / "b.json"), log=lambda m: None, ifeval="")
    assert again["generation"]["base_cached"] and calls == [2]  # only the tuned side was generated
    assert again["generation"]["base"]["tokens_per_s"] is None and again["generation"]["tuned"]["tokens_per_s"] > 0
    assert again["samples"] == first["samples"] and again["heldout"] == first["heldout"]
    other = evaluate_run(trained_run, max_prompts=2, out=str(tmp_path / "c.json"), log=lambda m: None, ifeval="",
                         repetition_penalty=1.5)
    assert not other["generation"]["base_cached"] and other["generation"]["repetition_penalty"] == 1.5


def test_held_out_numbers_from_training_equal_a_new_measurement(tmp_path, tiny_dir, monkeypatch):
    """Training's final evaluation stands in for eval's held-out pass only while the weights are the
    ones it measured; the numbers equal measuring again (merged vs unmerged: float rounding)."""
    from safetensors.torch import load_file, save_file

    run = tiny_train(tmp_path, tiny_dir)
    summary = json.loads(open(f"{run}/summary.json").read())
    kw = dict(max_prompts=1, log=lambda m: None, ifeval="")
    reused = evaluate_run(run, out=str(tmp_path / "a.json"), **kw)["heldout"]
    fresh = evaluate_run(run, out=str(tmp_path / "b.json"), reuse=False, **kw)["heldout"]
    assert reused["from_training"]["weights_sha256"] == summary["final_eval"]["weights_sha256"]
    assert "from_training" not in fresh and reused["tokens"] == fresh["tokens"]
    assert reused["tuned"]["loss"] == summary["after"]["eval_loss"] and reused["tuned"]["loss"] != fresh["base"]["loss"]
    for got, want in [(reused["tuned"]["loss"], fresh["tuned"]["loss"]), (reused["base"]["loss"], fresh["base"]["loss"]),
                      (reused["kl_to_base"], fresh["kl_to_base"]), (reused["general_kl"], fresh["general_kl"])]:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    # other weights in the run folder (say, a checkpoint copied over it): measured again, and they differ
    path = f"{run}/adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: v * 2 if "lora_B" in k else v for k, v in weights.items()}, path)
    changed = evaluate_run(run, out=str(tmp_path / "c.json"), **kw)["heldout"]
    assert "from_training" not in changed and changed["kl_to_base"] > 1.5 * fresh["kl_to_base"]
    assert changed["base"]["loss"] == pytest.approx(fresh["base"]["loss"], rel=1e-5)
    # the weights training measured, but no base states on disk (a cleared cache): measured again
    save_file(weights, path)
    monkeypatch.setenv("SLIMTUNE_STATES_CACHE", str(tmp_path / "empty-states"))
    again = evaluate_run(run, out=str(tmp_path / "d.json"), **kw)["heldout"]
    assert "from_training" not in again
    assert again["base"]["loss"] == pytest.approx(fresh["base"]["loss"], rel=1e-5)
    assert again["kl_to_base"] == pytest.approx(fresh["kl_to_base"], rel=1e-4)


def test_eval_with_own_data_and_prompts(trained_run, tmp_path):
    """Also: an empty --ifeval skips it, and --out names the samples file after it."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi\nSay bye\n")
    out = tmp_path / "e.json"
    res = evaluate_run(trained_run, data=write_chats(tmp_path / "val.jsonl", 3), prompts=str(prompts),
                       out=str(out), max_new_tokens=2, max_examples=4, log=lambda m: None, ifeval="")
    assert out.exists() and res["heldout"]["examples"] == 3 and res["generation"]["n_prompts"] == 2
    assert res["ifeval"] is None and len(open(tmp_path / "e_samples.jsonl").readlines()) == 2
    assert [s["prompt"] for s in res["samples"]] == ["Say hi", "Say bye"]


@pytest.mark.parametrize("method", ["prompt_tuning", "full"])
def test_eval_of_other_methods(tmp_path, tiny_dir, method):
    """Soft prompts (base = adapter off) and full fine-tuning (base = a second model)."""
    res = evaluate_run(make_run(tmp_path, tiny_dir, method, scale=0.05), data=write_chats(tmp_path / "v.jsonl", 2),
                       max_prompts=1, max_new_tokens=2, max_examples=4, log=lambda m: None, ifeval="")
    h = res["heldout"]
    assert h["kl_to_base"] > 0 and h["base"]["loss"] != h["tuned"]["loss"]
    assert res["generation"]["tuned"]["answers"] == 1


def test_style_metrics():
    answers = [
        {"text": "# Title\n- a\n- b\n```py\nx = 1\n```", "n_tokens": 20, "ended": True, "seconds": 1.0},
        {"text": "As an AI, I'm sorry.<|im_end|>\n<|im_start|>user\nhi", "n_tokens": 10, "ended": False, "seconds": 1.0},
        {"text": "1. one\nUser: next question", "n_tokens": 6, "ended": True, "seconds": 1.0},
        {"text": "Plain. [INST] as an ai", "n_tokens": 4, "ended": True, "seconds": 1.0},
    ]
    m = style_metrics(answers, ["As an AI", "I'm sorry"])
    assert m["list_share"] == 0.5 and m["heading_share"] == 0.25 and m["code_block_share"] == 0.25
    assert m["banned_share"] == 0.5 and m["banned_hits"] == 3 and m["banned_by_phrase"] == {"As an AI": 2, "I'm sorry": 1}
    assert m["stray_tag_share"] == 0.75 and m["stray_tags"]["<|im_start|>"] == 1
    assert m["mean_tokens"] == 10 and m["ended_share"] == 0.75 and m["tokens_per_s"] == 10
    # answers read from the cache took no time now: throughput counts the generated ones only
    answers[0]["cached"] = True
    assert style_metrics(answers)["tokens_per_s"] == 20 / 3 and style_metrics(answers)["mean_tokens"] == 10
    assert style_metrics([dict(a, cached=True) for a in answers])["tokens_per_s"] is None
    assert has_list("2) two") and not has_list("**bold**") and has_heading("Title\n=====")
    assert not has_code_block("```never closed") and banned_hits("I CANNOT", ["I cannot"]) == {"I cannot": 1}
    assert stray_tags("assistant\nHello") == ["assistant"] and stray_tags("The user: asked") == []
    assert style_metrics([]) == {"answers": 0}


def test_eval_with_a_judge(trained_run, tmp_path):
    """--judge: every prompt judged in both orders by a local fake server that always says "B"."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = []

    class AlwaysB(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            out = json.dumps({"choices": [{"message": {"content": "B"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), AlwaysB)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        res = evaluate_run(trained_run, max_prompts=2, out=str(tmp_path / "j.json"), log=lambda m: None, ifeval="",
                           judge=f"http://127.0.0.1:{srv.server_port}", judge_model="fake")
    finally:
        srv.shutdown()
        srv.server_close()
    assert len(seen) == 4 and res["judge"]["samples"] == 2 and res["judge"]["tuned_win_rate"] == 0.5
    assert "judge prefers" in format_table(res)
    rows = [json.loads(x) for x in open(tmp_path / "j_samples.jsonl")]
    assert [r["judge"] for r in rows] == [{"base_first": "B", "tuned_first": "B", "tuned_score": 0.5}] * 2
    with pytest.raises(SlimtuneError, match="--judge-model"):
        evaluate_run(trained_run, judge="http://127.0.0.1:9", log=lambda m: None)
