"""Every kind of source reads the same chats, or fails with one line that names the place."""

import gzip
import json

import pytest

from slimtune.cli import main
from slimtune.data.reader import load_chats
from slimtune.data.sources import open_source
from slimtune.errors import DataError

ROWS = [{"instruction": f"Say {w}", "output": f"{w}!"} for w in ("hi", "bye", "yes")]
CHATS = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}] for r in ROWS]


def jsonl_bytes(rows=ROWS) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def write_parquet(path, rows=ROWS):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_source(tmp_path, kind):
    """The same three rows as each kind of source."""
    import datasets
    import pandas as pd
    import pyarrow as pa
    import pyarrow.feather as feather
    p = tmp_path / {"jsonl": "d.jsonl", "json": "d.json", "gz": "d.jsonl.gz", "zst": "d.jsonl.zst", "bom": "d.jsonl",
                    "parquet": "d.parquet", "csv": "d.csv", "arrow": "d.arrow", "feather": "f.arrow",
                    "disk": "ds", "diskdict": "dd", "shards": "shards", "pattern": "shards/*.parquet"}[kind]
    if kind == "jsonl":
        p.write_bytes(jsonl_bytes())
    elif kind == "json":
        p.write_text(json.dumps(ROWS))
    elif kind == "gz":
        p.write_bytes(gzip.compress(jsonl_bytes()))
    elif kind == "zst":
        import zstandard
        p.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes()))
    elif kind == "bom":
        p.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes())
    elif kind == "parquet":
        write_parquet(p)
    elif kind == "csv":
        pd.DataFrame(ROWS).to_csv(p, index=False)
    elif kind == "arrow":  # the Arrow stream format `datasets` writes
        datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "tmp")
        p.write_bytes(next((tmp_path / "tmp").glob("*.arrow")).read_bytes())
    elif kind == "feather":
        feather.write_feather(pa.Table.from_pylist(ROWS), p)
    elif kind == "disk":
        datasets.Dataset.from_list(ROWS).save_to_disk(p)
    elif kind in ("shards", "pattern"):  # a Hub-style snapshot: train split in two parquet shards
        write_shards(tmp_path / "shards", "parquet", {"data/train-00000-of-00002.parquet": ROWS[:1],
                                                      "data/train-00001-of-00002.parquet": ROWS[1:]})
        return tmp_path / "shards" if kind == "shards" else f"{tmp_path}/shards/data/*.parquet"
    elif kind == "diskdict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                              "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(p)
    return p


@pytest.mark.parametrize("kind", ["jsonl", "json", "gz", "zst", "bom", "parquet", "csv", "arrow", "feather",
                                  "disk", "diskdict", "shards", "pattern"])
def test_every_source_reads_the_same_chats(tmp_path, kind):
    p = write_source(tmp_path, kind)
    split = "test" if kind == "diskdict" else None
    assert load_chats(p, split=split) == CHATS
    assert load_chats(p, split=split) == CHATS  # again, from the cache


def test_dataset_dict_folder_names_its_splits(tmp_path):
    p = write_source(tmp_path, "diskdict")
    assert len(load_chats(p)) == 1  # train by default
    with pytest.raises(DataError, match="no split 'validation'.*train, test"):
        load_chats(p, split="validation")


