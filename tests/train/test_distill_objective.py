"""loss.objective=distill on tiny models: a step's loss and gradients equal a float64 full-logit
reference (student and a teacher of another width and other weights), only trainable parameters
move, the stored top k equals the teacher in memory, a foreign vocabulary is refused, context
distillation aligns the answer tokens of the two renderings, and a short run trains and evaluates."""

import json

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
