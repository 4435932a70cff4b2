"""The layout holds: no import cycles between modules, lazy imports included; the concerns of `serve_app/` depend
on each other one way; no source file over 400 lines; every package says in one line what belongs there."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serve_app", "deployments")
# The concerns in dependency order: each may import only those before it (and deployments' wire types).
LAYERS = ("telemetry", "api", "safety", "money", "ledger", "admin", "config", "serving", "ops")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "corpus" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Every project module this file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name not in PACKAGES:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_concerns_depend_one_way():
    wrong = []
    for mod, targets in graph().items():
        parts = mod.split(".")
        if parts[0] != "serve_app" or len(parts) < 3:
            continue
        mine = LAYERS.index(parts[1])
        for target in targets:
            t = target.split(".")
            if t[0] == "serve_app" and len(t) > 2 and LAYERS.index(t[1]) > mine:
                wrong.append(f"{mod} -> {target}")
    assert not wrong, "a concern imports one that builds on it: " + ", ".join(sorted(wrong))


def test_model_side_needs_only_telemetry_from_the_gateway():
    reach = {t for mod, targets in graph().items() if mod.startswith("deployments") for t in targets}
    assert {t for t in reach if t.startswith("serve_app")} <= {"serve_app.telemetry.logs", "serve_app.telemetry.tracing"}


def test_no_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_package_says_what_belongs_there():
    for name, path in modules().items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc.splitlines()) == 1, f"{name}: one-line docstring"
