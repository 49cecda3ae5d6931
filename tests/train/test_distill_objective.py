"""loss.objective=distill on tiny models: a step's loss and gradients equal a float64 full-logit
reference (student and a teacher of another width and other weights), only trainable parameters
move, the stored top k equals the teacher in memory, a foreign vocabulary is refused, context
distillation aligns the answer tokens of the two renderings, and a short run trains and evaluates;
on-policy batches hold the student's own answers, scored by a float64 reverse-KL reference."""

import json
import math

import pytest
from test_distill import div64
import torch
from tiny import make_model, make_tokenizer, save_tiny

from slimtune.config import MethodCfg, build_config
from slimtune.data.batching import collate, count_trained
from slimtune.data.context import context_row, trained_targets, with_context
from slimtune.data.render import IGNORE, render_chat
from slimtune.errors import ConfigError, DataError
from slimtune.methods import adapters_disabled, apply_method
from slimtune.teacher import read_teacher_logprobs, write_teacher_logprobs
from slimtune.train.loop import train
from slimtune.train.objectives import make_objective

CHATS = [
    [{"role": "user", "content": "Hello! How are you today?"}, {"role": "assistant", "content": "I am fine, thank you."}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "The quick brown fox."},
     {"role": "user", "content": "Another"}, {"role": "assistant", "content": "1. First item"}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"}],
]
SYSTEM = "You are a helpful AI assistant named Tiny."


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


@pytest.fixture(scope="module")
def rows(tok):
    return [dict(zip(("input_ids", "labels"), render_chat(c, tok))) for c in CHATS]


def student(tok):
    model = apply_method(make_model(tok), MethodCfg(name="lora", r=4))
    with torch.no_grad():  # non-zero B: the student differs from its base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def objective(tok, model=None, **distill):
    """The distill objective; `model`: its teacher, already in memory."""
    cfg = build_config({"loss": {"objective": "distill"}, "distill": distill or {"teacher": "in-memory"}})
    obj = make_objective(cfg)
    obj.tokenizer, obj.teacher = tok, model
    return obj


def reference64(model, batch, teacher_logits, alpha, tau, direction, beta, normaliser):
    """alpha CE + (1 - alpha) tau^2 D from the models' own full logits in float64 (plain autograd)."""
    targets = batch["labels"][:, 1:]
    sel = targets != IGNORE
    kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    z = model(**kw).logits[:, :-1][sel].double()
    zt = teacher_logits.double()
    ce = torch.nn.functional.cross_entropy(z, targets[sel], reduction="sum")
    d = div64((zt / tau).log_softmax(-1), (z / tau).log_softmax(-1), direction, beta).sum() * tau**2
    return (alpha * ce + (1 - alpha) * d) / normaliser


@pytest.mark.parametrize("direction,alpha,tau", [("forward", 0.5, 1.0), ("reverse", 0.2, 2.0), ("jsd", 0.0, 1.5),
                                                 ("forward", 1.0, 1.0)])
def test_step_equals_a_float64_full_logit_reference(tok, rows, direction, alpha, tau):
    model, teacher = student(tok), make_model(tok, hidden=48, seed=1)  # another width, other weights
    obj = objective(tok, teacher, teacher="in-memory", alpha=alpha, direction=direction, temperature=tau, jsd_beta=0.3)
    batch = obj.collate(rows, tok.pad_token_id)
    n = count_trained(rows) + 3  # as if the step had more tokens on another micro-batch
    out = obj(model, batch, n, 0)
    out.loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.no_grad():
        kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        zt = teacher(**kw).logits[:, :-1][batch["labels"][:, 1:] != IGNORE]
    ref = reference64(model, batch, zt, alpha, tau, direction, 0.3, n)
    ref.backward()
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    assert out.sums["loss"] == pytest.approx(float(ref) * n, rel=1e-5, abs=1e-6 * n)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[k], p.grad, atol=1e-6, rtol=2e-4)


def test_a_step_moves_trainable_parameters_only(tok, rows):
    model, teacher = student(tok), make_model(tok, hidden=48, seed=1)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    t_before = {k: p.detach().clone() for k, p in teacher.named_parameters()}
    obj = objective(tok, teacher)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    obj(model, obj.collate(rows, tok.pad_token_id), count_trained(rows), 0).loss.backward()
    opt.step()
    for k, p in model.named_parameters():
        changed = not torch.equal(p, before[k])
        assert changed == p.requires_grad, k
    assert all(torch.equal(p, t_before[k]) for k, p in teacher.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) or teacher.training is False


