"""The package layout is the architecture (ARCHITECTURE.md): imports point down the layers,
there is no import cycle, and only the CLI writes to the terminal.

What does not hold yet is named below as a debt, module by module; the test fails on any new
violation, and also when a debt has been paid but is still listed, so the list stays true."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "kmpwm"

# Lowest first: a module may import from its own layer and the layers below it.
LAYERS = {
    "core": 0,
    "platform": 0,
    "storage": 1,
    "scheduling": 2,
    "running": 3,
    "workers": 3,
    "system": 4,
    "api": 5,
    "cli": 6,
}

# (importing module, imported package or module) pairs that break the direction today.
DEBTS: set[tuple[str, str]] = set()  # none left: keep it that way

# Modules outside cli/ that write to the terminal today (worker_host is the child side of a run:
# its stdout and stderr are the worker's own, which run-due captures).
PRINTS = {"kmpwm.running.worker_host"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def imports(tree: ast.Module, *, top_only: bool) -> list[str]:
    """The kmpwm modules (or packages) ``tree`` imports; ``top_only``: at module level only."""
    nodes = tree.body if top_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kmpwm"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                is_module = (PKG.parent / (full.replace(".", "/") + ".py")).exists()
                found.append(full if is_module else node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("kmpwm")]
    return found


def test_imports_point_down_the_layers():
    seen, bad = set(), []
    for name, tree in modules().items():
        mine = layer(name)
        if mine is None:
            continue
        for target in imports(tree, top_only=False):
            theirs = layer(target)
            if theirs is None or theirs <= mine:
                continue
            seen.add((name, target))
            if (name, target) not in DEBTS:
                bad.append(f"{name} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)
    assert not DEBTS - seen, f"paid debts still listed in DEBTS: {sorted(DEBTS - seen)}"


def test_no_import_cycle_at_module_level():
    graph = {name: set(imports(tree, top_only=True)) - {name} for name, tree in modules().items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def writes_to_terminal(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            return True
        if isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr"):
            if isinstance(node.value, ast.Name) and node.value.id == "sys":
                return True
        if isinstance(node, ast.ImportFrom) and node.module == "kmpwm.cli.output":
            return True
    return False


def test_only_the_cli_writes_to_the_terminal():
    printing = {n for n, tree in modules().items() if not n.startswith("kmpwm.cli") and writes_to_terminal(tree)}
    assert printing <= PRINTS, f"modules outside cli/ that print: {sorted(printing - PRINTS)}"
    assert not PRINTS - printing, f"no longer print; drop them from PRINTS: {sorted(PRINTS - printing)}"
