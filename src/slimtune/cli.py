"""`slimtune` command line: each subcommand is one function; errors print as one clear line.

Each subcommand has `add_<name>(subparsers)` to declare its options and `cmd_<name>(args)` to
run it. Heavy imports (torch, transformers) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    from .train import train

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    cfg = load_config(config, overrides)
    train(cfg, log=lambda m: print(m, file=sys.stderr))


# ---------------------------------------------------------------- data
def add_data(sub):
    p = sub.add_parser("data", help="inspect, convert, mix and split chat data")
    dsub = p.add_subparsers(dest="data_cmd", required=True)

    s = dsub.add_parser("stats", help="examples, tokens, trained-token share, lengths; one example with its mask")
    s.add_argument("file", help="JSON/JSONL file, builtin:instructions, or chitchat[:N]")
    s.add_argument("--model", default="smollm2-135m", help="model or tokenizer folder (default: smollm2-135m)")
    s.add_argument("--format", default="auto")
    s.add_argument("--train-on", default="assistant", choices=["assistant", "last", "all"])
    s.add_argument("--max-length", type=int, default=512)
    s.add_argument("--system-prompt")
    s.add_argument("--show", type=int, default=1, help="how many examples to print with their mask")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON only")
    s.set_defaults(func=cmd_data_stats)

    c = dsub.add_parser("convert", help="any supported format (or chitchat) -> ChatML messages JSONL")
    c.add_argument("file", help="input file, or chitchat[:N] for the chitchat-dataset package")
    c.add_argument("--out", required=True)
    c.add_argument("--format", default="auto")
    c.add_argument("--system-prompt")
    c.set_defaults(func=cmd_data_convert)

    m = dsub.add_parser("mix", help="weighted mix with seeded shuffle and dedupe: a.jsonl:3 b.jsonl:1")
    m.add_argument("files", nargs="+", help="FILE[:WEIGHT]; weight 3 = repeat x3, 0.5 = a random half")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-dedupe", action="store_true")
    m.set_defaults(func=cmd_data_mix)

    sp = dsub.add_parser("split", help="seeded train/val split")
    sp.add_argument("file")
    sp.add_argument("--val", type=float, default=0.1, help="held-out fraction")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out-dir", required=True, help="writes train.jsonl and val.jsonl here")
    sp.set_defaults(func=cmd_data_split)


def _read_any(spec: str, fmt: str = "auto", system_prompt: str | None = None):
    from .data.formats import load_chats, load_chitchat
    if spec.startswith("chitchat"):
        n = spec.partition(":")[2]
        return load_chitchat(int(n) if n else None, system_prompt)
    return load_chats(spec, fmt, system_prompt)


def cmd_data_stats(args):
    from .data.tools import highlight, render_all
    from .models import load_tokenizer

    chats = _read_any(args.file, args.format, args.system_prompt)
    tok = load_tokenizer(args.model)
    examples, st = render_all(chats, tok, args.train_on, args.max_length, source=args.file)
    stats = st.summary()
    if args.json:
        print(json.dumps(stats, indent=2))
        return
    print(f"{args.file}  (tokenizer: {args.model}, train_on={args.train_on}, max_length={args.max_length})")
    for k, v in stats.items():
        print(f"  {k:<17} {v:,}" if isinstance(v, int) else f"  {k:<17} {v}")
    color = sys.stdout.isatty()
    for ex in examples[: args.show]:
        mark = "green" if color else "[[ ]]"
        print(f"\nexample with trained tokens in {mark}:\n" + highlight(ex, tok, color))


def cmd_data_convert(args):
    from .data.tools import write_chats
    chats = _read_any(args.file, args.format, args.system_prompt)
    write_chats(chats, args.out)
    print(f"wrote {len(chats)} chats to {args.out}")


def cmd_data_mix(args):
    from .data.tools import mix, write_chats
    chats = mix(args.files, seed=args.seed, do_dedupe=not args.no_dedupe)
    write_chats(chats, args.out)
    print(f"wrote {len(chats)} chats to {args.out}")


def cmd_data_split(args):
    from pathlib import Path

    from .data.tools import split, write_chats
    train, val = split(_read_any(args.file), args.val, args.seed)
    out = Path(args.out_dir)
    write_chats(train, out / "train.jsonl")
    write_chats(val, out / "val.jsonl")
    print(f"wrote {len(train)} train and {len(val)} val chats to {out}")


# ---------------------------------------------------------------- registry
COMMANDS = [add_train, add_data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtune", description="Lean SFT of small chat models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
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
