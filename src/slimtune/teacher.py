"""A teacher for distillation: the vocabulary check, and the stored teacher (its top-k log-probs
at every trained position, written once, so training needs no teacher in memory).

    rows (data.prepare: {input_ids, labels}) --teacher, eval, no_grad--> final hidden states at
    the trained positions --output layer, chunk by chunk--> top-k ids + log-probs
    --> out_dir/shard-00000.arrow, ... + manifest.json

A trained position is t with labels[t + 1] != -100: the hidden state at t predicts token t + 1
(the shift of train/forward.py). A shard holds `shard_rows` consecutive rows, one Arrow record each:
row (int64), n_trained (int32), ids (list<int32>, n_trained x K, row-major) and logps
(list<float32>, the same shape): log softmax(teacher_logits / temperature) at those ids, highest
first. Shards are written atomically, and the manifest after each one, so a killed write resumes at
the first shard the manifest does not list. The manifest keys the store by the data's and the
teacher's hashes, K and the temperature; a store with another key is refused, never mixed.

Hashing and the manifest are torch-free; torch is imported by the functions that run the teacher.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path

import pyarrow as pa
import torch

from .config import CHUNK_SIZE
from .data.batching import collate
from .data.render import IGNORE
from .data.sources import file_hash
from .errors import ConfigError, DataError
from .losses.head import project, tempered_log_softmax
from .machine import bf16_supported
from .models import load_model, load_tokenizer
from .runfolder import load_run, run_kind
from .train.forward import hidden_states, output_layer
from .utils import atomic_write_bytes, atomic_write_json, eval_mode

FORMAT = 1
MANIFEST = "manifest.json"
# What makes a teacher's outputs in a model or run folder: weights, config, tokenizer. Logs, metrics
# and evaluation summaries a run folder gains later do not change the teacher.
TEACHER_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.model", "config.json", "adapter_config.json",
                 "generation_config.json", "tokenizer*.json", "special_tokens_map.json", "vocab*", "merges.txt")


# ---------------------------------------------------------------------------------------------
# vocabulary and hashes (torch-free)


def check_vocab(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ConfigError unless both tokenizers map every id to the same token string.

    Distillation compares the two distributions id by id, so one differing id makes it wrong in
    silence; the message names the first differing id and both strings.
    """
    student, teacher = _id_to_token(student_tokenizer), _id_to_token(teacher_tokenizer)
    for i in sorted(student.keys() | teacher.keys()):
        s, t = student.get(i), teacher.get(i)
        if s != t:
            raise ConfigError(
                f"the teacher's vocabulary differs from the student's at token id {i}: student {_show(s)}, "
                f"teacher {_show(t)} (student {len(student)} tokens, teacher {len(teacher)}). Distillation "
                "compares the two models' next-token distributions id by id, so they must share one "
                "tokenizer: choose a teacher of the student's model family.")


def _show(token: str | None) -> str:
    return "no token" if token is None else repr(token)


def _id_to_token(tokenizer) -> dict[int, str]:
    return {i: tok for tok, i in tokenizer.get_vocab().items()}  # added tokens included


def hash_rows(rows: list[dict]) -> str:
    """sha256 of the rows' input_ids and labels (and position_ids of packed rows), in order."""
    h = hashlib.sha256(f"rows {len(rows)}".encode())
    for r in rows:
        for name in ("input_ids", "labels", "position_ids"):
            if name in r:
                h.update(f"{name} {len(r[name])}".encode() + array("q", r[name]).tobytes())
    return h.hexdigest()[:32]


