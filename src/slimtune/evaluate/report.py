"""`slimtune report RUN`: PNG plots of the training log and one self-contained HTML page.

    train_log.jsonl --matplotlib (Agg)--> RUN/plots/{loss,kl,lr,throughput}.png
    config.yaml + summary.json + eval.json + plots + samples --> RUN/report.html (images inlined)

Samples come from compare.json (`slimtune compare`), else eval.json (`slimtune eval`), else a few
are generated now.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import sys
from pathlib import Path

import yaml

from ..data.prompts import last_user, load_prompts
from ..errors import SlimtuneError
from ..generate import settings_for
from ..readback import read_json
from ..utils import atomic_write_text
from .base_vs_tuned import BaseVsTuned
from .suite import PROMPTS, table_rows

PLOTS = {  # file stem: (title, y label, [(log field, legend, marker)])
    "loss": ("Loss", "cross-entropy per trained token",
             [("loss", "training loss", ""), ("ce", "training CE (without KL term)", ""),
              ("eval_loss", "held-out loss", "o")]),
    "kl": ("KL to base", "KL(base || tuned) per token",
           [("eval_kl", "held-out", "o"), ("general_kl", "general prompts", "s"), ("kl", "training batches", "")]),
    # preference objectives (train/objectives/paired.py, kto.py): drawn only when the log has these fields
    "rewards": ("Preference rewards", "implicit reward (beta x log-ratio)",
                [("rewards_chosen", "chosen", ""), ("rewards_rejected", "rejected", ""), ("margin", "margin", ""),
                 ("eval_margin", "held-out margin", "o")]),
    "preference": ("Preference accuracy", "share of pairs",
                   [("accuracy", "reward accuracy (training batches)", ""),
                    ("eval_accuracy", "reward accuracy (held-out)", "o"),
                    ("eval_pref_accuracy", "own log-probs prefer chosen (held-out)", "s")]),
    # RL objectives (train/objectives/grpo.py)
    "rl_reward": ("RL rewards", "mean reward of the step's completions",
                  [("reward", "total (sampled)", ""), ("eval_reward", "held-out (greedy)", "o")]),
    "rl_signal": ("RL signal", "share",
                  [("no_signal", "groups with all rewards equal (no gradient)", ""),
                   ("truncated", "completions cut by max_new_tokens", ""), ("clip_region", "clipped tokens", "")]),
    "lr": ("Learning rate", "lr", [("lr", "learning rate", "")]),
    "throughput": ("Throughput", "trained tokens / s", [("tokens_per_s", "tokens/s (running mean)", "")]),
}


def read_log(run: Path) -> list[dict]:
    path = run / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def make_plots(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """One PNG per entry of PLOTS that has data; {stem: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for stem, (title, ylabel, series) in PLOTS.items():
        drawn = []
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for field, legend, marker in series:
            pts = [(r["step"], r[field]) for r in rows if r.get(field) is not None]
            if stem == "loss" and field == "ce" and all(r.get("kl") is None for r in rows):
                continue  # plain SFT: CE is the loss
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=marker or None, markersize=4, linewidth=1.5, label=legend)
                drawn.append(field)
        if drawn:
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=8)
            fig.tight_layout()
            made[stem] = out_dir / f"{stem}.png"
            fig.savefig(made[stem])
        plt.close(fig)
    return made


def gather_samples(run: Path, n: int, max_new_tokens: int | None, log) -> tuple[list[dict], str]:
    """[{prompt, base, tuned}] and where they came from."""
    cmp_json, eval_json = run / "compare.json", run / "eval.json"
    if cmp_json.is_file():
        res = read_json(cmp_json, "run `slimtune compare` again to rewrite it")
        base = next((c for c in res["columns"] if c.startswith("base")), None)
        tuned = next((c for c in res["columns"] if not c.startswith("base")), None)
        rows = [{"prompt": r["prompt"], "base": r["greedy"].get(base, ""), "tuned": r["greedy"].get(tuned, ""),
                 "sampled_base": r["sampled"].get(base), "sampled_tuned": r["sampled"].get(tuned)}
                for r in res["rows"]]
        return rows, f"compare.json (greedy, and sampled at temperature {res['temperature']})"
    if eval_json.is_file():
        return read_json(eval_json, "run `slimtune eval` again to rewrite it").get("samples", []), "eval.json (greedy)"
    if n <= 0:
        return [], "none"

    log(f"generating {n} base-vs-tuned samples (run slimtune compare for more) ...")
    pair = BaseVsTuned(str(run))
    cfg = pair.cfg
    chats = load_prompts(PROMPTS, n, cfg.data.system_prompt)
    settings = settings_for(cfg, max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens)
    based, tuned = pair.answer_both(chats, settings, cfg.eval.gen_batch_size)
    return ([{"prompt": last_user(c), "base": b["text"], "tuned": t["text"]} for c, b, t in zip(chats, based, tuned)],
            "generated for this report (greedy)")


