"""Rendering from sources: masks of the new formats, processes, the on-disk cache, prepare()."""

import json
import os
from pathlib import Path

import pytest

from slimtune.config import DataCfg
from slimtune.data.prepare import examples, prepare, render
from slimtune.data.preprocess import render_source, text_examples
from slimtune.data.render import IGNORE, render_chat
from slimtune.data.sources import open_source
from slimtune.data.tools import render_all
from slimtune.errors import DataError


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n):
    return [{"messages": [{"role": "user", "content": f"question {i} " + "word " * (i % 7)},
                          {"role": "assistant", "content": f"answer {i}" + " fox" * (i % 5)}]} for i in range(n)]


def test_prompt_completion_trains_only_the_completion(tmp_path, tokenizer):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "how are you"}]
    p = jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": "fine thank you"}])
    (ex,), _ = examples(render(p, DataCfg(), tokenizer))
    full = prompt + [{"role": "assistant", "content": "fine thank you"}]
    assert (ex["input_ids"], ex["labels"]) == render_chat(full, tokenizer, "last")
    trained = [t for t in ex["labels"] if t != IGNORE]
    assert tokenizer.decode(trained) == "fine thank you<|im_end|>"  # the earlier assistant turn is not trained


def test_raw_text_trains_every_token_plus_eos_and_splits_long_texts(tmp_path, tokenizer):
    text = "the quick brown fox jumps over the lazy dog " * 6
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    pieces = text_examples(text, tokenizer, max_length=16)
    assert [t for p, _ in pieces for t in p] == ids and all(len(p) <= 16 for p, _ in pieces)
    assert all(p == lab for p, lab in pieces)  # every token trained, no chat template
    p = jsonl(tmp_path / "t.jsonl", [{"text": text}, {"text": "hello"}])
    cfg = DataCfg(max_length=16, val_fraction=0.5)
    r = render(p, cfg, tokenizer)
    assert r.format == "text" and len(r.ds) == len(pieces) + 1
    out = prepare(DataCfg(train=p, max_length=16, val_fraction=0.5, general_prompts=None), tokenizer)
    assert out.stats["format"] == "text"
    assert len(out.train) + len(out.val) == len(pieces) + 1  # split by document: pieces stay together
    assert len(out.val) in (1, len(pieces))


def test_two_processes_render_what_one_does_and_the_cache_is_reused(tmp_path, tokenizer):
    p = jsonl(tmp_path / "c.jsonl", chat_rows(40))
    one = render_source(open_source(p), tokenizer, max_length=64, num_proc=1, cache=False)
    two = render_source(open_source(p), tokenizer, max_length=64, num_proc=2)
    assert not two.cached and two.ds.to_dict() == one.ds.to_dict()
    again = render_source(open_source(p), tokenizer, max_length=64, num_proc=1)
    assert again.cached and again.ds.to_dict() == one.ds.to_dict()
    assert not render_source(open_source(p), tokenizer, max_length=32).cached  # other settings: rendered afresh
    jsonl(tmp_path / "c.jsonl", chat_rows(41))  # the content changed
    assert not render_source(open_source(p), tokenizer, max_length=64).cached


def test_a_process_that_renders_second_leaves_the_first_ones_cache_in_place(tmp_path, tokenizer):
    """The ranks of `accelerate launch` may render one file at once: the later finisher must not
    replace the folder the earlier one is reading (it did, and a rank read an empty folder)."""
    from slimtune.data.preprocess import _publish
    p = jsonl(tmp_path / "c.jsonl", chat_rows(12))
    first = render_source(open_source(p), tokenizer, max_length=64)
    final = next(iter(first.ds.cache_files))["filename"]
    inode = os.stat(final).st_ino
    late = tmp_path / "late"
    late.mkdir()
    (late / "rendered.arrow").write_bytes(b"not arrow")
    (late / "done").write_text("{}")
    _publish(late, Path(final).parent)
    assert os.stat(final).st_ino == inode and not late.exists()
    assert render_source(open_source(p), tokenizer, max_length=64).ds.to_dict() == first.ds.to_dict()


def test_prepare_matches_the_in_memory_path(tmp_path, tokenizer):
    from slimtune.data.reader import load_chats
    from slimtune.data.tools import split
    p = jsonl(tmp_path / "c.jsonl", chat_rows(30))
    cfg = DataCfg(train=p, max_length=24, val_fraction=0.2, general_prompts=None)
    out = prepare(cfg, tokenizer, seed=3)
    tr, va = split(load_chats(p), 0.2, 3)
    ref_train, st = render_all(tr, tokenizer, max_length=24)
    assert out.train == ref_train and out.val == render_all(va, tokenizer, max_length=24)[0]
    assert out.stats["train"] == st.summary() and out.stats["format"] == "messages"
    assert prepare(cfg, tokenizer, seed=3).stats["cached"]


def test_a_bad_row_fails_with_its_line_from_any_process(tmp_path, tokenizer):
    rows = chat_rows(20)
    rows[13] = {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}
    p = jsonl(tmp_path / "c.jsonl", rows)
    for n in (1, 2):
        with pytest.raises(DataError, match=r"c.jsonl:14 field 'messages\[1\]\.content': no assistant turn"):
            render_source(open_source(p), tokenizer, num_proc=n)


def test_text_data_trains_packed_by_default(tmp_path, tiny_dir):
    import yaml

    from slimtune.config import build_config
    from slimtune.train.loop import train
    p = jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * (1 + i % 3)}
                                     for i in range(12)])
    out = tmp_path / "run"
    cfg = build_config({}, [f"model.name={tiny_dir}", f"data.train={p}", "data.max_length=32", "data.general_prompts=",
                            "train.max_steps=1", "train.batch_size=4", "train.progress=false", "method.r=4",
                            f"train.output_dir={out}", "eval.max_examples=2"])
    train(cfg, log=lambda *_: None)
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert saved["packing"] is True and json.loads((out / "data_stats.json").read_text())["format"] == "text"


def test_cli_convert_keeps_prompt_completion_and_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slimtune.cli import main
    pq.write_table(pa.Table.from_pylist([{"q": "2+2?", "a": "4"}]), tmp_path / "pc.parquet")
    assert main(["data", "convert", str(tmp_path / "pc.parquet"), "--columns", "prompt=q,completion=a",
                 "--out", str(tmp_path / "pc.jsonl")]) == 0
    assert json.loads((tmp_path / "pc.jsonl").read_text()) == {
        "prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
    jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "world"}])
    assert main(["data", "split", str(tmp_path / "t.jsonl"), "--val", "0.5", "--out-dir", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "val.jsonl").read_text())["text"] in ("hello", "world")