@pytest.mark.parametrize("k", [None, 7])
def test_stored_teacher_equals_the_teacher_in_memory(tok, rows, tmp_path, k):
    """K = V: the stored loss is the online loss. K < V: it is the top-k loss of the live teacher's
    own top k (the store holds exactly those ids and log-probs)."""
    from slimtune.losses.distill import topk_distill_loss
    from slimtune.teacher import teacher_topk
    from slimtune.train.forward import hidden_states, output_layer

    model, teacher = student(tok), make_model(tok, hidden=48, seed=1)
    v = len(tok)
    kw = dict(alpha=0.3, direction="reverse", temperature=2.0)
    write_teacher_logprobs(rows, teacher, tmp_path, top_k=k or v, data_hash="d", teacher_hash="t", temperature=2.0)
    stored = objective(tok, None, teacher_logprobs=str(tmp_path), **kw)
    stored.store = read_teacher_logprobs(tmp_path, rows)
    marked = [{**r, "teacher_row": i} for i, r in enumerate(rows)]
    n = count_trained(rows)
    got = stored(model, stored.collate(marked, tok.pad_token_id), n, 0).loss
    if k is None:
        online = objective(tok, teacher, teacher="in-memory", **kw)
        want = online(model, online.collate(rows, tok.pad_token_id), n, 0).loss
    else:
        batch = collate(rows, tok.pad_token_id)
        sel = batch["labels"][:, 1:] != IGNORE
        ids, logps = zip(*teacher_topk(teacher, rows, k, 2.0))
        head = output_layer(model)
        want = topk_distill_loss(hidden_states(model, batch)[:, :-1][sel], head.weight, batch["labels"][:, 1:][sel],
                                 torch.from_numpy(__import__("numpy").concatenate(ids)).long(),
                                 torch.from_numpy(__import__("numpy").concatenate(logps)), alpha=0.3,
                                 temperature=2.0, direction="reverse", normaliser=n).loss
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused_naming_the_token(tok, tmp_path):
    folder = save_tiny(tmp_path / "llama3", "llama3")
    obj = objective(tok, None, teacher=folder)
    with pytest.raises(ConfigError, match=r"token id \d+: student '.*', teacher '.*'"):
        obj.teacher_model(make_model(tok))


# ---------------------------------------------------------------------------------------------
# context distillation


def test_context_rows_align_the_answer_tokens(tok):
    for chat in CHATS:
        row = context_row(chat, tok, SYSTEM, "Be brief.")
        assert trained_targets(row["labels"]) == trained_targets(row["teacher_labels"])
        assert len(row["teacher_input_ids"]) > len(row["input_ids"])  # the teacher saw more
        assert tok.decode(row["teacher_input_ids"]).count(SYSTEM) == 1
        assert "Be brief." not in tok.decode(row["input_ids"])
    seen = with_context([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "T", "P")
    assert seen == [{"role": "system", "content": "T\n\nS"}, {"role": "user", "content": "P\n\nQ"}]
    # cut at max_length: the teacher keeps the same trained targets, in the same order
    row = context_row(CHATS[2], tok, SYSTEM, None, max_length=len(render_chat(CHATS[2], tok)[0]) - 4)
    assert trained_targets(row["labels"]) == trained_targets(row["teacher_labels"])


# ChatML that writes assistant turns differently once a system turn is present
SYSTEM_AWARE = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and messages[0]['role'] == 'system' %}"
    "{% set content = content | upper %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_that_changes_the_answer_tokens_is_refused():
    tok = make_tokenizer("chatml")
    tok.chat_template = SYSTEM_AWARE
    context_row(CHATS[0], tok, None, "Be brief.")  # a prefix leaves the answers as they are
    with pytest.raises(DataError, match="answer tokens differently"):
        context_row(CHATS[0], tok, SYSTEM, None)


def test_context_distillation_step_equals_the_reference(tok):
    model = student(tok)
    rows = [context_row(c, tok, SYSTEM, "Answer briefly.") for c in CHATS]
    obj = objective(tok, None, teacher_system=SYSTEM, teacher_prefix="Answer briefly.", alpha=0.25)
    batch = obj.collate(rows, tok.pad_token_id)
    n = count_trained(rows)
    out = obj(model, batch, n, 0)
    with torch.no_grad(), adapters_disabled(model):  # the teacher: the base, reading the teacher's rows
        t = collate([{"input_ids": r["teacher_input_ids"], "labels": r["teacher_labels"]} for r in rows],
                    tok.pad_token_id)
        kw = {k: v for k, v in t.items() if k in ("input_ids", "attention_mask")}
        zt = model(**kw).logits[:, :-1][t["labels"][:, 1:] != IGNORE]
    ref = reference64(model, batch, zt, 0.25, 1.0, "forward", 0.5, n)
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the loop