def make_report(run: str, out: str | None = None, samples: int = 3, max_new_tokens: int | None = None,
                log=None) -> Path:
    """Write RUN/plots/*.png and the HTML report (default RUN/report.html); returns its path."""

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    run_p = Path(run)
    if not (run_p / "config.yaml").is_file():
        raise SlimtuneError(f"{run} is not a run folder (no config.yaml)")
    load = (lambda name: read_json(run_p / name, "run the command that wrote it again (train, eval)")
            if (run_p / name).is_file() else None)
    summary, ev, times, data_stats = load("summary.json"), load("eval.json"), load("time_metrics.json"), \
        load("data_stats.json")
    plots = make_plots(read_log(run_p), run_p / "plots")
    sample_rows, sample_src = gather_samples(run_p, samples, max_new_tokens, log)
    page = render_html(run_p, (run_p / "config.yaml").read_text(), summary, ev, times, data_stats, plots,
                       sample_rows, sample_src)
    path = Path(out) if out else run_p / "report.html"

    atomic_write_text(path, page)
    log(f"wrote {path} and {len(plots)} plots in {run_p / 'plots'}")
    return path


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f6f7f9;margin:0}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5b6472;margin:0 0 18px}
.cards{display:grid;grid-template-columns:repeat(3,1fr);gap:12px}
@media(max-width:700px){.cards{grid-template-columns:1fr 1fr}}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 14px}
.card .k{color:#5b6472;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:20px;font-weight:600} .card .d{font-size:13px;color:#5b6472}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e7;font-size:14px}
th,td{padding:5px 12px;border-bottom:1px solid #eceff3;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums} th{background:#f0f2f5}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px}
.plots figure{margin:0;background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:6px}
.plots img{width:100%;height:auto;display:block}
.sample{background:#fff;border:1px solid #dde1e7;border-radius:8px;margin:0 0 14px;padding:10px 14px}
.sample .q{font-weight:600;margin-bottom:6px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.pair h4{margin:0 0 4px;font-size:12px;text-transform:uppercase;color:#5b6472;letter-spacing:.04em}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,monospace;
background:#f8f9fb;border:1px solid #eceff3;border-radius:6px;padding:8px}
details summary{cursor:pointer;color:#33507a} .muted{color:#5b6472;font-size:13px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(v, fmt="{:.4f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _secs(s) -> str:
    if s is None:
        return "n/a"
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.2f} h"


def _cards(summary: dict | None, times: dict | None) -> str:
    if not summary:
        return "<p class='muted'>No summary.json: the run did not finish.</p>"
    b, a, p = summary.get("before", {}), summary.get("after", {}), summary.get("params", {})
    t = times or summary.get("time", {})
    cards = [
        ("steps", summary.get("steps"), summary.get("stopped", "")),
        ("held-out loss", f"{_num(b.get('eval_loss'))} → {_num(a.get('eval_loss'))}",
         f"perplexity {_num(b.get('eval_ppl'), '{:.2f}')} → {_num(a.get('eval_ppl'), '{:.2f}')}"),
        ("KL to base", _num(a.get("eval_kl"), "{:.4g}"), f"general prompts {_num(a.get('general_kl'), '{:.4g}')}"),
        ("trainable", f"{p.get('trainable') or 0:,}", f"of {p.get('total') or 0:,} ({p.get('percent') or 0:.3f}%)"),
        ("training time", _secs(t.get("train_s")), f"{_secs(t.get('total_s'))} total"),
        ("throughput", f"{t.get('trained_tokens_per_s') or 0:,.0f} tok/s",
         f"peak RSS {t.get('peak_rss_mb') or 0:,.0f} MiB"),
    ]
    return "<div class='cards'>" + "".join(
        f"<div class='card'><div class='k'>{_e(k)}</div><div class='v'>{_e(v)}</div><div class='d'>{_e(d)}</div></div>"
        for k, v, d in cards) + "</div>"


def _eval_table(ev: dict | None) -> str:
    if not ev:
        return "<p class='muted'>No eval.json yet: run <code>slimtune eval RUN</code> for base-vs-tuned metrics.</p>"

    g = ev["generation"]
    rows = "".join(f"<tr><td>{_e(label)}</td><td class='n'>{_e(b)}</td><td class='n'>{_e(t)}</td></tr>"
                   for label, b, t in table_rows(ev))
    return (f"<p class='muted'>Held-out: {_e(ev['heldout']['data'])}, {ev['heldout']['examples']} examples. "
            f"Answers: {g['n_prompts']} prompts from {_e(g['prompts'])}, greedy, at most {g['max_new_tokens']} "
            f"new tokens; banned phrases: {_e(', '.join(g['banned_phrases']))}.</p>"
            f"<table><tr><th>metric</th><th class='n'>base</th><th class='n'>tuned</th></tr>{rows}</table>")


def _plots(plots: dict[str, Path]) -> str:
    if not plots:
        return "<p class='muted'>No training log to plot.</p>"
    figs = []
    for stem, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        figs.append(f"<figure><img alt='{_e(PLOTS[stem][0])}' src='data:image/png;base64,{data}'></figure>")
    return "<div class='plots'>" + "".join(figs) + "</div>"


def _samples(rows: list[dict], source: str) -> str:
    if not rows:
        return "<p class='muted'>No samples.</p>"
    out = [f"<p class='muted'>From {_e(source)}.</p>"]
    for r in rows:
        pair = (f"<div class='pair'><div><h4>base</h4><pre>{_e(r['base'])}</pre></div>"
                f"<div><h4>tuned</h4><pre>{_e(r['tuned'])}</pre></div></div>")
        if r.get("sampled_tuned") is not None:
            pair += (f"<details><summary>sampled</summary><div class='pair'>"
                     f"<div><h4>base</h4><pre>{_e(r.get('sampled_base'))}</pre></div>"
                     f"<div><h4>tuned</h4><pre>{_e(r['sampled_tuned'])}</pre></div></div></details>")
        out.append(f"<div class='sample'><div class='q'>{_e(r['prompt'])}</div>{pair}</div>")
    return "".join(out)


def _kv_table(d: dict | None) -> str:
    if not d:
        return ""
    return "<table>" + "".join(f"<tr><td>{_e(k)}</td><td class='n'>{_e(v)}</td></tr>" for k, v in d.items()) + "</table>"


def render_html(run: Path, config_yaml: str, summary, ev, times, data_stats, plots, samples, sample_src) -> str:

    cfg = yaml.safe_load(config_yaml) or {}
    method, model = cfg.get("method", {}).get("name", "?"), cfg.get("model", {}).get("name", "?")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    train_stats = (data_stats or {}).get("train")
    body = [
        f"<h1>slimtune report: {_e(run.name or run)}</h1>",
        f"<p class='sub'>{_e(method)} on {_e(model)} · {_e(run)} · made {stamp}</p>",
        "<h2>Summary</h2>", _cards(summary, times),
        "<h2>Base vs tuned</h2>", _eval_table(ev),
        "<h2>Training curves</h2>", _plots(plots),
        "<h2>Samples</h2>", _samples(samples, sample_src),
        "<h2>Data and config</h2>",
        "<details><summary>training data statistics</summary>" + _kv_table(train_stats) + "</details>" if train_stats else "",
        f"<details><summary>config.yaml</summary><pre>{_e(config_yaml)}</pre></details>",
    ]
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>slimtune report: {_e(run.name)}"
            f"</title><style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n")