def test_nested_messages_in_parquet_lose_arrow_nulls(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "name": "x"}]},
            {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    src = open_source(str(write_parquet(tmp_path / "m.parquet", rows)))
    assert [r for _, r in src.rows()][1] == rows[1]  # Arrow gave row 2 a null 'name': dropped
    assert load_chats(src.name)[1][1] == {"role": "assistant", "content": "d"}


def test_jsonl_line_numbers_survive_blank_lines_and_compression(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress(b"\n" + jsonl_bytes(ROWS[:1]) + b"\n" + b'{"instruction": "x", "output": ""}\n'))
    with pytest.raises(DataError) as e:
        load_chats(p)
    assert str(e.value).startswith(f"{p}:4 field 'output'")


def test_non_utf8_text_is_refused_naming_line_and_encoding(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(jsonl_bytes(ROWS[:1]) + json.dumps({"instruction": "Café crème", "output": "très bien"},
                                                     ensure_ascii=False).encode("cp1252") + b"\n")
    with pytest.raises(DataError) as e:
        load_chats(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: not UTF-8") and "iconv" in msg and "\n" not in msg
    assert any(enc in msg for enc in ("CP1252", "LATIN", "ISO-8859", "CP125"))


def test_utf16_file_is_refused(tmp_path):
    p = tmp_path / "u16.jsonl"
    p.write_bytes(jsonl_bytes().decode().encode("utf-16"))
    with pytest.raises(DataError, match=r":1: the file is UTF-16"):
        load_chats(p)


@pytest.mark.parametrize("contents, holds", [
    ({"a.txt": "x", "b.txt": "y", "sub/c.md": "z"}, "2 .txt files, 1 folder (sub)"),
    ({}, "nothing (it is empty)"),
])
def test_folder_that_is_not_a_dataset_says_what_it_holds(tmp_path, contents, holds):
    folder = tmp_path / "notes"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    with pytest.raises(DataError, match="not a dataset folder") as e:
        load_chats(folder)
    assert holds in str(e.value)


def test_unknown_and_damaged_files_fail_in_one_line(tmp_path):
    (tmp_path / "d.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="cannot read '.xlsx' files; give .jsonl"):
        load_chats(tmp_path / "d.xlsx")
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read it as parquet") as e:
        load_chats(tmp_path / "bad.parquet")
    assert "\n" not in str(e.value)


def test_hub_source_offline_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_chats("hf:someone/some-set", split="validation", subset="en")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE is set" in msg and "save_to_disk" in msg and "'en'" in msg and "validation" in msg


@pytest.mark.parametrize("kind", ["parquet", "csv", "disk", "bom", "shards", "pattern"])
def test_cli_stats_reads_every_source_and_names_format(tmp_path, tiny_dir, capsys, kind):
    p = write_source(tmp_path, kind)
    assert main(["data", "stats", str(p), "--model", tiny_dir]) == 0
    out = capsys.readouterr().out
    assert "format            alpaca (detected)" in out and "examples          3" in out


@pytest.mark.parametrize("make, match", [
    (lambda d: (d / "x.jsonl").write_bytes("{\"a\": \"é\"}\n".encode("cp1252")) and d / "x.jsonl", "not UTF-8"),
    (lambda d: (d / "dir").mkdir() or d / "dir", "not a dataset folder"),
    (lambda d: (d / "y.parquet").write_bytes(b"nope") and d / "y.parquet", "cannot read it as parquet"),
])
def test_cli_bad_paths_end_in_one_line_not_a_traceback(tmp_path, tiny_dir, capsys, make, match):
    assert main(["data", "stats", str(make(tmp_path)), "--model", tiny_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimtune: error: ") and match in err and err.count("\n") == 1


# --- several files as one source: patterns and folders of shards


def write_shards(folder, kind, parts):
    """parts: {relative name: rows}; written as JSONL or parquet."""
    for name, rows in parts.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(p, rows) if kind == "parquet" else p.write_bytes(jsonl_bytes(rows))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_pattern_and_a_folder_of_shards_read_every_file_in_name_order(tmp_path, kind):
    write_shards(tmp_path / "shards", kind, {f"part-0000{i}.{kind}": [r] for i, r in
                                             zip((2, 0, 1), (ROWS[2], ROWS[0], ROWS[1]))})
    (tmp_path / "shards" / "dataset_info.json").write_text('{"features": {}}')  # metadata beside the rows
    assert load_chats(tmp_path / "shards") == CHATS
    assert load_chats(f"{tmp_path}/shards/part-*.{kind}") == CHATS
    assert load_chats(f"{tmp_path}/**/*.{kind}") == CHATS
    assert load_chats(f"{tmp_path}/shards/part-0000[01].{kind}") == CHATS[:2]


def test_a_hub_snapshot_folder_reads_the_split_its_file_names_carry(tmp_path):
    snap = tmp_path / "snapshot"
    write_shards(snap, "parquet", {"data/train-00000-of-00002.parquet": ROWS[:2],
                                   "data/train-00001-of-00002.parquet": ROWS[2:],
                                   "data/test-00000-of-00001.parquet": ROWS[:1]})
    (snap / "README.md").write_text("---\nlicense: mit\n---\n")
    (snap / ".cache").mkdir()
    write_parquet(snap / ".cache" / "stale.parquet", ROWS[:1])  # hidden folders are not data
    assert load_chats(snap) == CHATS
    assert load_chats(snap, split="test") == CHATS[:1]
    with pytest.raises(DataError, match="no 'validation' files here.*test, train"):
        load_chats(snap, split="validation")


def test_a_bad_row_in_a_shard_names_that_file_and_its_own_line(tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder, "jsonl", {"a.jsonl": ROWS, "b.jsonl": ROWS[:1]})
    (folder / "b.jsonl").write_text(jsonl_bytes(ROWS[:1]).decode() + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError) as e:
        load_chats(folder, fmt="alpaca")
    assert e.value.path == str(folder / "b.jsonl") and e.value.line == 3  # the blank line 2 counts
    assert str(e.value).startswith(f"{folder / 'b.jsonl'}:3")
    write_shards(folder, "parquet", {"c/x.parquet": [{"prompt": "a", "completion": "b"}, {"prompt": "c"}]})
    with pytest.raises(DataError) as e:
        load_chats(f"{folder}/**/*.parquet", fmt="prompt_completion")
    assert (e.value.path, e.value.line, e.value.field) == (str(folder / "c" / "x.parquet"), 2, "completion")


@pytest.mark.parametrize("make, match", [
    (lambda d: write_shards(d, "jsonl", {"a.jsonl": ROWS}) or write_shards(d, "parquet", {"b.parquet": ROWS}),
     "mixes json and parquet files; point at one kind"),
    (lambda d: write_shards(d, "parquet", {"a.parquet": ROWS, "b.parquet": [{"prompt": "p", "completion": "c"}]}),
     r"b\.parquet: its columns \(prompt, completion\) differ"),
])
def test_shards_that_do_not_fit_together_fail_in_one_line(tmp_path, make, match):
    make(tmp_path / "s")
    with pytest.raises(DataError, match=match):
        load_chats(tmp_path / "s")


def test_a_pattern_that_matches_nothing_and_a_home_path(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no data file matches this pattern"):
        load_chats(f"{tmp_path}/*.jsonl")
    (tmp_path / "data[1].jsonl").write_bytes(jsonl_bytes())  # a name with pattern characters, as it is
    assert load_chats(f"{tmp_path}/data[1].jsonl") == CHATS
    (tmp_path / "data[1].jsonl").unlink()
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d.jsonl").write_bytes(jsonl_bytes())
    assert load_chats("~/d.jsonl") == CHATS
    assert load_chats("~/*.jsonl") == CHATS


def test_cli_a_pattern_the_shell_expanded_says_to_quote_it(tmp_path, tiny_dir, capsys):
    write_shards(tmp_path, "jsonl", {"a.jsonl": ROWS, "b.jsonl": ROWS})
    with pytest.raises(SystemExit) as e:
        main(["data", "stats", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--model", tiny_dir])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the shell expanded a pattern; quote it" in err and err.count("\n") == 1
    assert main(["data", "stats", f"{tmp_path}/*.jsonl", "--model", tiny_dir]) == 0
    assert "examples          6" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # anything else unknown: argparse's own message
        main(["data", "stats", str(tmp_path / "a.jsonl"), "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_a_snapshot_with_one_folder_per_subset_reads_the_one_data_subset_names(tmp_path):
    snap = tmp_path / "snap"
    write_shards(snap, "jsonl", {"en/train.jsonl": ROWS, "en/test.jsonl": ROWS[:1], "fr/train.jsonl": ROWS[:2]})
    assert load_chats(snap, subset="en") == CHATS
    assert load_chats(snap, subset="fr") == CHATS[:2]
    assert load_chats(snap, subset="en", split="test") == CHATS[:1]
    with pytest.raises(DataError, match="no sub-folder 'de' .*its sub-folders: en, fr"):
        load_chats(snap, subset="de")