def _data(path, n=20):
    path.write_text("".join(json.dumps({"messages": CHATS[i % len(CHATS)]}) + "\n" for i in range(n)))
    return str(path)


def _args(model_dir, data, out, **extra):
    base = {"model.name": model_dir, "data.train": data, "data.max_length": 64, "data.val_fraction": 0.2,
            "data.general_prompts": "", "train.batch_size": 4, "train.lr": 1e-2, "train.max_steps": 3,
            "train.progress": "false", "method.r": 4, "train.output_dir": str(out), "eval.max_examples": 4,
            "loss.objective": "distill", **extra}
    return [f"{k}={v}" for k, v in base.items()]


def test_a_short_run_distils_and_reports_the_teacher(tiny_dir, tmp_path):
    teacher = save_tiny(tmp_path / "teacher", "chatml", hidden=48, seed=1)
    data = _data(tmp_path / "d.jsonl")
    s = train(build_config({}, _args(tiny_dir, data, tmp_path / "run", **{"distill.teacher": teacher,
                                                                             "distill.alpha": 0.0})), log=lambda *_: None)
    before, after = s["before"], s["after"]
    assert after["eval_kl_teacher"] < before["eval_kl_teacher"]
    assert before["eval_teacher_loss"] == pytest.approx(after["eval_teacher_loss"])  # the teacher is fixed
    assert 0 <= after["eval_agreement"] <= 1 and s["last_train"]["ce"] is None


def test_a_short_context_run_and_its_eval(tiny_dir, tmp_path, gen_cache):
    from slimtune.evaluate.suite import evaluate_run, format_table

    data = _data(tmp_path / "d.jsonl")
    s = train(build_config({}, _args(tiny_dir, data, tmp_path / "run", **{"distill.teacher_system": SYSTEM})),
              log=lambda *_: None)
    ev = evaluate_run(str(tmp_path / "run"), max_prompts=2, max_new_tokens=3, ifeval="", log=lambda *_: None)
    h = ev["heldout"]
    assert h["tuned"]["kl_teacher"] == pytest.approx(s["after"]["eval_kl_teacher"], rel=1e-3)
    assert h["base"]["kl_teacher"] == pytest.approx(s["before"]["eval_kl_teacher"], rel=1e-3, abs=1e-6)
    assert h["teacher"]["loss"] == pytest.approx(s["after"]["eval_teacher_loss"], rel=1e-4)
    table = format_table(ev)
    assert "KL(teacher || model)" in table and "teacher (the base with" in table
    before, after = s["before"], s["after"]
    assert before["eval_kl_teacher"] >= 0 and after["eval_kl_teacher"] >= 0
    assert before["eval_teacher_loss"] == pytest.approx(after["eval_teacher_loss"])  # the base, shown the context
    assert s["last_train"]["kl_teacher"] > 0


def test_data_teacher_then_training_from_the_store(tiny_dir, tmp_path):
    """`slimtune data teacher` writes the store for data.train; training reads it with no teacher
    in memory; its held-out measures equal those of the same teacher in memory (the store covers
    every example of the file, so the held-out split too) up to the top k's tail."""
    from slimtune.cli import main

    teacher = save_tiny(tmp_path / "teacher", "chatml", hidden=48, seed=1)
    data = _data(tmp_path / "d.jsonl")
    store = tmp_path / "store"
    args = ["--set", f"model.name={tiny_dir}", "--set", "data.max_length=64"]
    assert main(["data", "teacher", data, "--teacher", teacher, "--top-k", "5", "--out", str(store), *args]) == 0
    assert json.loads((store / "manifest.json").read_text())["top_k"] == 5
    s = train(build_config({}, _args(tiny_dir, data, tmp_path / "run", **{"distill.teacher_logprobs": str(store)})),
              log=lambda *_: None)
    assert s["before"]["eval_teacher_loss"] is None  # a stored top k has no log-prob for every target
    assert s["after"]["eval_kl_teacher"] >= 0 and s["last_train"]["kl_teacher"] > 0


# ---------------------------------------------------------------------------------------------
# on-policy batches (distill.on_policy, GKD)


def _on_policy(tok, model=None, **distill):
    """On-policy distillation from `model` (in memory) or the teacher `distill` names."""
    return objective(tok, model, **{"teacher": "in-memory", "on_policy": 1.0, "max_new_tokens": 10, **distill})


