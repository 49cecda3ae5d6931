"""The stored teacher: written shards read back equal the teacher's own logits, a killed write
resumes to the same bytes, other keys are refused, the vocabulary check names the first difference."""

import json

import pytest
import torch
from tiny import make_model, make_tokenizer

from slimtune.data.batching import collate
from slimtune.data.render import render_chat
from slimtune.errors import ConfigError, DataError
from slimtune.losses.distill import topk_distill_loss
from slimtune.teacher import (
    MANIFEST,
    check_vocab,
    hash_rows,
    hash_teacher,
    read_teacher_logprobs,
    write_teacher_logprobs,
)
from slimtune.train.forward import hidden_states, output_layer

CHATS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how are you today?"}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are Tiny."}, {"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
     {"role": "user", "content": "Another"}, {"role": "assistant", "content": "1. First item"}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"}],
    [{"role": "user", "content": "Summarise this text in one sentence."},
     {"role": "assistant", "content": "Translate to French: bonjour."}],
]
KW = dict(top_k=5, temperature=2.0, shard_rows=2, batch_size=2)  # shards of 2 rows, padded batches


@pytest.fixture(scope="module")
def rows(tokenizer):
    out = [dict(zip(("input_ids", "labels"), render_chat(c, tokenizer))) for c in CHATS]
    out.append({"input_ids": out[0]["input_ids"], "labels": [-100] * len(out[0]["labels"])})  # none trained
    return out


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return make_model(tokenizer, hidden=48, seed=1)


def _write(rows, model, out, data="d" * 32, teacher_key="t" * 32, **kw):
    return write_teacher_logprobs(rows, model, out, data_hash=data, teacher_hash=teacher_key, **{**KW, **kw})


