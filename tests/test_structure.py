"""The package's layers point one way: no import cycle among module-level imports, config loads
without torch, no module imports another's private name, training never imports evaluation."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "slimtune"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of the imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in tree.body:  # module level only: imports inside functions are optional dependencies
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if node.module is None:  # from . import a, b: submodules
                out += [(f"{target}.{n}", []) for n in names]
            else:
                out.append((target, names))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("slimtune")]
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    edges = {m: set() for m in modules}
    for m, p in modules.items():
        for target, _ in top_level_imports(p):
            if target in modules and target != m:
                edges[m].add(target)
    return edges


def test_no_import_cycle():
    edges = graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """A planted cycle is found (so the test above is not vacuous)."""
    edges = graph()
    edges["slimtune.config"].add("slimtune.train.loop")
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: edges)
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "slimtune.config" in str(e)
    else:
        raise AssertionError("the planted cycle was not found")


def test_no_private_names_across_modules():
    bad = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                target = node.module or ""
                if "slimtune" in target or node.level:
                    bad += [f"{module_name(p)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def test_training_never_imports_evaluation():
    for p in (PKG / "train").rglob("*.py"):
        for target, _ in top_level_imports(p):
            assert not target.startswith("slimtune.evaluate"), f"{module_name(p)} imports {target}"


def test_config_loads_without_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import slimtune.config, slimtune.specs"],
                         capture_output=True, text=True, check=True).stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.splitlines() if "|" in line}
    assert "slimtune.config" in loaded and "torch" not in loaded, sorted(n for n in loaded if "torch" in n)