def _answered(obj, model, rows, step=0):
    """The rows as begin_step makes them, for a step's first batch."""
    obj.cfg.train.output_dir = "/nonexistent"  # no samples written in these tests
    obj.dc.samples_every = 0
    return obj.begin_step(model, rows, step)


def test_an_on_policy_batch_holds_the_students_own_answers(tok, rows, monkeypatch):
    """The batch is prompt + what generate_many answers the chat's prompt (same settings and
    seeds), labels on the answer ids only, the end-of-turn token included where it stopped."""
    import slimtune.generate as G
    from slimtune.generate import generate_many, merged

    monkeypatch.setattr(G, "LEAN", False)  # the head's hook below must see every step (lean reads the weights)

    model = student(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    bias = torch.zeros(len(tok))
    bias[end] = 5.0  # make the random model stop now and then, so both ends occur
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        obj = _on_policy(tok, make_model(tok, hidden=48, seed=1), sample_temperature=1.3)
        got = _answered(obj, model, rows, step=3)
        with merged(model):
            want = generate_many(model, tok, [c[:-1] for c in CHATS], obj.settings(), seeds=obj.seeds(3, 0, len(CHATS)),
                                 return_ids=True)
    finally:
        hook.remove()
    assert {a["ended"] for a in want} == {True, False}
    for r, chat, w in zip(got, CHATS, want):
        prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        n = len(r["input_ids"]) - len(w["ids"])
        assert tok.decode(r["input_ids"][:n]) == prompt  # the data's prompt, its last answer gone
        assert r["input_ids"][n:] == w["ids"] and r["labels"] == [IGNORE] * n + w["ids"]
        assert (w["ids"][-1] == end) == w["ended"]
    batch = obj.collate(got, tok.pad_token_id)
    assert batch["on_policy"].all() and count_trained(got) == sum(len(w["ids"]) for w in want)


@pytest.mark.parametrize("tau,alpha", [(1.0, 0.0), (2.0, 0.5)])
def test_on_policy_loss_is_the_reverse_kl_of_a_float64_reference(tok, rows, tau, alpha):
    """tau^2 KL(student || teacher) on the answer tokens, no CE whatever alpha; gradients equal
    plain autograd's and reach the student's trainable parameters only."""
    model, teacher = student(tok), make_model(tok, hidden=48, seed=1)
    obj = _on_policy(tok, teacher, temperature=tau, alpha=alpha, direction="forward")  # direction: data batches
    got = _answered(obj, model, rows)
    batch = obj.collate(got, tok.pad_token_id)
    n = count_trained(got) + 3
    out = obj(model, batch, n, 0)
    out.loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    sel = batch["labels"][:, 1:] != IGNORE
    kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        zt = teacher(**kw).logits[:, :-1][sel].double()
    z = model(**kw).logits[:, :-1][sel].double()
    ref = div64((zt / tau).log_softmax(-1), (z / tau).log_softmax(-1), "reverse", 0.5).sum() * tau**2 / n
    ref.backward()
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-5)
    assert out.sums["kl_on"] == pytest.approx(float(ref) * n, rel=1e-5) and out.sums["ce"] == 0
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[k], p.grad, atol=1e-6, rtol=2e-4)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is read under no_grad
    row = obj.summarize(out.sums, n - 3, 0)
    assert row["on_policy"] == 1 and row["kl_on_policy"] == pytest.approx(float(ref) * n / (n - 3), rel=1e-5)
    assert row["kl_teacher"] is None and row["answer_length"] == (n - 3) / len(rows)


def test_on_policy_context_teacher_scores_the_answer_seeing_its_context(tok):
    """Context distillation on-policy: the base reads its own prompt (with the context) followed by
    the student's answer ids; the loss is the reverse KL against that."""
    model = student(tok)
    rows = [context_row(c, tok, SYSTEM, "Answer briefly.") for c in CHATS]
    obj = _on_policy(tok, None, teacher=None, teacher_system=SYSTEM, teacher_prefix="Answer briefly.")
    got = _answered(obj, model, rows)
    for r, chat in zip(got, CHATS):
        seen = tok.apply_chat_template(with_context(chat[:-1], SYSTEM, "Answer briefly."), tokenize=False,
                                       add_generation_prompt=True)
        n = len(r["teacher_input_ids"]) - len(r["answer_ids"])
        assert tok.decode(r["teacher_input_ids"][:n]) == seen and r["teacher_input_ids"][n:] == r["answer_ids"]
        assert trained_targets(r["labels"]) == trained_targets(r["teacher_labels"]) == r["answer_ids"]
    batch = obj.collate(got, tok.pad_token_id)
    n = count_trained(got)
    out = obj(model, batch, n, 0)
    t = collate([{"input_ids": r["teacher_input_ids"], "labels": r["teacher_labels"]} for r in got], tok.pad_token_id)
    with torch.no_grad(), adapters_disabled(model):
        kw = {k: v for k, v in t.items() if k in ("input_ids", "attention_mask")}
        zt = model(**kw).logits[:, :-1][t["labels"][:, 1:] != IGNORE].double()
    with torch.no_grad():
        kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        z = model(**kw).logits[:, :-1][batch["labels"][:, 1:] != IGNORE].double()
    ref = div64(zt.log_softmax(-1), z.log_softmax(-1), "reverse", 0.5).sum() / n
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-5)