def _direct(model, row, k, tau):
    """The teacher's own full logits for one unpadded row, at its trained positions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
    sel = torch.tensor(row["labels"][1:]) != -100
    return logits[sel].double().div(tau).log_softmax(-1).topk(k, -1)


def test_store_reads_back_the_teachers_logits(rows, teacher, tmp_path):
    manifest = _write(rows, teacher, tmp_path)
    assert manifest["rows_done"] == manifest["rows"] == len(rows)
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    store = read_teacher_logprobs(tmp_path, rows, data_hash="d" * 32)
    assert len(store) == len(rows) and store.top_k == 5 and store.temperature == 2.0
    for i, row in enumerate(rows):
        ids, logps = store[i]
        top = _direct(teacher, row, 5, 2.0)
        assert ids.dtype == torch.long and logps.dtype == torch.float32
        assert ids.shape == logps.shape == (sum(lab != -100 for lab in row["labels"][1:]), 5)
        assert torch.equal(ids, top.indices)
        torch.testing.assert_close(logps.double(), top.values, atol=1e-5, rtol=1e-5)
    assert store[len(rows) - 1][0].shape == (0, 5)
    assert not teacher.training


def test_killed_write_resumes_to_the_same_store(rows, teacher, tmp_path):
    _write(rows, teacher, tmp_path / "whole", batch_size=1)
    calls = []

    def die_on_third(_module, _args):
        calls.append(1)
        if len(calls) == 3:  # shard 0 (2 rows, one batch) is done; shard 1 dies mid-way
            raise KeyboardInterrupt

    handle = teacher.register_forward_pre_hook(die_on_third)
    try:
        with pytest.raises(KeyboardInterrupt):
            _write(rows, teacher, tmp_path / "part", batch_size=1)
    finally:
        handle.remove()
    part = json.loads((tmp_path / "part" / MANIFEST).read_text())
    assert part["rows_done"] == 2 and [s["file"] for s in part["shards"]] == ["shard-00000.arrow"]
    with pytest.raises(DataError, match="unfinished: 2 of 6 rows"):
        read_teacher_logprobs(tmp_path / "part", rows)

    counted = []
    handle = teacher.register_forward_pre_hook(lambda *_: counted.append(1))
    try:
        _write(rows, teacher, tmp_path / "part", batch_size=1)
    finally:
        handle.remove()
    assert len(counted) == len(rows) - 2  # the finished shard is not recomputed
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "part").iterdir())
    for name in names:
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_shard_written_before_its_manifest_is_rewritten_identically(rows, teacher, tmp_path):
    """Killed between a shard's rename and the manifest's: that shard is not listed, so it is written
    again, byte for byte; a leftover temporary file is removed."""
    _write(rows, teacher, tmp_path / "whole")
    _write(rows, teacher, tmp_path / "store")
    path = tmp_path / "store" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["shards"], manifest["rows_done"] = manifest["shards"][:1], 2
    path.write_text(json.dumps(manifest))
    (tmp_path / "store" / "shard-00002.arrow").unlink()
    (tmp_path / "store" / ".shard-00002.arrow.x1.tmp").write_bytes(b"half")
    _write(rows, teacher, tmp_path / "store")
    names = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for name in names:
        assert (tmp_path / "store" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize("change,field", [
    (dict(data="e" * 32), "data_hash"), (dict(teacher_key="u" * 32), "teacher_hash"),
    (dict(top_k=4), "top_k"), (dict(temperature=1.0), "temperature"), (dict(shard_rows=3), "shard_rows"),
])
def test_other_key_is_refused(rows, teacher, tmp_path, change, field):
    _write(rows[:2], teacher, tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=f"{field} .* there, .* now.*Write to a new folder, or delete this one"):
        _write(rows[:2], teacher, tmp_path, **change)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before  # untouched


def test_store_that_does_not_match_the_data(rows, teacher, tmp_path):
    _write(rows, teacher, tmp_path)
    with pytest.raises(DataError, match="written for 6 rows, the data has 5"):
        read_teacher_logprobs(tmp_path, rows[:5])
    with pytest.raises(DataError, match="this data is"):
        read_teacher_logprobs(tmp_path, rows, data_hash="x" * 32)
    other = [dict(r) for r in rows]
    labels = list(rows[3]["labels"])
    labels[next(t for t in range(1, len(labels)) if labels[t] != -100)] = -100  # one fewer trained
    other[3] = {**rows[3], "labels": labels}
    with pytest.raises(DataError, match="row 3 has .* trained positions, the store"):
        read_teacher_logprobs(tmp_path, other)
    with pytest.raises(DataError, match="not a teacher log-probs folder"):
        read_teacher_logprobs(tmp_path / "nothing", rows)


def test_store_lines_up_with_the_training_batch(rows, teacher, tmp_path):
    """The store's rows, concatenated in batch order, line up with forward.py's selected hidden
    states: a student equal to its teacher, with all V ids stored, is at KL 0 (shifted by one it is not)."""
    v = teacher.config.vocab_size
    _write(rows, teacher, tmp_path, top_k=v, temperature=1.0)
    store = read_teacher_logprobs(tmp_path, rows)
    order = [2, 0, 5, 4]
    batch = collate([rows[i] for i in order], pad_id=0)
    with torch.no_grad():
        h = hidden_states(teacher, batch)[:, :-1][batch["labels"][:, 1:] != -100]
    ids = torch.cat([store[i][0] for i in order])
    logps = torch.cat([store[i][1] for i in order])
    head = output_layer(teacher)
    targets = torch.zeros(h.shape[0], dtype=torch.long)
    out = topk_distill_loss(h, head.weight, targets, ids, logps, alpha=0.0, chunk_size=7)
    assert h.shape[0] == ids.shape[0] > 10 and float(out.kl_sum) < 1e-4
    shifted = topk_distill_loss(h, head.weight, targets, ids.roll(1, 0), logps.roll(1, 0), alpha=0.0)
    assert float(shifted.kl_sum) > 100 * float(out.kl_sum) + 1e-2


def test_check_vocab_names_the_first_differing_token():
    chatml, llama3 = make_tokenizer("chatml"), make_tokenizer("llama3")
    check_vocab(chatml, make_tokenizer("chatml"))  # the same vocabulary: no error
    with pytest.raises(ConfigError, match=r"token id 0: student '<\|im_start\|>', teacher '<\|begin_of_text\|>'"):
        check_vocab(chatml, llama3)
    longer = make_tokenizer("chatml")
    longer.add_tokens(["<extra>"])
    n = len(chatml)
    with pytest.raises(ConfigError, match=f"token id {n}: student no token, teacher '<extra>' "
                                          f"\\(student {n} tokens, teacher {n + 1}\\)"):
        check_vocab(chatml, longer)


def test_hashes(rows, tmp_path):
    assert hash_rows(rows) == hash_rows([dict(r) for r in rows])
    changed = [dict(r) for r in rows]
    changed[1] = {**changed[1], "labels": changed[1]["labels"][:-2] + [-100, -100]}
    assert changed[1]["labels"] != rows[1]["labels"]
    assert hash_rows(changed) != hash_rows(rows)
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    key = hash_teacher(folder, dtype="bfloat16")
    (folder / "metrics.jsonl").write_text("{}")  # a run folder's log: not the teacher
    assert hash_teacher(folder, dtype="bfloat16") == key
    assert hash_teacher(folder, dtype="float32") != key
    (folder / "model.safetensors").write_bytes(b"weights2")
    assert hash_teacher(folder, dtype="bfloat16") != key
    assert hash_teacher("org/name") != hash_teacher("org/other")
