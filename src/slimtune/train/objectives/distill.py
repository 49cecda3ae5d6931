"""Distillation: the student's CE on the data plus a divergence to a teacher, at the trained tokens.

    loss = (alpha sum_i CE_i + (1 - alpha) tau^2 sum_i D(teacher_i || student_i)) / N

over the N trained target tokens of the step; D is forward KL, reverse KL or JSD (the distill
section of the config). The teacher, one of:

    distill.teacher           another model in memory (eval mode, no grad, its cheapest dtype)
    distill.teacher_logprobs  its top k stored by `slimtune data teacher`: no teacher in memory
    distill.teacher_system /  the base (adapters off, or the frozen copy of a full fine-tune)
    distill.teacher_prefix    shown a context the student does not see (data/context.py)

A teacher in memory goes through the KL-SFT path: its final hidden states at the trained
positions are the reference of `losses.chunked_loss`, projected by its own output layer chunk by
chunk (losses/distill.py says how alpha maps onto kl_lambda). The stored teacher uses
`losses.distill.topk_distill_loss`. No (N, V) logits exist for a batch in either.

On-policy batches (distill.on_policy = lambda, GKD): a share lambda of the batches, drawn from
(train.seed, step, the batch's place in the step), train on answers the student generates now:

    begin_step   rows --prompt: the tokens before each row's last answer--> generate_many (adapters
                 merged, no grad, distill.max_new_tokens, distill.sample_temperature)
                 --> rows {prompt + answer ids, labels on the answer ids only, on_policy}; context
                 distillation: the teacher's row is its own prompt (with the context) + the same ids
    loss         tau^2 KL(student || teacher) per answer token (chunked_loss, direction reverse, no
                 CE: the student's own samples are no target), over the step's trained tokens

Reverse KL on the student's own samples is the mode-seeking divergence of on-policy distillation
(GKD with beta = 1, TRL's lmbda and beta): the teacher corrects what the student actually says,
not the data's answers. A stored teacher cannot score new answers (refused in config.py).
"""

from __future__ import annotations

import math
import random
import zlib

import torch

from ...data.batching import collate, count_trained, length_grouped_batches
from ...data.context import prepare_context
from ...data.prepare import examples, prepare, render
from ...data.render import IGNORE
from ...errors import ConfigError, DataError
from ...generate import GenSettings, generate_many, merged
from ...losses.distill import agreement_sums, topk_distill_loss
from ...losses.sft import LossOut, chunked_loss
from ...teacher import hash_rows, load_teacher, read_teacher_logprobs, teacher_dtype
from ...utils import eval_mode
from ..base_states import batch_key
from ..forward import chunk_with_reference, hidden_states, output_layer, reference_at, reference_head
from .base import Objective, StepOut, append_samples, process_place, sample_seed
from .paired import to_device


SAMPLES_PER_WRITE = 4
"""On-policy answers written to RUN/samples.jsonl each time (distill.samples_every): a few to read."""


def answer_start(labels: list[int]) -> int:
    """Position of the first token of the row's last trained run (its last answer): the tokens
    before it, the assistant header included, are the prompt the student answers on-policy.
    0 when the row is trained from its first token (no prompt)."""
    end = max((t for t in range(1, len(labels)) if labels[t] != IGNORE), default=0)
    start = end
    while start > 1 and labels[start - 1] != IGNORE:
        start -= 1
    return start if end and labels[start - 1] == IGNORE else 0


def nth_trained(labels: list[int], n: int) -> int:
    """Position of the n-th trained token (n >= 1, positions >= 1, as `trained_targets` counts)."""
    seen = 0
    for t in range(1, len(labels)):
        if labels[t] != IGNORE:
            seen += 1
            if seen == n:
                return t
    raise ValueError(f"the row has {seen} trained tokens, not {n}")


