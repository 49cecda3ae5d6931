"""`slimtune` command line: each subcommand is one function; errors print as one clear line.

Each subcommand has `add_<name>(subparsers)` to declare its options and `cmd_<name>(args)` to
run it. Heavy imports (torch, transformers) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import DEFAULT_MODEL, TRAIN_ON, WEIGHT_DTYPES, DataCfg  # light: yaml and the dataclasses
from .errors import SlimtuneError


# ---------------------------------------------------------------- train
def add_train(sub):
    p = sub.add_parser("train", help="fine-tune a model from a YAML config",
                       description="Train with CONFIG.yaml; override any key as section.key=value "
                                   "(e.g. train.lr=1e-4 method.r=8).")
    p.add_argument("config", nargs="?", help="YAML config (default: all defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=cmd_train)


def cmd_train(args):
    from .config import load_config
    from .train.loop import train

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    cfg = load_config(config, overrides)
    train(cfg, log=lambda m: print(m, file=sys.stderr))


# ---------------------------------------------------------------- data
SOURCES = ("a .jsonl/.json (.gz/.zst), .parquet, .csv or .arrow file, a folder of them or a quoted pattern "
           "('data/*.parquet'), a save_to_disk folder, hf:org/name, builtin:instructions, or chitchat[:N]")


def _source_options(p, fmt: bool = True):
    """Options every data command shares: how to read the source."""
    if fmt:
        p.add_argument("--format", default="auto", help="auto, messages, alpaca, dolly, sharegpt, "
                                                        "prompt_completion, text")
    p.add_argument("--columns", help="our field=your column, e.g. instruction=question,output=answer")
    p.add_argument("--split", help="split of a hf: dataset or a DatasetDict folder (default: train)")
    p.add_argument("--subset", help="subset (config name) of a hf: dataset")


def add_data(sub):
    p = sub.add_parser("data", help="inspect, convert, mix and split chat data; build style data")
    dsub = p.add_subparsers(dest="data_cmd", required=True)

    s = dsub.add_parser("stats", help="format, columns, examples, tokens, trained-token share, lengths; "
                                      "one example with its mask")
    s.add_argument("file", help=SOURCES)
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"model or tokenizer folder (default: {DEFAULT_MODEL})")
    s.add_argument("--chat-template", help="for a base model: chatml, llama3, alpaca, zephyr or a .jinja file")
    _source_options(s)
    s.add_argument("--train-on", default=DataCfg.train_on, choices=TRAIN_ON)
    s.add_argument("--max-length", type=int, default=DataCfg.max_length)
    s.add_argument("--system-prompt")
    s.add_argument("--num-proc", type=int, default=1, help="rendering processes (default 1)")
    s.add_argument("--show", type=int, default=1, help="how many examples to print with their mask")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON only")
    s.set_defaults(func=cmd_data_stats)

    t = dsub.add_parser("check-template", help="probe chats through a model's chat template: trained tokens marked, "
                                               "behaviours detected (default system, rewritten turns, eot vs eos...)")
    t.add_argument("--model", default=DEFAULT_MODEL, help=f"model or tokenizer folder (default: {DEFAULT_MODEL})")
    t.set_defaults(func=cmd_data_check_template)

    c = dsub.add_parser("convert", help="any supported source -> JSONL (ChatML messages; prompt/completion; text)")
    c.add_argument("file", help=SOURCES)
    c.add_argument("--out", required=True)
    _source_options(c)
    c.add_argument("--system-prompt")
    c.set_defaults(func=cmd_data_convert)

    m = dsub.add_parser("mix", help="weighted mix with seeded shuffle and dedupe: a.jsonl:3 b.parquet:1")
    m.add_argument("files", nargs="+", help="SOURCE[:WEIGHT]; weight 3 = repeat x3, 0.5 = a random half")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-dedupe", action="store_true")
    _source_options(m)
    m.set_defaults(func=cmd_data_mix)

    sp = dsub.add_parser("split", help="seeded train/val split")
    sp.add_argument("file", help=SOURCES)
    sp.add_argument("--val", type=float, default=0.1, help="held-out fraction")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out-dir", required=True, help="writes train.jsonl and val.jsonl here")
    _source_options(sp)
    sp.set_defaults(func=cmd_data_split)

    md = dsub.add_parser("markdown-slice", help="a slice of chats whose answers gain Markdown lists and headings",
                         description="Rewrite the last answer of some chats with Markdown structure: enumerations "
                                     "become lists, long answers get a heading; code, numbers and names unchanged.")
    md.add_argument("file", help=SOURCES)
    md.add_argument("--limit", type=int, help="at most N chats (a seeded sample of those that changed)")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--heading-words", type=int, default=60, help="answers this long get a heading (default 60)")
    md.add_argument("--out", required=True)
    _source_options(md)
    md.set_defaults(func=cmd_data_markdown_slice)
    pr = dsub.add_parser("pairs", help="preference pairs from an SFT file: its answer chosen, the model's own rejected",
                         description="For each chat of FILE: prompt = the turns before the last assistant turn, "
                                     "chosen = the dataset's answer, rejected = MODEL's greedy answer. Writes "
                                     "{prompt, chosen, rejected} JSONL for loss.objective=dpo (or ipo, orpo, simpo, kto).")
    pr.add_argument("file", help=SOURCES)
    pr.add_argument("--model", default=DEFAULT_MODEL, help=f"model, run folder or .gguf (default: {DEFAULT_MODEL})")
    pr.add_argument("--out", required=True)
    _source_options(pr)
    pr.add_argument("--system-prompt")
    pr.add_argument("--max-new-tokens", type=int, default=256)
    pr.add_argument("--limit", type=int, help="only the first N chats")
    pr.set_defaults(func=cmd_data_pairs)


    te = dsub.add_parser("teacher", help="store a teacher's top-k log-probs at every trained token (distill.teacher_logprobs)",
                         description="Render FILE as training will (the config's model, template and data settings), run "
                                     "the teacher once, and write its top-k log-probs at every trained position to DIR: "
                                     "Arrow shards, resumable, keyed by the data's and the teacher's hashes. Train with "
                                     "loss.objective=distill distill.teacher_logprobs=DIR and data.train=FILE.")
    te.add_argument("file", help=SOURCES)
    te.add_argument("--teacher", required=True, help="model id, folder, .gguf or run folder (its adapter merged)")
    te.add_argument("--top-k", type=int, required=True, help="ids stored per position")
    te.add_argument("--out", required=True, help="the store's folder (an unfinished one is resumed)")
    te.add_argument("-c", "--config", help="the training config whose model and data settings render FILE")
    te.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config override, e.g. --set distill.temperature=2 (repeatable)")
    te.add_argument("--batch-size", type=int, default=8, help="rows per teacher forward (default 8)")
    te.set_defaults(func=cmd_data_teacher)

    ng = dsub.add_parser("neg-guard", help="prompts that tempt stray chat tags and role names, with clean answers")
    ng.add_argument("--limit", type=int, help="a seeded sample of N pairs (default: all)")
    ng.add_argument("--seed", type=int, default=0)
    ng.add_argument("--out", required=True)
    ng.set_defaults(func=cmd_data_neg_guard)


def _data_cfg(args, **kw):
    from .config import DataCfg
    return DataCfg(format=getattr(args, "format", "auto"), columns=args.columns or {}, split=args.split,
                   subset=args.subset, system_prompt=getattr(args, "system_prompt", None), **kw)


def _read_any(args):
    from .data.prepare import read_chats
    cfg = _data_cfg(args)
    return read_chats(args.file, cfg.format, cfg.system_prompt, columns=cfg.columns, split=cfg.split,
                      subset=cfg.subset)


def cmd_data_stats(args):
    from .data.prepare import examples, render
    from .data.template_check import summary
    from .data.tools import highlight
    from .models import load_tokenizer

    cfg = _data_cfg(args, train_on=args.train_on, max_length=args.max_length, num_proc=args.num_proc)
    tok = load_tokenizer(args.model, chat_template=args.chat_template)
    rendered = render(args.file, cfg, tok)
    exs, st = examples(rendered, source=args.file)
    stats = {"format": rendered.format, "columns": rendered.columns, "rows": rendered.n_rows, **st.summary()}
    if args.json:
        print(json.dumps(stats, indent=2))
        return
    cols = ", ".join(f"{ours} <- {theirs}" for ours, theirs in rendered.columns.items()) or "the format's own names"
    print(f"{args.file}  (tokenizer: {args.model}, train_on={args.train_on}, max_length={args.max_length})")
    print(f"  template: {summary(tok)}")
    print(f"  format            {rendered.format} (detected)" if args.format == "auto" else
          f"  format            {rendered.format}")
    print(f"  columns           {cols}")
    for k, v in st.summary().items():
        print(f"  {k:<17} {v:,}" if isinstance(v, int) else f"  {k:<17} {v}")
    color = sys.stdout.isatty()
    for ex in exs[: args.show]:
        mark = "green" if color else "[[ ]]"
        print(f"\nexample with trained tokens in {mark}:\n" + highlight(ex, tok, color))


def cmd_data_check_template(args):
    from .data.template_check import report
    from .models import load_tokenizer

    print(report(load_tokenizer(args.model), color=sys.stdout.isatty()))


def cmd_data_convert(args):
    from .data.tools import write_records
    rows = _read_records(args)
    write_records(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


def _read_records(args):
    from .data.prepare import read_records
    cfg = _data_cfg(args)
    return read_records(args.file, cfg)


def cmd_data_mix(args):
    from .data.tools import mix, write_chats
    cfg = _data_cfg(args)
    chats = mix(args.files, seed=args.seed, fmt=cfg.format, do_dedupe=not args.no_dedupe, columns=cfg.columns,
                split=cfg.split, subset=cfg.subset)
    write_chats(chats, args.out)
    print(f"wrote {len(chats)} chats to {args.out}")


def cmd_data_split(args):
    from pathlib import Path

    from .data.tools import split, write_records
    train, val = split(_read_records(args), args.val, args.seed)
    out = Path(args.out_dir)
    write_records(train, out / "train.jsonl")
    write_records(val, out / "val.jsonl")
    print(f"wrote {len(train)} train and {len(val)} val rows to {out}")


def cmd_data_markdown_slice(args):
    from .data.builders import markdown_slice
    from .data.tools import write_chats
    chats = _read_any(args)
    out = markdown_slice(chats, args.limit, args.seed, args.heading_words)
    write_chats(out, args.out)
    print(f"wrote {len(out)} chats to {args.out} (of {len(chats)} read)")


def cmd_data_neg_guard(args):
    from .data.builders import neg_guard
    from .data.tools import write_chats
    chats = neg_guard(args.limit, args.seed)
    write_chats(chats, args.out)
    print(f"wrote {len(chats)} chats to {args.out}")


def cmd_data_teacher(args):
    from .config import load_config
    from .data.prepare import examples, render
    from .machine import pick_device
    from .models import load_tokenizer
    from .teacher import hash_rows, hash_teacher, load_teacher, teacher_dtype, write_teacher_logprobs

    cfg = load_config(args.config, [*args.set, f"data.train={args.file}"])
    tok = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.chat_template)
    rows = examples(render(args.file, cfg.data, tok, cfg.data.data_seed(cfg.train.seed)), source=args.file)[0]
    device = pick_device(cfg.train.device)
    dtype = teacher_dtype(cfg.distill.teacher_dtype, device, cfg.model.dtype)
    teacher = load_teacher(args.teacher, tok, device, dtype)
    manifest = write_teacher_logprobs(rows, teacher, args.out, args.top_k, hash_rows(rows),
                                      hash_teacher(args.teacher, dtype=dtype), temperature=cfg.distill.temperature,
                                      batch_size=args.batch_size, chunk_size=cfg.loss.chunk_size,
                                      log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote the top {args.top_k} log-probs of {args.teacher} ({dtype}) at {sum(s['trained'] for s in manifest['shards']):,} "
          f"trained positions of {len(rows)} examples to {args.out}")


def cmd_data_pairs(args):
    from .data.preference import pairs_from_sft
    from .generate import GenSettings, generate_many, merged
    from .runfolder import load_run
    from .utils import atomic_write_text

    chats = _read_any(args)[: args.limit]
    model, tok, cfg = load_run(args.model)

    def answer_all(prompts, log):  # greedy, batched (and an adapter merged while it answers)
        with merged(model):
            out = generate_many(model, tok, prompts, GenSettings(max_new_tokens=args.max_new_tokens),
                                cfg.eval.gen_batch_size, log)
        return [a["text"] for a in out]

    def progress(i, n):
        print(f"\ranswering {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)

    rows, same = pairs_from_sft(chats, answer_all, progress)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {args.out}" + (f" ({same} skipped: the model gave the dataset's answer)"
                                                      if same else ""))


# ---------------------------------------------------------------- eval, compare, chat, merge, report
KNOBS = ("top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size")


def add_knobs(p):
    """--top-p, --top-k, --repetition-penalty, --no-repeat-ngram-size; defaults: the run's eval.* (config.py)."""
    p.add_argument("--top-p", type=float, help="nucleus sampling mass when sampling (default: the run's eval.top_p)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens; 0 = off (default: eval.top_k)")
    p.add_argument("--repetition-penalty", type=float,
                   help="> 1 penalises tokens already seen; 1 = off (default: eval.repetition_penalty)")
    p.add_argument("--no-repeat-ngram-size", type=int,
                   help="forbid repeating any token n-gram of this size; 0 = off (default: eval.no_repeat_ngram_size)")


