"""`slimtune eval RUN`: held-out loss/ppl for base and tuned, KL to base, and what the answers do.

    held-out examples --heldout_metrics--> loss, ppl (base: adapters off), KL(base || tuned)
    prompts + IFEval prompts --generate (batched; base answers cached)--> answers
        --style / repetition--> lists, headings, banned, tags, loops, distinct-n ...
        --ifeval--> instruction-following pass rates
        --judge (optional)--> which answer an LLM judge prefers

The held-out set is --data FILE, else the run's own split rebuilt from its config (same seed, so
the same examples training held out). Result: RUN/eval.json (or --out), per-sample rows in
RUN/eval_samples.jsonl, and a table on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..data.formats import with_system
from ..data.preference import load_preferences
from ..data.prepare import examples, prepare, render
from ..data.prompts import last_user, load_prompts
from ..data.reader import load_chats
from ..data.tools import render_all
from ..errors import SlimtuneError
from ..generate import settings_for
from ..methods import method_of
from ..readback import read_json
from ..runfolder import as_base, run_kind, weights_digest
from ..specs import SPECS, spec_for
from ..train.base_states import base_states
from ..train.heldout import base_loss_from_states, heldout_metrics
from ..train.objectives import make_objective
from ..utils import atomic_write_json, atomic_write_text
from .base_vs_tuned import BaseVsTuned
from .ifeval import CHECKERS, ifeval_metrics, load_ifeval, sample_ifeval
from .judge import judge_pairs
from .repetition import repetition_metrics, sample_repetition
from .style import banned_hits, has_code_block, has_heading, has_list, stray_tags, style_metrics

PROMPTS = "builtin:eval_prompts"


def heldout_examples(cfg, tokenizer, data: str | None = None) -> tuple[list[dict], list[dict], str]:
    """(held-out examples, general-prompt examples, where the held-out set came from)."""

    kw = dict(train_on=cfg.data.train_on, max_length=cfg.data.max_length, train_reasoning=cfg.data.train_reasoning)
    general = []
    if cfg.data.general_prompts:
        general, _ = render_all(load_chats(cfg.data.general_prompts), tokenizer, source=cfg.data.general_prompts, **kw)
    if data:  # any source (file, folder, hf:), read with the run's data settings; rendering is cached
        return examples(render(data, cfg.data, tokenizer), source=data)[0], general, data
    try:
        prepared = prepare(cfg.data, tokenizer, cfg.data.data_seed(cfg.train.seed))
    except SlimtuneError as e:
        raise SlimtuneError(f"cannot rebuild the run's held-out split (data.train={cfg.data.train}): {e}. "
                            "Pass the held-out file with --data FILE") from None
    source = cfg.data.val or f"{cfg.data.train} (held-out split, val_fraction={cfg.data.val_fraction})"
    return prepared.val, general, source


def _measured_these_weights(pair, n_max: int | None, dtype: str) -> dict | None:
    """The run's summary.json when its final evaluation measured the weights now in the folder
    (sha256) with the settings eval would use (dtype, device, no autocast, example count, batch size,
    general prompts); else None."""

    cfg, run = pair.cfg, Path(pair.run)
    try:
        summary = read_json(run / "summary.json", "eval recomputes without it: pass --recompute")
    except (OSError, ValueError):
        return None
    ctx = summary.get("final_eval") or {}
    device = next(pair.model.parameters()).device.type
    same = (ctx.get("dtype") == dtype and ctx.get("device") == device and ctx.get("mixed_precision") == "no"
            and ctx.get("max_examples") == n_max and ctx.get("batch_size") == cfg.eval.batch_size
            and ctx.get("general_prompts") == cfg.data.general_prompts)
    return summary if same and ctx.get("weights_sha256") == weights_digest(run) else None


def training_heldout(pair, examples: list[dict], general: list[dict], states, n_max: int | None,
                     dtype: str) -> dict | None:
    """The held-out section from training's final evaluation, or None when it cannot stand for a new
    measurement: the run's own split (not --data), the weights file unchanged since (sha256), the
    same dtype, device type, example count and batch size, no autocast, and the base's states for
    those batches on disk (they give the base's loss without a forward pass).

    Equal to measuring again up to float rounding: training evaluated with the adapter unmerged,
    `slimtune eval` merges it (tests/evaluate/test_suite.py compares the two)."""

    cfg = pair.cfg
    summary = _measured_these_weights(pair, n_max, dtype)
    after = (summary or {}).get("after") or {}
    if (summary is None or summary.get("objective") not in SPECS or SPECS[summary["objective"]].evaluation != "heldout"
            or None in (after.get("eval_loss"), after.get("eval_kl"))
            or (after.get("general_kl") is None and general)):
        return None
    ctx = summary["final_eval"]
    base = base_loss_from_states(pair.model, examples, pair.tok.pad_token_id, cfg.loss, cfg.eval.batch_size,
                                 n_max, states, pair.ref)
    if base is None:
        return None
    out = {"tokens": base["tokens"], "base": {"loss": base["base_loss"], "ppl": base["base_ppl"]},
           "tuned": {"loss": after["eval_loss"], "ppl": after["eval_ppl"]}, "kl_to_base": after["eval_kl"],
           "from_training": {"step": ctx.get("step"), "weights_sha256": ctx["weights_sha256"]}}
    if general:
        out["general_kl"] = after["general_kl"]
    return out


PREF_KEYS = ("loss", "pref_accuracy", "pref_margin", "accuracy", "margin")


def preference_heldout(pair, data: str | None, n_max: int | None, log, dtype: str = "float32",
                       reuse: bool = True) -> tuple[dict, list[dict]]:
    """A preference run's held-out pairs, base vs tuned: the objective's loss, the model's own
    preference accuracy and margin (mean per-token log-prob, chosen vs rejected), reward accuracy
    and margin; KL to base. Returns (heldout section, general-prompt examples still to measure).

    reuse: training evaluated the base (step 0, where the adapter is the identity) and these same
    weights (its final evaluation) on the same held-out rows; take those numbers when the weights
    file is the one it measured, with the same settings (as `training_heldout` for SFT)."""
    model, tok, cfg, ref = pair.model, pair.tok, pair.cfg, pair.ref

    obj = make_objective(cfg)
    if data:
        rows, source = load_preferences(data, tok, obj.spec.rows, cfg.data.max_length, cfg.data.system_prompt)[0], data
    else:
        try:
            rows = obj.prepare_data(tok, cfg.data.data_seed(cfg.train.seed)).val
        except SlimtuneError as e:
            raise SlimtuneError(f"cannot rebuild the run's held-out pairs (data.train={cfg.data.train}): {e}. "
                                "Pass the held-out file with --data FILE") from None
        source = cfg.data.val or f"{cfg.data.train} (held-out split, val_fraction={cfg.data.val_fraction})"
    general = []
    if cfg.data.general_prompts:
        general, _ = render_all(load_chats(cfg.data.general_prompts), tok, source=cfg.data.general_prompts,
                                train_on=cfg.data.train_on, max_length=cfg.data.max_length)
    rows = rows[:n_max] if n_max else rows
    heldout = {"data": source, "examples": len(rows), "objective": obj.name}
    if not rows:
        return heldout, general
    summary = _measured_these_weights(pair, n_max, dtype) if reuse and not data else None
    before, after = (summary or {}).get("before") or {}, (summary or {}).get("after") or {}
    if (summary and not method_of(cfg.method.name).adds_positions  # at step 0 the model was the base
            and before.get("eval_pref_accuracy") is not None and after.get("eval_pref_accuracy") is not None
            and (after.get("general_kl") is not None or not general)):
        log("held-out preference metrics: training's evaluations of the base (step 0) and of these same "
            "weights (--recompute measures again)")
        pick = (lambda ev: {k: ev.get(f"eval_{k}") for k in PREF_KEYS})
        base = pick(before)
        if obj.uses_reference:  # the base is its own reference: its rewards are 0 by definition (step 0's
            base.update({k: 0.0 for k in ("accuracy", "margin") if base[k] is not None})  # differ by rounding)
        heldout.update(base=base, tuned=pick(after), kl_to_base=after.get("eval_kl"),
                       from_training={"step": summary["final_eval"].get("step"),
                                      "weights_sha256": summary["final_eval"]["weights_sha256"]})
        if general:
            heldout["general_kl"] = after["general_kl"]
        return heldout, []
    log(f"held-out preference metrics on {len(rows)} rows ...")
    bs = cfg.eval.batch_size
    tuned = obj.evaluate(model, rows, tok.pad_token_id, bs, ref_model=ref)
    with as_base(model, ref) as base:
        base_m = obj.evaluate(base, rows, tok.pad_token_id, bs, ref_model=ref, kl=False)
    pick = (lambda ev: {k: ev.get(f"eval_{k}") for k in PREF_KEYS})
    heldout.update(base=pick(base_m), tuned=pick(tuned), kl_to_base=tuned.get("eval_kl"))
    return heldout, general


DISTILL_KEYS = ("kl_teacher", "agreement")


def distill_heldout(pair, data: str | None, n_max: int | None, log) -> tuple[dict, list[dict]]:
    """A distillation run's held-out chats: the base, the student (tuned) and the teacher side by
    side: CE and perplexity, KL(teacher || model) and greedy next-token agreement with the teacher.
    Returns (heldout section, general-prompt examples still to measure)."""
    import copy


    model, tok, cfg, ref = pair.model, pair.tok, pair.cfg, pair.ref
    if data:  # every chat of the file, rendered as the run's data (and context) settings say
        cfg = copy.deepcopy(cfg)
        cfg.data.train, cfg.data.val, cfg.data.val_fraction, cfg.data.max_examples = data, None, 0.0, None
    obj = make_objective(cfg)
    try:
        prepared = obj.prepare_data(tok, cfg.data.data_seed(cfg.train.seed))
    except SlimtuneError as e:
        raise SlimtuneError(f"cannot rebuild the run's held-out chats (data.train={cfg.data.train}): {e}") from None
    rows = prepared.train if data else prepared.val
    source = data or cfg.data.val or f"{cfg.data.train} (held-out split, val_fraction={cfg.data.val_fraction})"
    log(f"held-out distillation metrics on {len(rows[:n_max] if n_max else rows)} chats (student, base, teacher) ...")
    cache: dict = {}  # the teacher's states: computed on the first pass, reused by the second
    bs = cfg.eval.batch_size
    tuned = obj.evaluate(model, rows, tok.pad_token_id, bs, ref_model=ref, max_examples=n_max, ref_cache=cache)
    with as_base(model, ref) as base:
        base_m = obj.evaluate(base, rows, tok.pad_token_id, bs, ref_model=ref, max_examples=n_max, ref_cache=cache)
    pick = (lambda ev: {"loss": ev.get("eval_loss"), "ppl": ev.get("eval_ppl"),
                        **{k: ev.get(f"eval_{k}") for k in DISTILL_KEYS}})
    heldout = {"data": source, "examples": len(rows[:n_max] if n_max else rows), "objective": obj.name,
               "base": pick(base_m), "tuned": pick(tuned),
               "teacher": {"loss": tuned.get("eval_teacher_loss"), "ppl": tuned.get("eval_teacher_ppl"),
                           "what": cfg.distill.teacher or cfg.distill.teacher_logprobs or "the base with distill.teacher_system / teacher_prefix"}}
    general = []
    if cfg.data.general_prompts:
        general, _ = render_all(load_chats(cfg.data.general_prompts), tok, source=cfg.data.general_prompts,
                                train_on=cfg.data.train_on, max_length=cfg.data.max_length)
    return heldout, general


RL_KEYS = ("reward", "length", "ended")


def rl_heldout(pair, n_max: int | None, log, dtype: str = "float32", reuse: bool = True) -> dict:
    """An RL run's held-out prompts answered greedily by base and tuned: the mean reward (the run's
    grpo.rewards), answer length and ended share (`Objective.evaluate`). reuse: training's
    evaluations of the base (step 0) and of these same weights, when the weights file is the one
    it measured with the same settings."""

    cfg = pair.cfg
    obj = make_objective(cfg)
    try:
        rows = obj.prepare_data(pair.tok, cfg.data.data_seed(cfg.train.seed)).val
    except SlimtuneError as e:
        raise SlimtuneError(f"cannot rebuild the run's held-out prompts (data.train={cfg.data.train}): {e}") from None
    rows = rows[:n_max] if n_max else rows
    source = cfg.data.val or f"{cfg.data.train} (held-out split, val_fraction={cfg.data.val_fraction})"
    heldout = {"data": source, "examples": len(rows), "objective": obj.name}
    if not rows:
        return heldout
    pick = (lambda ev: {k: ev.get(f"eval_{k}") for k in RL_KEYS} | {
        k[len("eval_"):]: v for k, v in ev.items() if k.startswith("eval_reward/")})
    summary = _measured_these_weights(pair, n_max, dtype) if reuse else None
    before, after = (summary or {}).get("before") or {}, (summary or {}).get("after") or {}
    if summary and not method_of(cfg.method.name).adds_positions and "eval_reward" in before and "eval_reward" in after:
        log("held-out rewards: training's evaluations of the base (step 0) and of these same weights")
        heldout.update(base=pick(before), tuned=pick(after), from_training={
            "step": summary["final_eval"].get("step"), "weights_sha256": summary["final_eval"]["weights_sha256"]})
        return heldout
    log(f"held-out rewards on {len(rows)} prompts (greedy, base and tuned) ...")
    tuned = obj.evaluate(pair.model, rows, pair.tok.pad_token_id, cfg.eval.batch_size)
    with as_base(pair.model, pair.ref) as base:
        base_m = obj.evaluate(base, rows, pair.tok.pad_token_id, cfg.eval.batch_size)
    heldout.update(base=pick(base_m), tuned=pick(tuned))
    return heldout


def evaluate_run(run: str, data: str | None = None, prompts: str | None = None, out: str | None = None,
                 max_prompts: int | None = None, max_new_tokens: int | None = None,
                 max_examples: int | None = None, dtype: str = "float32", log=None, ifeval: str | None = None,
                 judge: str | None = None, judge_model: str | None = None, judge_max_tokens: int = 16,
                 use_cache: bool = True, with_heldout: bool = True, reuse: bool = True, **knobs) -> dict:
    """Evaluate a run folder against its base; writes the result JSON and RUN/eval_samples.jsonl
    (beside `out`) and returns the result (see module doc).

    with_heldout=False skips the held-out loss and KL (a sweep reads them from each run's summary, where
    training's final evaluation put them). reuse: take the tuned held-out loss and both KLs from that
    final evaluation when it measured these same weights the same way (`training_heldout`); the
    base's loss then comes from the base states training left on disk. False measures all again.
    ifeval: IFEval-style prompts (default: the run's eval.ifeval; "" skips them). judge: an
    OpenAI-compatible URL that picks the better of base / tuned per prompt (off by default).
    knobs: top_p, top_k, repetition_penalty, no_repeat_ngram_size, temperature (None: the run's
    eval settings). Progress goes to `log` (default: stderr); `format_table(result)` is the table.
    """

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    if run_kind(run) is None:
        raise SlimtuneError(f"{run} is not a run folder (config.yaml + adapter or model): slimtune eval compares "
                            "a tuned run with its base; to try a plain model use slimtune chat")
    if judge and not judge_model:
        raise SlimtuneError("--judge needs --judge-model NAME (the model the endpoint should use)")
    pair = BaseVsTuned(run, dtype)
    model, tok, cfg = pair.model, pair.tok, pair.cfg
    ref = pair.ref
    pad = tok.pad_token_id
    bs, n_max = cfg.eval.batch_size, max_examples or cfg.eval.max_examples

    if not with_heldout:
        examples, general, heldout = [], [], {"data": None, "examples": 0, "skipped": True}
    elif spec_for(cfg.loss.objective, cfg.loss.kl_lambda).evaluation == "distill":
        heldout, general = distill_heldout(pair, data, n_max, log)
        examples = []
    elif spec_for(cfg.loss.objective, cfg.loss.kl_lambda).evaluation == "preference":
        heldout, general = preference_heldout(pair, data, n_max, log, dtype, reuse)
        examples = []
    elif spec_for(cfg.loss.objective, cfg.loss.kl_lambda).evaluation == "rl":
        heldout, general, examples = rl_heldout(pair, n_max, log, dtype, reuse), [], []
        if ifeval is None and not cfg.eval.ifeval:  # what RL on instructions is for: always shown
            ifeval = "builtin:ifeval_prompts"
    else:
        examples, general, source = heldout_examples(cfg, tok, data)
        heldout = {"data": source, "examples": len(examples[:n_max] if n_max else examples)}
    # the base's hidden states for KL and base loss: training's evaluations left them on disk
    states = base_states(cfg.model.name, dtype, str(next(model.parameters()).device),
                         method_of(cfg.method.name).four_bit)
    reused = training_heldout(pair, examples, general, states, n_max, dtype) if examples and reuse else None
    if reused:
        log("held-out loss and KL: training's final evaluation of these same weights (--recompute measures again)")
        heldout.update(reused)
        general = []
    elif examples:
        log(f"held-out loss on {heldout['examples']} examples ...")
        tuned = heldout_metrics(model, examples, pad, cfg.loss, bs, n_max, kl=True, ref_model=ref,
                                ref_cache=states, base_loss=True, merge=True)
        heldout.update(tokens=tuned["tokens"], base={"loss": tuned["base_loss"], "ppl": tuned["base_ppl"]},
                       tuned={"loss": tuned["loss"], "ppl": tuned["ppl"]}, kl_to_base=tuned["kl"])
    elif "base" not in heldout and not heldout.get("skipped"):
        log("no held-out examples: skipping held-out loss")
    if general:
        heldout["general_kl"] = heldout_metrics(model, general, pad, cfg.loss, bs, n_max, kl=True, ref_model=ref,
                                                ref_cache=states, merge=True)["kl"]
    t_heldout = time.perf_counter() - t0

    prompts = prompts or PROMPTS
    chats = load_prompts(prompts, max_prompts, cfg.data.system_prompt)
    ifeval = cfg.eval.ifeval if ifeval is None else ifeval
    if_rows = load_ifeval(ifeval) if ifeval else []
    if_chats = [with_system([{"role": "user", "content": r["prompt"]}], cfg.data.system_prompt) for r in if_rows]
    settings = settings_for(cfg, max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens, **knobs)
    everything = chats + if_chats  # one stream of batches: eval prompts and IFEval prompts together
    gb = cfg.eval.gen_batch_size
    t1 = time.perf_counter()
    base_all, tuned_all = pair.answer_both(everything, settings, gb, use_cache,
                                           _counter(f"answering {len(everything)} prompts (base and tuned)"))
    t2 = time.perf_counter()
    n = len(chats)
    sides = {"base": base_all, "tuned": tuned_all}
    banned = list(cfg.eval.banned_phrases)
    generation = {"prompts": prompts, "n_prompts": n, **settings.to_dict(), "banned_phrases": banned,
                  "base_cached": all(a.get("cached") for a in base_all) if base_all else False}
    for side, ans in sides.items():
        generation[side] = {**style_metrics(ans[:n], banned), **repetition_metrics(ans[:n])}
    result = {
        "run": str(run), "model": cfg.model.name, "method": cfg.method.name,
        "heldout": heldout,
        "generation": generation,
        "ifeval": ({"prompts_file": ifeval, **{side: ifeval_metrics(if_rows, ans[n:]) for side, ans in sides.items()}}
                   if if_rows else None),
        "samples": [{"prompt": last_user(c), "base": b["text"], "tuned": t["text"]}
                    for c, b, t in zip(chats, base_all, tuned_all)],
    }
    rows = sample_rows(chats, if_rows, base_all, tuned_all, banned)
    if judge:

        verdicts = judge_pairs(judge, judge_model, rows, log=log, max_tokens=judge_max_tokens)
        result["judge"] = verdicts["summary"]
        for row, v in zip(rows, verdicts["per_sample"]):
            row["judge"] = v
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["timing"] = {"heldout_s": round(t_heldout, 1), "answers_s": round(t2 - t1, 1),
                        "answers": len(everything), "base_cached": generation["base_cached"]}
    path = Path(out) if out else Path(run) / "eval.json"
    atomic_write_json(path, result)
    samples_path = path.with_name("eval_samples.jsonl") if path.name == "eval.json" \
        else path.with_name(path.stem + "_samples.jsonl")
    atomic_write_text(samples_path, "".join(json.dumps(r) + "\n" for r in rows))
    log(f"wrote {path} and {samples_path}")
    return result


def sample_rows(chats, if_rows, base_all, tuned_all, banned) -> list[dict]:
    """One row per prompt for eval_samples.jsonl: the prompt, both answers and every per-answer metric."""

    rows = []
    for i, (b, t) in enumerate(zip(base_all, tuned_all)):
        chat = (chats + [None] * len(if_rows))[i]
        row = {"set": "eval" if i < len(chats) else "ifeval"}
        if chat is not None:
            row["prompt"] = last_user(chat)
        else:
            r = if_rows[i - len(chats)]
            row.update(id=r["id"], prompt=r["prompt"], constraints=r["constraints"])
        for side, a in (("base", b), ("tuned", t)):
            m = {**per_answer_style(a, banned), **sample_repetition(a)}
            if chat is None:
                oks = sample_ifeval(a["text"], row["constraints"])
                m.update(ifeval_pass=oks, ifeval_all=all(oks))
            row[side] = {"text": a["text"], "n_tokens": a["n_tokens"], "ended": a["ended"],
                         "cached": bool(a.get("cached")), **m}
        rows.append(row)
    return rows


def per_answer_style(answer: dict, banned) -> dict:
    t = answer["text"]
    return {"list": has_list(t), "heading": has_heading(t), "code_block": has_code_block(t),
            "banned": banned_hits(t, list(banned)), "stray_tags": stray_tags(t)}


def _counter(label: str):
    return lambda done, total: print(f"\r{label} {done}/{total}", end="\n" if done == total else "",
                                     file=sys.stderr, flush=True)


ROWS = [  # (label, section, key, format)
    ("held-out loss", "heldout", "loss", "{:.4f}"),
    ("held-out perplexity", "heldout", "ppl", "{:.2f}"),
    ("preference accuracy (own log-probs)", "heldout", "pref_accuracy", "{:.0%}"),
    ("preference margin (nats/token)", "heldout", "pref_margin", "{:+.3f}"),
    ("reward accuracy (vs base)", "heldout", "accuracy", "{:.0%}"),
    ("reward margin", "heldout", "margin", "{:+.4f}"),
    ("KL(teacher || model), held-out", "heldout", "kl_teacher", "{:.4g}"),
    ("greedy next token = the teacher's", "heldout", "agreement", "{:.1%}"),
    ("held-out mean reward (greedy)", "heldout", "reward", "{:.3f}"),
    ("held-out answers ended", "heldout", "ended", "{:.0%}"),
    ("held-out answer length (tokens)", "heldout", "length", "{:.1f}"),
    ("KL to base, held-out", "heldout", "kl_to_base", "{:.4g}"),
    ("KL to base, general prompts", "heldout", "general_kl", "{:.4g}"),
    ("answers with lists", "style", "list_share", "{:.0%}"),
    ("answers with headings", "style", "heading_share", "{:.0%}"),
    ("answers with code blocks", "style", "code_block_share", "{:.0%}"),
    ("answers with banned phrases", "style", "banned_share", "{:.0%}"),
    ("banned-phrase hits", "style", "banned_hits", "{:d}"),
    ("answers with stray template tags", "style", "stray_tag_share", "{:.0%}"),
    ("mean length (tokens)", "style", "mean_tokens", "{:.1f}"),
    ("ended with end-of-turn", "style", "ended_share", "{:.0%}"),
    ("answers caught in a loop", "style", "loop_share", "{:.0%}"),
    ("hit the token limit", "style", "hit_limit_share", "{:.0%}"),
    ("distinct-1 (unique words)", "style", "distinct_1", "{:.3f}"),
    ("distinct-2 (unique word pairs)", "style", "distinct_2", "{:.3f}"),
    ("longest repeated span, mean (words)", "style", "longest_repeat_mean", "{:.1f}"),
    ("longest repeated span, max (words)", "style", "longest_repeat_max", "{:d}"),
    ("generation tokens/s (batch)", "style", "tokens_per_s", "{:.1f}"),
    ("IFEval prompts passed (all constraints)", "ifeval", "prompt_pass", "{:.0%}"),
    ("IFEval constraints passed", "ifeval", "constraint_pass", "{:.0%}"),
    ("judge prefers (win rate, ties half)", "judge", "win_rate", "{:.0%}"),
]


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    """(label, base, tuned) strings for every metric that was measured; '-' where it does not apply.

    IFEval adds one row per constraint type ("IFEval: <name> (n)") after its two summary rows.
    """

    h, g, ife, judge = result["heldout"], result["generation"], result.get("ifeval"), result.get("judge")
    rows = []
    for label, section, key, fmt in ROWS:
        if section == "heldout":
            if key in ("kl_to_base", "general_kl"):
                vals = (None, h.get(key))  # the base's KL to itself is 0
            else:
                vals = (h.get("base", {}).get(key), h.get("tuned", {}).get(key))
        elif section == "style":
            vals = (g["base"].get(key), g["tuned"].get(key))
        elif section == "ifeval":
            if not ife:
                continue
            vals = (ife["base"].get(key), ife["tuned"].get(key))
        else:
            if not judge:
                continue
            vals = (judge["base_win_rate"], judge["tuned_win_rate"])
        if key in PREF_KEYS[1:] + DISTILL_KEYS + RL_KEYS and all(v is None for v in vals):
            continue  # preference rows only for preference runs, teacher rows for distillation, reward rows for RL
        if section != "style" or any(v is not None for v in vals):  # older eval.json: no repetition keys
            rows.append((label, *("-" if v is None else fmt.format(v) for v in vals)))
        if section == "judge" and judge.get("unread_share"):  # they count as ties: say how many
            rows.append(("  judge replies with no verdict", "", f"{judge['unread_share']:.0%}"))
        if section == "ifeval" and key == "constraint_pass":
            for t, by in ife["tuned"]["by_type"].items():
                b = ife["base"]["by_type"].get(t, {}).get("pass")
                rows.append((f"  IFEval: {CHECKERS[t][1]} ({by['n']})", "-" if b is None else f"{b:.0%}",
                             f"{by['pass']:.0%}"))
    return rows


def format_table(result: dict) -> str:
    g = result["generation"]
    how = "greedy" if not g.get("temperature") else f"temperature {g['temperature']}"
    ife = result.get("ifeval")
    lines = [f"{result['run']}  ({result['method']} on {result['model']})",
             f"held-out: {result['heldout']['data']}, {result['heldout']['examples']} examples; "
             f"answers: {g['n_prompts']} prompts from {g['prompts']}, {how}, <= {g['max_new_tokens']} new tokens"
             + (f"; IFEval: {ife['tuned']['prompts']} prompts" if ife else "")
             + ("; base answers from the cache" if g.get("base_cached") else "")
             + ("; held-out tuned loss and KL from training's final evaluation (same weights)"
                if result["heldout"].get("from_training") else ""),
             "", f"{'metric':<44}{'base':>10}{'tuned':>10}", "-" * 64]
    lines += [f"{label:<44}{b:>10}{t:>10}" for label, b, t in table_rows(result)]
    teacher = result["heldout"].get("teacher")
    if teacher:  # distillation: the teacher's own column, beside base and tuned
        fmt = (lambda v, spec: "-" if v is None else spec.format(v))
        lines += [f"teacher ({teacher['what']}): held-out loss {fmt(teacher['loss'], '{:.4f}')}, "
                  f"perplexity {fmt(teacher['ppl'], '{:.2f}')}"]
    if result.get("seconds") is not None:
        lines += ["", f"took {result['seconds']:.1f} s"]
    return "\n".join(lines)
