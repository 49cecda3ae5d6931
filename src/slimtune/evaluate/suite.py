"""`slimtune eval RUN`: held-out loss/ppl for base and tuned, KL to base, and style of answers.

    held-out examples --heldout_metrics--> loss, ppl (base: adapters off), KL(base || tuned)
    prompts --render_prompt--> generate (greedy) --style_metrics--> lists, headings, banned, tags ...

The held-out set is --data FILE, else the run's own split rebuilt from its config (same seed, so
the same examples training held out). Result: RUN/eval.json (or --out) and a table on stdout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import SlimtuneError
from ..utils import atomic_write_json

PROMPTS = "builtin:eval_prompts"


def heldout_examples(cfg, tokenizer, data: str | None = None) -> tuple[list[dict], list[dict], str]:
    """(held-out examples, general-prompt examples, where the held-out set came from)."""
    from ..data.formats import load_chats
    from ..data.prepare import prepare
    from ..data.tools import render_all

    kw = dict(train_on=cfg.data.train_on, max_length=cfg.data.max_length, train_reasoning=cfg.data.train_reasoning)
    general = []
    if cfg.data.general_prompts:
        general, _ = render_all(load_chats(cfg.data.general_prompts), tokenizer, source=cfg.data.general_prompts, **kw)
    if data:  # any source (file, folder, hf:), read with the run's data settings; rendering is cached
        from ..data.prepare import examples, render
        return examples(render(data, cfg.data, tokenizer), source=data)[0], general, data
    try:
        prepared = prepare(cfg.data, tokenizer, cfg.train.seed)
    except SlimtuneError as e:
        raise SlimtuneError(f"cannot rebuild the run's held-out split (data.train={cfg.data.train}): {e}. "
                            "Pass the held-out file with --data FILE") from None
    source = cfg.data.val or f"{cfg.data.train} (held-out split, val_fraction={cfg.data.val_fraction})"
    return prepared.val, general, source


PREF_KEYS = ("loss", "pref_accuracy", "pref_margin", "accuracy", "margin")


def preference_heldout(model, tok, cfg, ref, data: str | None, n_max: int | None, log) -> tuple[dict, list[dict]]:
    """A preference run's held-out pairs, base vs tuned: the objective's loss, the model's own
    preference accuracy and margin (mean per-token log-prob, chosen vs rejected), reward accuracy
    and margin; KL to base. Returns (heldout section, general-prompt examples)."""
    from ..data.formats import load_chats
    from ..data.preference import load_preferences
    from ..data.tools import render_all
    from ..runfolder import as_base
    from ..train.objectives import make_objective
    from ..train.preference import row_kind

    obj = make_objective(cfg)
    if data:
        rows, source = load_preferences(data, tok, row_kind(obj.name), cfg.data.max_length, cfg.data.system_prompt)[0], data
    else:
        try:
            rows = obj.prepare_data(tok, cfg.train.seed).val
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
    log(f"held-out preference metrics on {len(rows)} rows ...")
    bs = cfg.eval.batch_size
    tuned = obj.evaluate(model, rows, tok.pad_token_id, bs, ref_model=ref)
    with as_base(model, ref) as base:
        base_m = obj.evaluate(base, rows, tok.pad_token_id, bs, ref_model=ref, kl=False)
    pick = (lambda ev: {k: ev.get(f"eval_{k}") for k in PREF_KEYS})
    heldout.update(base=pick(base_m), tuned=pick(tuned), kl_to_base=tuned.get("eval_kl"))
    return heldout, general


def answer_all(model, tokenizer, chats: list, max_new_tokens: int, label: str = "") -> list[dict]:
    """Greedy answers to each chat (see generate.generate); a counter on stderr when `label`."""
    from ..generate import generate

    out = []
    for i, chat in enumerate(chats):
        out.append(generate(model, tokenizer, chat, max_new_tokens))
        if label:
            print(f"\r{label} {i + 1}/{len(chats)}", end="\n" if i + 1 == len(chats) else "",
                  file=sys.stderr, flush=True)
    return out


def evaluate_run(run: str, data: str | None = None, prompts: str | None = None, out: str | None = None,
                 max_prompts: int | None = None, max_new_tokens: int | None = None,
                 max_examples: int | None = None, dtype: str = "float32", log=None) -> dict:
    """Evaluate a run folder against its base; writes the result JSON and returns it (see module doc).

    Progress goes to `log` (default: stderr); `format_table(result)` is the readable table.
    """
    from .heldout import heldout_metrics
    from ..generate import last_user, load_prompts
    from ..runfolder import as_base, base_reference, load_run, run_kind
    from .style import style_metrics

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    if run_kind(run) is None:
        raise SlimtuneError(f"{run} is not a run folder (config.yaml + adapter or model): slimtune eval compares "
                            "a tuned run with its base; to try a plain model use slimtune chat")
    model, tok, cfg = load_run(run, dtype)
    ref = base_reference(model, cfg, dtype)
    pad = tok.pad_token_id
    bs, n_max = cfg.eval.batch_size, max_examples or cfg.eval.max_examples
    from ..train.preference import is_preference

    if is_preference(cfg.loss.objective):
        heldout, general = preference_heldout(model, tok, cfg, ref, data, n_max, log)
        examples = []
    else:
        examples, general, source = heldout_examples(cfg, tok, data)
        heldout = {"data": source, "examples": len(examples[:n_max] if n_max else examples)}
    if examples:
        log(f"held-out loss on {heldout['examples']} examples ...")
        tuned = heldout_metrics(model, examples, pad, cfg.loss, bs, n_max, kl=True, ref_model=ref)
        with as_base(model, ref) as base:
            base_m = heldout_metrics(base, examples, pad, cfg.loss, bs, n_max, kl=False)
        heldout.update(tokens=tuned["tokens"], base={"loss": base_m["loss"], "ppl": base_m["ppl"]},
                       tuned={"loss": tuned["loss"], "ppl": tuned["ppl"]}, kl_to_base=tuned["kl"])
    elif "base" not in heldout:
        log("no held-out examples: skipping held-out loss")
    if general:
        heldout["general_kl"] = heldout_metrics(model, general, pad, cfg.loss, bs, n_max, kl=True, ref_model=ref)["kl"]

    prompts = prompts or PROMPTS
    chats = load_prompts(prompts, max_prompts, cfg.data.system_prompt)
    n_new = max_new_tokens or cfg.eval.max_new_tokens
    tuned_answers = answer_all(model, tok, chats, n_new, "answering (tuned)")
    with as_base(model, ref) as base:
        base_answers = answer_all(base, tok, chats, n_new, "answering (base) ")
    banned = list(cfg.eval.banned_phrases)
    result = {
        "run": str(run), "model": cfg.model.name, "method": cfg.method.name,
        "heldout": heldout,
        "generation": {"prompts": prompts, "n_prompts": len(chats), "max_new_tokens": n_new, "temperature": 0.0,
                       "banned_phrases": banned,
                       "base": style_metrics(base_answers, banned), "tuned": style_metrics(tuned_answers, banned)},
        "samples": [{"prompt": last_user(c), "base": b["text"], "tuned": t["text"]}
                    for c, b, t in zip(chats, base_answers, tuned_answers)],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = Path(out) if out else Path(run) / "eval.json"
    atomic_write_json(path, result)
    log(f"wrote {path}")
    return result


ROWS = [  # (label, section, key, format)
    ("held-out loss", "heldout", "loss", "{:.4f}"),
    ("held-out perplexity", "heldout", "ppl", "{:.2f}"),
    ("preference accuracy (own log-probs)", "heldout", "pref_accuracy", "{:.0%}"),
    ("preference margin (nats/token)", "heldout", "pref_margin", "{:+.3f}"),
    ("reward accuracy (vs base)", "heldout", "accuracy", "{:.0%}"),
    ("reward margin", "heldout", "margin", "{:+.4f}"),
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
    ("generation tokens/s", "style", "tokens_per_s", "{:.1f}"),
]


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    """(label, base, tuned) strings for every metric; '-' where it does not apply."""
    h, g = result["heldout"], result["generation"]
    rows = []
    for label, section, key, fmt in ROWS:
        if section == "heldout":
            if key in ("kl_to_base", "general_kl"):
                vals = (None, h.get(key))  # the base's KL to itself is 0
            else:
                vals = (h.get("base", {}).get(key), h.get("tuned", {}).get(key))
        else:
            vals = (g["base"].get(key), g["tuned"].get(key))
        if key in PREF_KEYS[1:] and all(v is None for v in vals):
            continue  # preference rows only for preference runs
        rows.append((label, *("-" if v is None else fmt.format(v) for v in vals)))
    return rows


def format_table(result: dict) -> str:
    g = result["generation"]
    lines = [f"{result['run']}  ({result['method']} on {result['model']})",
             f"held-out: {result['heldout']['data']}, {result['heldout']['examples']} examples; "
             f"answers: {g['n_prompts']} prompts from {g['prompts']}, greedy, <= {g['max_new_tokens']} new tokens",
             "", f"{'metric':<34}{'base':>10}{'tuned':>10}", "-" * 54]
    lines += [f"{label:<34}{b:>10}{t:>10}" for label, b, t in table_rows(result)]
    return "\n".join(lines)