def knobs(args) -> dict:
    return {k: getattr(args, k) for k in KNOBS}


def add_eval(sub):
    p = sub.add_parser("eval", help="held-out loss/ppl and KL for base vs tuned, and style of generated answers",
                       description="Evaluate RUN against its base: held-out loss and perplexity, KL to base, and "
                                   "style metrics of greedy answers. Writes RUN/eval.json and prints a table.")
    p.add_argument("run", help="run folder written by slimtune train")
    p.add_argument("--data", help="held-out chats (default: the run's own held-out split)")
    p.add_argument("--prompts", help="prompts to answer (default: builtin:eval_prompts)")
    p.add_argument("--out", help="result JSON (default: RUN/eval.json)")
    p.add_argument("--max-prompts", type=int, help="answer only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    p.add_argument("--max-examples", type=int, help="held-out examples (default: the run's eval.max_examples)")
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES)
    p.add_argument("--ifeval", nargs="?", const="builtin:ifeval_prompts", metavar="PROMPTS",
                   help="also answer IFEval-style prompts with checkable instructions: --ifeval alone is the "
                        "shipped set (builtin:ifeval_prompts, 66 prompts), or a file; default: the run's "
                        "eval.ifeval (off unless set; an RL run answers the shipped set); '' skips them")
    p.add_argument("--judge", metavar="URL", help="OpenAI-compatible server that judges base vs tuned answers "
                                                  "(both orders); off by default")
    p.add_argument("--judge-model", metavar="NAME", help="model name to send to the judge")
    p.add_argument("--judge-max-tokens", type=int, default=16,
                   help="reply budget per verdict (raise it for a reasoning judge that thinks first)")
    p.add_argument("--no-cache", action="store_true", help="generate the base's answers again instead of "
                                                          "reading them from the cache")
    p.add_argument("--recompute", action="store_true",
                   help="measure the held-out loss and KL again even where training's final evaluation "
                        "measured these same weights the same way (default: reuse those numbers)")
    add_knobs(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args):
    from .evaluate.suite import evaluate_run, format_table

    res = evaluate_run(args.run, data=args.data, prompts=args.prompts, out=args.out, max_prompts=args.max_prompts,
                       max_new_tokens=args.max_new_tokens, max_examples=args.max_examples, dtype=args.dtype,
                       ifeval=args.ifeval, judge=args.judge, judge_model=args.judge_model,
                       judge_max_tokens=args.judge_max_tokens, use_cache=not args.no_cache,
                       reuse=not args.recompute, **knobs(args))
    print(format_table(res))


def add_compare(sub):
    p = sub.add_parser("compare", help="base and tuned models answer the same prompts, side by side",
                       description="Answers of the base (of the first run) and of each RUN to the same prompts, "
                                   "greedy and with seeded sampling; printed side by side and written to Markdown.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or models) to compare")
    p.add_argument("--prompts", help="prompts file (default: builtin:eval_prompts)")
    p.add_argument("--max-prompts", type=int, default=8, help="first N prompts (default 8; 0 = all)")
    p.add_argument("--max-new-tokens", type=int, help="default: the first run's eval.max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="for the sampled answers (default 0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="Markdown file (default: FIRST_RUN/compare.md; a .json is written beside it)")
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES)
    p.add_argument("--no-cache", action="store_true", help="generate the base's answers again")
    add_knobs(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args):
    from .evaluate.compare import compare_runs, to_terminal

    res = compare_runs(args.runs, prompts=args.prompts, max_prompts=args.max_prompts or None,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                       out=args.out, dtype=args.dtype, use_cache=not args.no_cache, **knobs(args))
    print(to_terminal(res))


def add_chat(sub):
    p = sub.add_parser("chat", help="chat with a run (any method) or a model, through its chat template",
                       description="Interactive chat with streamed answers (/reset, /exit), or one answer with "
                                   "--prompt. Uses the chat template the run was trained with.")
    p.add_argument("target", metavar="RUN|MODEL", help="run folder, merged folder, or model name")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt (default: the run's data.system_prompt)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES)
    add_knobs(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args):
    from .chat import Streamer, chat_loop
    from .data.formats import with_system
    from .generate import generate, merged, settings_for
    from .runfolder import load_run

    model, tok, cfg = load_run(args.target, args.dtype)
    system = args.system if args.system is not None else cfg.data.system_prompt
    s = settings_for(cfg, str(next(model.parameters()).device), **knobs(args))
    kw = {k: getattr(s, k) for k in KNOBS + ("autocast",)}
    if args.prompt is None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        with merged(model):  # the adapter folded into the weights while chatting
            chat_loop(model, tok, system, args.max_new_tokens, args.temperature, args.seed, **kw)
        return
    messages = with_system([{"role": "user", "content": args.prompt}], system)
    with merged(model):
        res = generate(model, tok, messages, args.max_new_tokens, args.temperature, seed=args.seed,
                       streamer=Streamer(tok, sys.stdout), **kw)
    if not res["ended"]:
        print(f"[stopped at {args.max_new_tokens} tokens]", file=sys.stderr)


def add_merge(sub):
    p = sub.add_parser("merge", help="merge an adapter into its base: a standalone transformers model",
                       description="Merge RUN's adapter into its base and save safetensors, tokenizer and chat "
                                   "template to --out; prints a logit parity check against the adapter model.")
    p.add_argument("run")
    p.add_argument("--out", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES,
                   help="saved weights (default: the run's model.dtype)")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args):
    from .ship.merge import merge_run

    merge_run(args.run, args.out, args.dtype)


def add_export(sub):
    p = sub.add_parser("export", help="merge a run and write it for another runtime: GGUF (llama.cpp, Ollama, "
                                      "LM Studio), MLX (mlx-lm) or Core ML",
                       description="Merge RUN (parity printed) and write it with its tokenizer and chat template: "
                                   "gguf: one file plus an Ollama Modelfile, read back by transformers' GGUF loader; "
                                   "mlx: an mlx-lm folder, loaded by mlx-lm and its greedy answers compared; "
                                   "coreml: an .mlpackage (fp16, stateful KV cache) plus a Swift package and a README "
                                   "(see docs/apple.md).")
    p.add_argument("run", help="run folder (or a merged / plain model folder)")
    p.add_argument("--format", default="gguf", choices=["gguf", "mlx", "coreml"])
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"],
                   help="weights: f32 (exact), f16 (default, half the size), q8_0 (gguf only); coreml is f16")
    p.add_argument("--quantize", choices=["q4", "q8"], help="mlx: quantise with mlx-lm's own conversion")
    p.add_argument("--adapter-only", action="store_true",
                   help="mlx, LoRA runs: the adapter alone, for mlx_lm.generate --adapter-path")
    p.add_argument("--context", default="2048,4096", help="coreml: context lengths, one model function each")
    p.add_argument("--out", required=True, help="gguf: the .gguf file (a Modelfile goes beside it); mlx, coreml: a folder")
    p.add_argument("--no-verify", action="store_true", help="skip loading the export back to check it")
    p.set_defaults(func=cmd_export)