class Distill(Objective):
    """loss.objective=distill; see the module docstring. One instance holds its teacher (loaded on
    first use, on the student's device) or its store."""

    name = "distill"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dc = cfg.distill
        self.tokenizer = None
        self.teacher = None
        """distill.teacher: the model, once loaded."""
        self.store = None
        """distill.teacher_logprobs: the opened store (teacher.TeacherLogprobs)."""
        self._calls = (-1, 0)
        """On-policy: (step, begin_step calls in it): which of this process's batches this is."""
        self._pending: dict[str, float] = {}
        """On-policy: the step's batch and answer counts, added to its first micro-batch's sums."""
        self._next_samples = 0
        """On-policy: the first step whose answers are written to samples.jsonl next."""

    @property
    def generates(self) -> bool:
        """On-policy batches are generated in `begin_step`; off-policy distillation generates nothing."""
        return self.dc.on_policy > 0

    # ------------------------------------------------------------------ data

    def prepare_data(self, tokenizer, seed: int = 0, log=None):
        """Chats as SFT renders them; context rows also as the teacher sees them; stored-teacher
        rows carry `teacher_row`, their row in the store."""

        self.tokenizer = tokenizer
        if self.dc.mode == "context":
            data = prepare_context(self.cfg.data, tokenizer, self.dc.teacher_system, self.dc.teacher_prefix, seed, log)
        else:
            data = prepare(self.cfg.data, tokenizer, seed, log=log)
        if self.dc.mode == "teacher_logprobs":
            self.attach_store(data.train, data.val, tokenizer, seed)
        if self.dc.on_policy and any(answer_start(r["labels"]) == 0 for r in data.train):
            raise ConfigError("distill.on_policy > 0 answers each chat's prompt (the tokens before its last "
                              "answer), but some training rows are trained from their first token (raw text, "
                              "or data.train_on=all): use chats with data.train_on=assistant or last, or "
                              "distill.on_policy=0")
        return data

    def attach_store(self, train: list[dict], val: list[dict], tokenizer, seed: int = 0) -> None:
        """Open distill.teacher_logprobs, written for every example of data.train (`slimtune data
        teacher`), and mark each row with its store row, found by content (the split and
        data.max_examples pick a subset). Held-out rows from another file get none."""

        data = self.cfg.data
        everything = examples(render(data.train, data, tokenizer, seed), source=data.train)[0]
        self.store = read_teacher_logprobs(self.dc.teacher_logprobs, everything, hash_rows(everything))
        if abs(self.store.temperature - self.dc.temperature) > 1e-9:
            raise ConfigError(f"{self.dc.teacher_logprobs} holds log-probs at temperature {self.store.temperature}, "
                              f"distill.temperature is {self.dc.temperature}: set it so, or write the store again")
        if self.dc.top_k and self.dc.top_k > self.store.top_k:
            raise ConfigError(f"distill.top_k={self.dc.top_k}, but {self.dc.teacher_logprobs} holds {self.store.top_k} "
                              "ids per position")
        where = {(tuple(r["input_ids"]), tuple(r["labels"])): i for i, r in enumerate(everything)}
        for rows, required in ((train, True), (val, False)):
            for r in rows:
                i = where.get((tuple(r["input_ids"]), tuple(r["labels"])))
                if i is None and required:
                    raise DataError("a training example is not in the store: write it again for this data",
                                    path=self.dc.teacher_logprobs)
                if i is not None:
                    r["teacher_row"] = i

    # ------------------------------------------------------------------ on-policy batches

    def on_policy_batch(self, step: int, index: int) -> bool:
        """Whether batch `index` of `step` (its place among the step's batches on all processes) is
        on-policy: a draw from (train.seed, step, index) alone, so a resumed run or a re-run
        chooses the same."""
        seed = zlib.crc32(f"{self.cfg.train.seed}|{step}|{index}|on_policy".encode())
        return random.Random(seed).random() < self.dc.on_policy

    def settings(self) -> GenSettings:
        """How the student answers: sampled at distill.sample_temperature, nothing else changing its
        distribution (no top-p / top-k / penalties: the loss assumes its own samples)."""
        return GenSettings(max_new_tokens=self.dc.max_new_tokens, temperature=self.dc.sample_temperature,
                           top_p=1.0, top_k=0, autocast="bf16" if self.cfg.train.mixed_precision == "bf16" else "no")

    def seeds(self, step: int, index: int, n: int) -> list[int]:
        """One sampling seed per answer, from (train.seed, step, batch index, row in the batch)."""
        return [sample_seed(self.cfg.train.seed, step, index, i) for i in range(n)]

    def begin_step(self, model, rows: list[dict], step: int, ref_model=None) -> list[dict]:
        """One batch's rows -> the same rows (off-policy) or the student's answers to their prompts."""
        k = self._calls[1] + 1 if self._calls[0] == step else 0
        self._calls = (step, k)
        if k == 0:
            self._pending = {}
        rank, world = process_place()
        index = rank + k * world  # the loop gives process `rank` the step's batches rank, rank + world, ...
        on = self.on_policy_batch(step, index)
        out = self.answer(model, rows, step, index) if on else rows
        add = {"batches": 1.0, "on_batches": float(on), "answers": float(len(out) if on else 0),
               "answer_tokens": float(sum(len(r["answer_ids"]) for r in out) if on else 0),
               "answers_ended": float(sum(r["ended"] for r in out) if on else 0)}
        for key, v in add.items():
            self._pending[key] = self._pending.get(key, 0.0) + v
        if on and self.dc.samples_every and step >= self._next_samples and rank == 0:
            self.write_samples(out, step)
            self._next_samples = step + self.dc.samples_every
        return out

    @torch.no_grad()
    def answer(self, model, rows: list[dict], step: int, index: int) -> list[dict]:
        """The student's answers to the rows' prompts, as rows whose labels are the answer ids
        (the end-of-turn token included when it stopped there); see the module docstring."""
        net = getattr(model, "module", model)  # under DDP: the PEFT model itself merges and generates
        starts = [answer_start(r["labels"]) for r in rows]
        prompts = [r["input_ids"][:p] for r, p in zip(rows, starts)]
        with eval_mode(net), merged(net):
            got = generate_many(net, self.tokenizer, None, self.settings(), self.cfg.eval.gen_batch_size,
                                seeds=self.seeds(step, index, len(rows)), return_ids=True, prompt_ids=prompts)
        out = []
        for r, p, prompt, a in zip(rows, starts, prompts, got):
            ids = a["ids"]
            row = {"input_ids": prompt + ids, "labels": [IGNORE] * p + ids, "on_policy": True,
                   "answer_ids": ids, "text": a["text"], "ended": a["ended"]}
            if self.dc.mode == "context":  # the teacher's prompt ends where the same answer starts in its row
                before = sum(lab != IGNORE for lab in r["labels"][1:p])
                tp = nth_trained(r["teacher_labels"], before + 1)
                row["teacher_input_ids"] = r["teacher_input_ids"][:tp] + ids
                row["teacher_labels"] = [IGNORE] * tp + ids
            out.append(row)
        return out

    def write_samples(self, rows: list[dict], step: int) -> None:
        """Append a few of the batch's on-policy answers to RUN/samples.jsonl (one write)."""
        tok = self.tokenizer
        append_samples(self.cfg.train.output_dir, [
            {"step": step, "prompt": tok.decode(r["input_ids"][:-len(r["answer_ids"])]), "completion": r["text"],
             "n_tokens": len(r["answer_ids"]), "ended": r["ended"]} for r in rows[:SAMPLES_PER_WRITE]])

    # ------------------------------------------------------------------ batches

    def units(self, rows):
        return count_trained(rows)

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """SFT's batch; context: plus the teacher's rows as teacher_input_ids, teacher_labels (and
        teacher_attention_mask); stored: plus teacher_ids, teacher_logps (N, k), N = trained tokens."""
        batch = collate(rows, pad_id)
        on = {bool(r.get("on_policy")) for r in rows}
        if len(on) > 1:
            raise ValueError("a batch mixes on-policy and data rows; begin_step makes whole batches one or the other")
        if True in on:
            batch["on_policy"] = torch.ones(len(rows), dtype=torch.bool)
        if self.dc.mode == "context":
            seen = collate([{"input_ids": r["teacher_input_ids"], "labels": r["teacher_labels"]} for r in rows], pad_id)
            batch.update({f"teacher_{k}": v for k, v in seen.items()})
        elif self.dc.mode == "teacher_logprobs" and all("teacher_row" in r for r in rows):
            ids, logps = zip(*(self.store[r["teacher_row"]] for r in rows))
            k = self.dc.top_k or self.store.top_k
            batch["teacher_ids"], batch["teacher_logps"] = torch.cat(ids)[:, :k], torch.cat(logps)[:, :k]
        return batch

    # ------------------------------------------------------------------ the teacher

    def teacher_model(self, model):
        """distill.teacher, loaded once on the student's device (teacher.load_teacher)."""
        if self.teacher is None:

            if self.tokenizer is None:
                raise RuntimeError("prepare_data first: the teacher's vocabulary is checked against the student's")
            device = str(next(model.parameters()).device)
            dtype = teacher_dtype(self.dc.teacher_dtype, device, self.cfg.model.dtype)
            teacher = load_teacher(self.dc.teacher, self.tokenizer, device, dtype)
            mine, theirs = output_layer(model), output_layer(teacher)
            if (mine.scale, mine.softcap) != (theirs.scale, theirs.softcap):
                raise ConfigError(f"the teacher's logit transforms (scale {theirs.scale}, soft-cap {theirs.softcap}) "
                                  f"differ from the student's ({mine.scale}, {mine.softcap}); choose a teacher of "
                                  "the student's model family")
            self.teacher = teacher
        return self.teacher

    def teacher_head(self, model, ref_model=None) -> dict:
        """ref_weight / ref_bias: the teacher's output layer (context: the base's)."""
        if self.dc.mode == "context":
            return reference_head(model, ref_model)
        return reference_head(self.teacher_model(model))

    def teacher_states(self, model, batch: dict, ref_model=None) -> torch.Tensor:
        """(N, H_teacher) the teacher's final hidden states at the student's N trained positions,
        row-major (no grad). Context: the base reads the teacher's rows; the trained targets are the
        same tokens in the same order (data/context.py), so row j of both lines up."""
        if self.dc.mode == "context":
            seen = {k[len("teacher_"):]: v for k, v in batch.items() if k.startswith("teacher_")}
            return reference_at(model, seen, seen["labels"][:, 1:] != IGNORE, ref_model)
        teacher = self.teacher_model(model)
        return reference_at(teacher, batch, batch["labels"][:, 1:] != IGNORE, teacher)

    # ------------------------------------------------------------------ the loss

    def loss(self, model, batch: dict, normaliser: float, ref_model=None) -> LossOut:
        """alpha CE + (1 - alpha) tau^2 D over the batch's trained tokens, divided by `normaliser`;
        an on-policy batch: tau^2 KL(student || teacher) alone."""
        dc, chunk = self.dc, self.cfg.loss.chunk_size
        targets = batch["labels"][:, 1:]
        sel = targets != IGNORE
        if dc.mode == "teacher_logprobs":
            h = hidden_states(model, batch)[:, :-1][sel]
            head = output_layer(model)
            return topk_distill_loss(h, head.weight, targets[sel], batch["teacher_ids"], batch["teacher_logps"],
                                     alpha=dc.alpha, temperature=dc.temperature, direction=dc.direction,
                                     jsd_beta=dc.jsd_beta, tail=dc.tail, chunk_size=chunk, normaliser=normaliser,
                                     **head.kwargs())
        ref_h = self.teacher_states(model, batch, ref_model)  # first, while no autograd graph is held
        h = hidden_states(model, batch)[:, :-1][sel]
        head = output_layer(model)
        on = "on_policy" in batch
        t, a = targets[sel], 0.0 if on else dc.alpha
        # (CE + (1 - a) / a D) / (n / a) = (a CE + (1 - a) D) / n; a = 0: no CE rows, D alone
        return chunked_loss(h, head.weight, t if a > 0 else torch.full_like(t, IGNORE), ref_hidden=ref_h,
                            **self.teacher_head(model, ref_model), kl_mask=torch.ones_like(t, dtype=torch.bool),
                            kl_lambda=(1 - a) / a if a > 0 else 1.0, normaliser=normaliser / a if a > 0 else normaliser,
                            temperature=dc.temperature, direction="reverse" if on else dc.direction,
                            jsd_beta=dc.jsd_beta, chunk_size=chunk_with_reference(chunk), **head.kwargs())

    def __call__(self, model, batch, normaliser, step, ref_model=None):
        out = self.loss(model, batch, normaliser, ref_model)
        on = "on_policy" in batch
        sums = {"loss": float(out.loss.detach()) * normaliser, "ce": float(out.ce_sum),
                "kl": 0.0 if on else float(out.kl_sum), "kl_on": float(out.kl_sum) if on else 0.0,
                "on_tokens": float(out.n_kl_tokens) if on else 0.0}
        sums.update(self._pending)  # the step's batch counts, once per step and process
        self._pending = {}
        return StepOut(out.loss, sums)

    def summarize(self, sums, units, step):
        """Per trained token of the step: ce and kl_teacher over the data's answers, kl_on_policy
        (reverse KL) over the student's own; None where the step had none."""
        on = sums.get("on_tokens", 0.0)
        off = units - on
        row = {"loss": sums["loss"] / max(units, 1.0),
               "ce": sums["ce"] / off if self.dc.alpha > 0 and off > 0 else None,
               "kl_teacher": sums["kl"] / off if off > 0 else None}
        if self.dc.on_policy > 0:
            answers = sums.get("answers", 0.0)
            row.update({"on_policy": sums.get("on_batches", 0.0) / max(sums.get("batches", 0.0), 1.0),
                        "kl_on_policy": sums["kl_on"] / on if on > 0 else None,
                        "answer_length": sums.get("answer_tokens", 0.0) / answers if answers else None,
                        "answer_ended": sums.get("answers_ended", 0.0) / answers if answers else None})
        return row

    # ------------------------------------------------------------------ held-out

    @torch.no_grad()
    def evaluate(self, model, rows, pad_id, batch_size, ref_model=None, max_examples=None, kl=True, ref_cache=None):
        """Held-out, per trained token at tau 1: the student's CE (eval_loss, eval_ppl), the
        teacher's (eval_teacher_loss), KL(teacher || student) (eval_kl_teacher; a stored teacher:
        over its top k + a tail bucket) and how often both pick the same next token greedily
        (eval_agreement). `ref_cache`: the teacher's states per batch, computed once."""
        rows = rows[:max_examples] if max_examples else rows
        if self.dc.mode == "teacher_logprobs":
            rows = [r for r in rows if "teacher_row" in r]  # held-out rows the store covers
        if not rows:
            return {}
        cache = ref_cache if ref_cache is not None else {}
        sums: dict[str, float | None] = {}
        with eval_mode(model):
            for idx in length_grouped_batches([len(r["input_ids"]) for r in rows], batch_size, seed=0):
                batch = to_device(model, self.collate([rows[i] for i in idx], pad_id))
                targets = batch["labels"][:, 1:]
                sel = targets != IGNORE
                if self.dc.mode == "teacher_logprobs":
                    kw = dict(teacher_ids=batch["teacher_ids"], teacher_logps=batch["teacher_logps"])
                else:
                    key = batch_key(batch, "teacher")
                    if key not in cache:
                        cache[key] = self.teacher_states(model, batch, ref_model)
                    kw = dict(ref_hidden=cache[key], **self.teacher_head(model, ref_model))
                h = hidden_states(model, batch)[:, :-1][sel]
                head = output_layer(model)
                got = agreement_sums(h, head.weight, targets[sel], bias=head.bias, logit_scale=head.scale,
                                     logit_softcap=head.softcap, chunk_size=self.cfg.loss.chunk_size, **kw)
                for k, v in got.items():
                    sums[k] = None if v is None else (sums.get(k) or 0.0) + v
        n = max(sums["n"], 1.0)
        loss = sums["ce"] / n
        teacher = None if sums["teacher_ce"] is None else sums["teacher_ce"] / n
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), "eval_teacher_loss": teacher,
                "eval_teacher_ppl": None if teacher is None else math.exp(min(teacher, 50)),
                "eval_kl_teacher": sums["kl"] / n, "eval_agreement": sums["agree"] / n, "eval_kl": None,
                "eval_tokens": int(sums["n"])}


OBJECTIVES = {Distill.name: Distill}
