"""convert / mix / dedupe / split / stats, through the functions and the CLI."""

import json

import pytest

from slimtune.cli import main
from slimtune.data.batching import collate, length_grouped_batches, pack
from slimtune.data.reader import load_chats
from slimtune.data.tools import dedupe, highlight, mix, render_all, split
from slimtune.errors import DataError


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dedupe_exact_and_normalised():
    rows = [chat("Hi there", "Hello!")["messages"], chat("Hi there", "Hello!")["messages"],
            chat("hi,  THERE", "hello")["messages"], chat("Bye", "See you")["messages"]]
    kept, n_exact, n_near = dedupe(rows)
    assert (len(kept), n_exact, n_near) == (2, 1, 1)


def test_mix_weights_shuffle_and_dedupe(tmp_path):
    a = write(tmp_path / "a.jsonl", [chat(f"a{i}", "x") for i in range(10)])
    b = write(tmp_path / "b.jsonl", [chat(f"b{i}", "y") for i in range(10)] + [chat("a0", "x")])
    logs = []
    out = mix([f"{a}:2", f"{b}:0.5"], seed=1, log=logs.append)
    assert len(out) == 20 + 5  # a twice; half of b after the cross-file duplicate is dropped
    assert sum(m[0]["content"].startswith("a") for m in out) == 20
    assert "exact duplicates 1" in logs[1]
    assert out == mix([f"{a}:2", f"{b}:0.5"], seed=1, log=lambda *_: None)  # seeded
    assert out != mix([f"{a}:2", f"{b}:0.5"], seed=2, log=lambda *_: None)


def test_split_is_seeded_and_disjoint():
    chats = [chat(str(i), "x")["messages"] for i in range(50)]
    tr, va = split(chats, 0.1, seed=3)
    assert len(va) == 5 and len(tr) == 45
    assert not {json.dumps(c) for c in tr} & {json.dumps(c) for c in va}
    assert split(chats, 0.1, seed=3) == (tr, va)


def test_render_all_counts_truncated_and_dropped(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ex, st = render_all([long_prompt, short], tokenizer, max_length=32)
    assert (st.examples, st.truncated, st.dropped) == (1, 1, 1)
    with pytest.raises(Exception, match="no trained tokens left"):
        render_all([long_prompt], tokenizer, max_length=32, drop_untrained=False)
    assert "[[hello<|im_end|>]]" in highlight(ex[0], tokenizer)


def test_length_grouping_and_packing_cover_every_example():
    lengths = [5, 50, 7, 48, 6, 52, 9, 47]
    batches = length_grouped_batches(lengths, 2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    spread = max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread <= 5  # similar lengths share a batch
    exs = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in lengths]
    rows = pack(exs, max_length=60)
    assert sum(r["n_examples"] for r in rows) == 8 and all(len(r["input_ids"]) <= 60 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


def test_cli_convert_mix_split_stats(tmp_path, tiny_dir, capsys):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": f"Say {i}", "output": f"{i}"} for i in range(20)]))
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "c.jsonl")]) == 0
    assert len(load_chats(tmp_path / "c.jsonl")) == 20
    assert main(["data", "mix", f"{tmp_path / 'c.jsonl'}:1", "--out", str(tmp_path / "m.jsonl")]) == 0
    assert main(["data", "split", str(tmp_path / "m.jsonl"), "--val", "0.25", "--out-dir", str(tmp_path / "s")]) == 0
    assert len(load_chats(tmp_path / "s" / "val.jsonl")) == 5
    capsys.readouterr()
    assert main(["data", "stats", str(tmp_path / "c.jsonl"), "--model", tiny_dir, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["examples"] == 20 and 0 < stats["trained_fraction"] < 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    assert main(["data", "stats", str(bad), "--model", tiny_dir]) == 2
    assert f"{bad}:1 field 'messages[0].content'" in capsys.readouterr().err


def test_chitchat_in_a_weighted_mix(tmp_path):
    """'chitchat:N' is N conversations; 'chitchat:N:W' gives it a weight; either goes in a mix list."""
    from slimtune.data.prepare import read_chats
    from slimtune.data.tools import parse_weighted

    assert parse_weighted("chitchat:300") == ("chitchat:300", 1.0)
    assert parse_weighted("chitchat:300:2") == ("chitchat:300", 2.0)
    assert parse_weighted("a.jsonl:3") == ("a.jsonl", 3.0)
    with pytest.raises(DataError, match="chitchat:N:W"):
        parse_weighted("chitchat:1:2:3")
    with pytest.raises(DataError, match="not a number"):
        parse_weighted("chitchat:3:x")
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                    {"role": "assistant", "content": f"a{i}"}]})
                           for i in range(5)) + "\n")
    mixed = read_chats(f"{f}:2,chitchat:7:1")
    ours = [c for c in mixed if c[0]["content"].startswith("q") and len(c) == 2 and c[1]["content"][1:].isdigit()]
    assert len(ours) == 10 and len(mixed) == 17
    assert len(read_chats("chitchat:7")) == 7
    key = lambda chats: sorted(json.dumps(c) for c in chats)  # noqa: E731
    assert key(read_chats("chitchat:4,chitchat:4")) == key(read_chats("chitchat:4"))  # deduplicated across sources