def hash_teacher(source: str | Path, **settings) -> str:
    """A key for the teacher's outputs: the content of a model / run folder's TEACHER_FILES or of a
    single file (.gguf), else (a hub id) the name itself, plus `settings` that change the
    log-probs (dtype, quantisation). A hub id is hashed by name: pin a revision or download it to
    a folder for a key that follows its content."""

    p = Path(source)
    if p.is_file():
        parts = [[p.name, file_hash(p)]]
    elif p.is_dir():
        files = sorted({f for pattern in TEACHER_FILES for f in p.glob(pattern) if f.is_file()})
        parts = [[f.name, file_hash(f)] for f in files]
    else:
        parts = [["name", str(source)]]
    ident = {"teacher": parts, "settings": settings}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def trained_counts(rows: list[dict]) -> list[int]:
    """Trained positions per row: labels[t + 1] != -100 for t < len - 1."""
    return [sum(lab != IGNORE for lab in r["labels"][1:]) for r in rows]


# ---------------------------------------------------------------------------------------------
# a teacher in memory


def teacher_dtype(want: str, device: str, student_dtype: str) -> str:
    """distill.teacher_dtype resolved: auto is bfloat16 where the device computes it natively
    (machine.bf16_supported), else the student's dtype; 4bit only where NF4 runs on CUDA."""

    if want == "4bit" and not str(device).startswith("cuda"):
        raise ConfigError(f"distill.teacher_dtype=4bit needs CUDA (bitsandbytes NF4), this run is on {device}; "
                          "use auto, bfloat16 or float32")
    if want != "auto":
        return want
    return "bfloat16" if bf16_supported(str(device)) else student_dtype


def load_teacher(source: str, student_tokenizer, device: str, dtype: str = "float32"):
    """The teacher model for distillation: eval mode, no grad, on `device` in `dtype` (a
    `teacher_dtype` answer). A run folder loads onto its base with the adapter merged in memory.
    Raises ConfigError unless its vocabulary is the student's (check_vocab)."""

    if dtype == "4bit":
        if run_kind(source) is not None:
            raise ConfigError("distill.teacher_dtype=4bit loads a model, not a run folder: merge the run first "
                              "(slimtune merge) or use bfloat16")
        model, tok = load_model(source, quantize_4bit=True, device=device), load_tokenizer(source)
    else:
        model, tok, _ = load_run(source, dtype, device)
        if hasattr(model, "merge_and_unload"):  # a run's adapter, folded into its base once
            model = model.merge_and_unload()
    check_vocab(student_tokenizer, tok)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# the manifest (torch-free)


def _open_manifest(out: Path, key: dict) -> dict:
    """The store's manifest: the existing one if its key matches, a new empty one if there is none."""
    path = out / MANIFEST
    if not path.is_file():
        manifest = {**key, "rows_done": 0, "shards": []}
        atomic_write_json(path, manifest)  # before any shard: a killed first shard is still keyed
        return manifest
    manifest = json.loads(path.read_text())
    diff = [k for k in key if manifest.get(k) != key[k]]
    if diff:
        what = ", ".join(f"{k} {manifest.get(k)!r} there, {key[k]!r} now" for k in diff)
        raise ConfigError(f"{out} holds teacher log-probs for other settings ({what}); it is never "
                          "mixed with another teacher's or data's. Write to a new folder, or delete this "
                          "one to rebuild it.")
    return manifest


def _finish_shard(out: Path, manifest: dict, entry: dict) -> None:
    manifest["shards"] = sorted([s for s in manifest["shards"] if s["file"] != entry["file"]] + [entry],
                                key=lambda s: s["rows"][0])
    manifest["rows_done"] = sum(s["rows"][1] - s["rows"][0] for s in manifest["shards"])
    atomic_write_json(out / MANIFEST, manifest)


# ---------------------------------------------------------------------------------------------
# writing