def test_which_batches_are_on_policy_is_a_seeded_share(tok, rows):
    obj = objective(tok, None, teacher="in-memory", on_policy=0.5)
    picks = [obj.on_policy_batch(step, i) for step in range(300) for i in range(2)]
    assert 0.43 < sum(picks) / len(picks) < 0.57
    again = objective(tok, None, teacher="in-memory", on_policy=0.5)  # a re-run or a resumed one
    assert picks == [again.on_policy_batch(step, i) for step in range(300) for i in range(2)]
    other = build_config({"loss": {"objective": "distill"}, "train": {"seed": 1},
                          "distill": {"teacher": "in-memory", "on_policy": 0.5}})
    assert picks != [make_objective(other).on_policy_batch(step, i) for step in range(300) for i in range(2)]
    # begin_step: the step's k-th call is batch k; off-policy batches pass through untouched
    model = student(tok)
    obj.tokenizer, obj.teacher = tok, make_model(tok, hidden=48, seed=1)
    obj.dc.max_new_tokens, obj.dc.samples_every = 4, 0
    step = next(s for s in range(50) if obj.on_policy_batch(s, 0) != obj.on_policy_batch(s, 1))
    a, b = rows[:2], rows[2:]
    first, second = obj.begin_step(model, a, step), obj.begin_step(model, b, step)
    for got, given, i in ((first, a, 0), (second, b, 1)):
        assert (got is given) != obj.on_policy_batch(step, i)
    assert obj._pending["batches"] == 2 and obj._pending["on_batches"] == 1


def test_on_policy_prompts_and_refusals(tok, tmp_path):
    from slimtune.train.objectives.distill import answer_start

    ids, labels = render_chat(CHATS[2], tok)
    p = answer_start(labels)
    assert tok.decode(ids[:p]).endswith("Another<|im_end|>\n<|im_start|>assistant\n")
    assert answer_start([5, 6, 7]) == 0 and answer_start([IGNORE, IGNORE]) == 0
    with pytest.raises(ConfigError, match="distill.on_policy.*distill.teacher_logprobs"):
        build_config({"loss": {"objective": "distill"}, "distill": {"teacher_logprobs": "store", "on_policy": 0.5}})
    with pytest.raises(ConfigError, match=r"on_policy must be in \[0, 1\]"):
        build_config({"loss": {"objective": "distill"}, "distill": {"teacher": "t", "on_policy": 1.5}})
    data = _data(tmp_path / "d.jsonl")
    cfg = build_config({"loss": {"objective": "distill"}, "data": {"train": data, "train_on": "all", "cache": False},
                        "distill": {"teacher": "t", "on_policy": 0.5}})
    with pytest.raises(ConfigError, match="trained from their first token"):
        make_objective(cfg).prepare_data(tok)


def test_a_short_on_policy_run_trains_and_writes_samples(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    teacher = save_tiny(tmp_path / "teacher", "chatml", hidden=48, seed=1)
    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    s = train(build_config({}, _args(tiny_dir, data, out, **{
        "distill.teacher": teacher, "distill.on_policy": 1.0, "distill.max_new_tokens": 8,
        "distill.samples_every": 2})), log=lambda *_: None)
    last = s["last_train"]
    assert last["on_policy"] == 1.0 and math.isfinite(last["loss"]) and last["kl_on_policy"] > 0
    assert 1 <= last["answer_length"] <= 8 and last["kl_teacher"] is None
    weights = load_file(out / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in samples] == [0] * 4 + [2] * 4  # 3 steps, every 2nd: steps 0 and 2
    assert all(x["prompt"].endswith("<|im_start|>assistant\n") and 1 <= x["n_tokens"] <= 8 for x in samples)