def cmd_export(args):
    if args.format != "mlx" and (args.quantize or args.adapter_only):
        raise SlimtuneError("--quantize and --adapter-only are options of --format mlx")
    if args.format == "mlx":
        from .ship.mlx import export_mlx
        res = export_mlx(args.run, args.out, args.type, args.quantize, args.adapter_only, verify=not args.no_verify)
    elif args.format == "coreml":
        from .ship.coreml import export_coreml
        if args.type != "f16":
            raise SlimtuneError("--format coreml writes fp16 weights (--type f16)")
        res = export_coreml(args.run, args.out, [int(c) for c in args.context.split(",")], verify=not args.no_verify)
    else:
        from .ship.gguf import export_gguf
        res = export_gguf(args.run, args.out, args.type, verify=not args.no_verify)
    print(json.dumps(res, indent=2))


def add_report(sub):
    p = sub.add_parser("report", help="plots and a self-contained HTML report of a run",
                       description="Write RUN/plots/*.png and RUN/report.html (config, metrics, plots, samples).")
    p.add_argument("run")
    p.add_argument("--out", help="HTML file (default: RUN/report.html)")
    p.add_argument("--samples", type=int, default=3,
                   help="samples to generate when there is no compare.json or eval.json (default 3)")
    p.add_argument("--max-new-tokens", type=int, help="for generated samples (default: the run's eval setting)")
    p.set_defaults(func=cmd_report)