def write_teacher_logprobs(rows: list[dict], teacher_model, out_dir: str | Path, top_k: int,
                           data_hash: str, teacher_hash: str, *, temperature: float = 1.0,
                           shard_rows: int = 1024, batch_size: int = 8, chunk_size: int = CHUNK_SIZE,
                           log=None) -> dict:
    """Write the teacher's top-k log-probs at every trained position of `rows` to `out_dir`.

    rows: [{input_ids, labels (-100 = untrained)}] as data.prepare makes them (the training order
    does not matter: rows are found by index). teacher_model: a transformers causal LM (or a PEFT
    wrapper), run in eval mode under no_grad on its own device and dtype; its mode is restored after.
    top_k: K ids per position (1 <= K <= its output rows). data_hash / teacher_hash: the store's key
    (`hash_rows(rows)`, `hash_teacher(source, dtype=...)`). temperature: the log-probs are of
    softmax(logits / temperature), the distillation loss's tau. Resumable: shards the manifest
    lists are kept; a store with another key raises ConfigError. batch_size and chunk_size are not
    part of the key: a store finished with other values matches to fp32 rounding, not bit for bit.
    Returns the manifest (a dict).
    """
    if top_k < 1 or shard_rows < 1 or batch_size < 1 or temperature <= 0:
        raise ConfigError("top_k, shard_rows and batch_size must be >= 1 and temperature > 0")
    out = Path(out_dir)
    key = {"format": FORMAT, "data_hash": data_hash, "teacher_hash": teacher_hash, "top_k": int(top_k),
           "temperature": float(temperature), "rows": len(rows), "shard_rows": int(shard_rows)}
    manifest = _open_manifest(out, key)
    for tmp in out.glob(".shard-*.tmp"):  # left by a killed write (atomic_write_bytes' temporaries)
        tmp.unlink(missing_ok=True)
    done = {s["file"] for s in manifest["shards"] if (out / s["file"]).is_file()}
    with eval_mode(teacher_model):  # no dropout: the stored log-probs are the teacher's, not a sample of it
        for start in range(0, len(rows), shard_rows):
            name = f"shard-{start // shard_rows:05d}.arrow"
            if name in done:
                continue
            end = min(start + shard_rows, len(rows))
            table = _shard_table(rows, start, end, teacher_model, top_k, temperature, batch_size, chunk_size)
            atomic_write_bytes(out / name, _arrow_bytes(table))
            n_trained = int(sum(table.column("n_trained").to_pylist()))
            _finish_shard(out, manifest, {"file": name, "rows": [start, end], "trained": n_trained})
            if log:
                log(f"teacher log-probs: rows {manifest['rows_done']}/{len(rows)}")
    return manifest


def _shard_table(rows, start, end, model, top_k, tau, batch_size, chunk_size):
    """The Arrow table of rows[start:end]; batches of similar length (longest first) pad little,
    and the order within a shard is fixed, so a rewritten shard is byte-identical."""

    order = sorted(range(start, end), key=lambda i: (-len(rows[i]["input_ids"]), i))
    found = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        for i, (ids, logps) in zip(idx, teacher_topk(model, [rows[i] for i in idx], top_k, tau, chunk_size)):
            found[i] = (ids, logps)
    span = range(start, end)
    return pa.table({
        "row": pa.array(list(span), pa.int64()),
        "n_trained": pa.array([found[i][0].shape[0] for i in span], pa.int32()),
        "ids": pa.array([found[i][0].reshape(-1) for i in span], pa.list_(pa.int32())),
        "logps": pa.array([found[i][1].reshape(-1) for i in span], pa.list_(pa.float32())),
    })


