#!/usr/bin/env bash
# The suite on the newest library versions pyproject allows, in a separate venv (.venv-newest), and
# what differs from the lock: every package whose version is not the one in constraints.txt, then
# the suite's result. Run it when the registry moves; if it passes, refresh the lock with
#   .venv-newest/bin/pip freeze | grep -v -e '^-e' -e '^torch==' -e '^slimtune'   (keep the header)
# and if it fails, mend the code or exclude the version in pyproject.toml with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
SLIMTUNE_VENV=.venv-newest SLIMTUNE_NEWEST=1 bash scripts/install.sh || exit 1
echo "== versions that differ from constraints.txt (locked -> newest)"
.venv-newest/bin/pip freeze | python3 -c '
import sys
lock = dict(l.strip().split("==", 1) for l in open("constraints.txt") if "==" in l and not l.startswith("#"))
new = dict(l.strip().split("==", 1) for l in sys.stdin if "==" in l and not l.startswith("#"))
norm = lambda n: n.lower().replace("_", "-")
lock = {norm(k): v for k, v in lock.items()}
for k, v in sorted((norm(k), v) for k, v in new.items()):
    if k in lock and lock[k] != v:
        print(f"  {k}: {lock[k]} -> {v}")
    elif k not in lock and k not in ("torch", "slimtune"):  # a package the lock does not know
        print(f"  {k}: (not locked) {v}")
'
echo "== the suite on the newest versions"
.venv-newest/bin/python -m pytest -q -p no:cacheprovider "$@"