def cmd_report(args):
    from .evaluate.report import make_report

    print(make_report(args.run, args.out, args.samples, args.max_new_tokens))


# ---------------------------------------------------------------- sweep
def add_sweep(sub):
    p = sub.add_parser("sweep", help="run a grid of configs and rank them in one results table",
                       description="SWEEP.yaml has base: CONFIG (or config: {...}), output_dir and "
                                   "grid: {section.key: [values]}; see configs/sweeps/.")
    p.add_argument("sweep", help="sweep YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    p.add_argument("--shard", metavar="K/N", help="train only runs K, K+N, ... (e.g. 1/2 and 2/2 in two "
                   "processes with OMP_NUM_THREADS=1 each, to share a machine's cores)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args):
    from .sweep import sweep
    rows = sweep(args.sweep, log=lambda m: print(m, file=sys.stderr), extra=args.overrides, shard=args.shard)
    print(f"{len(rows)} runs; ranked table in the sweep's results.md")


# ---------------------------------------------------------------- registry
COMMANDS = [add_train, add_data, add_sweep, add_eval, add_compare, add_chat, add_merge, add_export, add_report]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtune", description="Lean SFT of small chat models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:
        files = [x for x in extra if not x.startswith("-") and Path(x).exists()]
        if files and getattr(args, "file", None):  # `data stats data/*.jsonl`: the shell expanded it
            parser.exit(2, f"slimtune: error: {len(files) + 1} files where one source goes ({args.file}, "
                           f"{files[0]}, ...): the shell expanded a pattern; quote it ('dir/*.jsonl') or give "
                           "the folder, and slimtune reads them as one source\n")
        parser.parse_args(argv)  # argparse's own message for anything else
    try:
        if args.command != "data":
            from .utils import quiet_libraries
            quiet_libraries()
        args.func(args)
    except SlimtuneError as e:
        print(f"slimtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimtune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
