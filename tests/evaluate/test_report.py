"""`slimtune report` and `slimtune compare`: plots, one self-contained HTML page, side-by-side samples."""

import json
import re

import pytest
from test_suite import tiny_train

from slimtune.evaluate.compare import compare_runs, to_markdown, to_terminal
from slimtune.errors import SlimtuneError
from slimtune.evaluate.report import make_report


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tiny import save_tiny

    tmp = tmp_path_factory.mktemp("report")
    return tiny_train(tmp, save_tiny(tmp / "base"))


def test_report_is_self_contained(run, gen_cache):
    import html

    from slimtune.data.prompts import load_prompts
    from slimtune.generate import generate
    from slimtune.methods import adapters_disabled
    from slimtune.runfolder import load_run

    path = make_report(run, samples=1, max_new_tokens=8, log=lambda m: None)
    page = path.read_text()
    model, tok, _ = load_run(run)  # the sample the report must show: the same prompt answered one at a time
    chat = load_prompts("builtin:eval_prompts", 1)[0]
    tuned = generate(model, tok, chat, 8)["text"]
    with adapters_disabled(model):
        base = generate(model, tok, chat, 8)["text"]
    assert tuned != base
    assert f"<h4>base</h4><pre>{html.escape(base)}</pre>" in page  # generated answers, escaped
    assert f"<h4>tuned</h4><pre>{html.escape(tuned)}</pre>" in page
    for stem in ("loss", "kl", "lr", "throughput"):
        assert (path.parent / "plots" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert page.count("src='data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing loaded from elsewhere
    assert "Hi! How&#x27;s your day going?" in page  # the prompt, escaped
    assert "held-out loss" in page and "config.yaml" in page and "method:" in page


def test_compare_then_report_uses_its_samples(run, tmp_path, gen_cache):
    res = compare_runs([run, run], max_prompts=1, max_new_tokens=3, log=lambda m: None)
    base, a, b = res["columns"]
    assert base.startswith("base") and a.endswith("#1") and b.endswith("#2")  # the same run twice
    row = res["rows"][0]
    assert set(row) == {"prompt", "greedy", "sampled"} and row["greedy"][a] == row["greedy"][b]
    assert row["sampled"][a] == row["sampled"][b]  # same seed per prompt for every model
    md = open(f"{run}/compare.md").read()
    assert md == to_markdown(res) and md.count("| base") == 2 and "sampled (temperature 0.7" in md
    assert json.loads(open(f"{run}/compare.json").read())["columns"] == res["columns"]
    term = to_terminal(res, width=90)
    assert max(map(len, term.splitlines())) <= 90 and "-- greedy" in term
    page = make_report(run, log=lambda m: None).read_text()
    assert "From compare.json" in page and "<summary>sampled</summary>" in page


def test_report_needs_a_run(tmp_path):
    with pytest.raises(SlimtuneError, match="not a run folder"):
        make_report(str(tmp_path))