def _arrow_bytes(table) -> bytes:

    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def teacher_topk(model, rows: list[dict], top_k: int, temperature: float = 1.0, chunk_size: int = CHUNK_SIZE):
    """[(ids (n_i, K) int32 ndarray, logps (n_i, K) fp32 ndarray)] per row: the teacher's top k of
    log softmax(logits / temperature) at the row's n_i trained positions, highest first.

    One padded forward for the batch (final hidden states only, train/forward.py's path), then the
    output layer with the head's transforms on `chunk_size` positions at a time: never (B, T, V).
    """


    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(rows, pad_id=0).items()}  # padding is never selected
    head = output_layer(model)
    if not 1 <= top_k <= head.weight.shape[0]:
        raise ConfigError(f"top_k={top_k}: the teacher has {head.weight.shape[0]} output ids")
    with torch.no_grad():
        sel = batch["labels"][:, 1:] != IGNORE                       # (B, T-1): position t predicts t+1
        h = hidden_states(model, batch)[:, :-1][sel]                 # (n, H), row-major
        ids, logps = [], []
        for s in range(0, h.shape[0], chunk_size):
            z = project(h[s:s + chunk_size], head.weight, head.bias, (head.scale, head.softcap))  # (c, V)
            top = tempered_log_softmax(z, temperature).topk(top_k, -1)
            ids.append(top.indices.int().cpu())
            logps.append(top.values.float().cpu())
            del z, top
    ids_all = torch.cat(ids) if ids else torch.zeros(0, top_k, dtype=torch.int32)
    logps_all = torch.cat(logps) if logps else torch.zeros(0, top_k)
    counts = sel.sum(1).tolist()
    return [(a.numpy(), b.numpy()) for a, b in zip(ids_all.split(counts), logps_all.split(counts))]


# ---------------------------------------------------------------------------------------------
# reading


class TeacherLogprobs:
    """The stored teacher, row by row: store[i] -> (ids (n_i, K) long, logps (n_i, K) fp32), aligned
    with row i's trained positions in order. A batch's rows concatenated in batch order line up
    with train/forward.py's `hidden[:, :-1][labels[:, 1:] != -100]`. Shards are memory-mapped."""

    def __init__(self, out: Path, manifest: dict, tables: list):
        self.out, self.manifest, self.tables = out, manifest, tables
        self.top_k, self.temperature = manifest["top_k"], manifest["temperature"]
        self.shard_rows = manifest["shard_rows"]

    def __len__(self) -> int:
        return self.manifest["rows"]

    def __getitem__(self, i: int):

        if not 0 <= i < len(self):
            raise IndexError(i)
        table, j = self.tables[i // self.shard_rows], i % self.shard_rows
        k = self.top_k
        ids = table.column("ids")[j].values.to_numpy(zero_copy_only=False).reshape(-1, k)
        logps = table.column("logps")[j].values.to_numpy(zero_copy_only=False).reshape(-1, k)
        return torch.from_numpy(ids.astype("int64")), torch.from_numpy(logps.copy())


def read_teacher_logprobs(out_dir: str | Path, rows: list[dict], data_hash: str | None = None) -> TeacherLogprobs:
    """Open a finished store written for `rows`; DataError if it is unfinished or does not match
    them (row count, data hash when given, trained positions per row)."""

    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise DataError(f"no {MANIFEST}: not a teacher log-probs folder (write one with "
                        "slimtune.teacher.write_teacher_logprobs)", path=str(out))
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"store format {manifest.get('format')}, this slimtune reads {FORMAT}: write it again",
                        path=str(out))
    if manifest["rows_done"] != manifest["rows"]:
        raise DataError(f"unfinished: {manifest['rows_done']} of {manifest['rows']} rows written; run the "
                        "writer again with the same data and teacher to finish it", path=str(out))
    if manifest["rows"] != len(rows):
        raise DataError(f"written for {manifest['rows']} rows, the data has {len(rows)}: it was written "
                        "for other data (or another split); write it again for this data", path=str(out))
    if data_hash is not None and manifest["data_hash"] != data_hash:
        raise DataError(f"written for data {manifest['data_hash']}, this data is {data_hash}: write it "
                        "again for this data", path=str(out))
    tables = [pa.ipc.open_file(pa.memory_map(str(out / s["file"]))).read_all() for s in manifest["shards"]]
    stored = [n for t in tables for n in t.column("n_trained").to_pylist()]
    for i, (have, want) in enumerate(zip(stored, trained_counts(rows))):
        if have != want:
            raise DataError(f"row {i} has {want} trained positions, the store {have}: it was written for "
                            "other data (or another max_length / train_on); write it again", path=str(out))
    return TeacherLogprobs(out, manifest, tables)
