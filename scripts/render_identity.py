"""Old vs new render_chat on the embedded SmolLM2 tokenizer: identical input_ids and labels?

Loads the render.py of a git revision (default: 4e116ab, before issue 10) as `old`, the working
tree's as `new`, and compares both on builtin:instructions, builtin:general_prompts and chitchat:200, for every train_on.

    PYTHONPATH=src python scripts/render_identity.py [REV]
"""

import subprocess
import time
import sys
import types

from slimtune.data import render as new
from slimtune.data.prepare import read_chats
from slimtune.models import load_tokenizer

rev = sys.argv[1] if len(sys.argv) > 1 else "4e116ab"
src = subprocess.run(["git", "show", f"{rev}:src/slimtune/data/render.py"], capture_output=True, text=True,
                     check=True).stdout
old = types.ModuleType("slimtune.data.old_render")
old.__package__ = "slimtune.data"
sys.modules[old.__name__] = old
exec(compile(src, f"{rev}:render.py", "exec"), old.__dict__)

tok = load_tokenizer("smollm2-135m")
for spec in ("builtin:instructions", "builtin:general_prompts", "chitchat:200"):
    chats = read_chats(spec)
    for train_on in ("assistant", "last", "all"):
        t0 = time.perf_counter()
        a = [old.render_chat(c, tok, train_on) for c in chats]
        t1 = time.perf_counter()
        b = [new.render_chat(c, tok, train_on) for c in chats]
        t2 = time.perf_counter()
        same = sum(x == y for x, y in zip(a, b))
        trained = sum(sum(lab != new.IGNORE for lab in labels) for _, labels in b)
        print(f"{spec:22} train_on={train_on:9} chats {len(chats):4}  identical {same:4}  trained tokens {trained:6}"
              f"  seconds old {t1 - t0:5.1f} new {t2 - t1:5.1f}")
