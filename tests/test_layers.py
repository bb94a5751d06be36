"""The house's rules, checked on every module's imports (lazy ones inside functions included: a lazy
import is still a dependency). `docs/architecture.md` draws the same rules; this test keeps it true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "splitserve"

# Each layer and the layers of ours it may import (itself always allowed). Read downward only.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "workload": set(),
    "model": {"core"},
    "transfer": {"core", "model"},
    "sim": {"core", "workload"},
    "runtime": {"core", "model", "transfer", "workload"},
    "bench": {"core", "workload", "model"},  # model: only to read a tokenizer for exact-length prompts
    "calibrate": {"core", "model", "runtime", "sim", "workload"},
    "plan": {"core", "sim", "workload", "calibrate"},
    "cluster": {"core", "model", "transfer", "workload", "runtime"},
    "cli": {"core", "model", "transfer", "workload", "sim", "runtime", "bench", "calibrate", "plan", "cluster"},
}
# Inside the runtime: the two processes share only the wire, the engine-client types and the config.
RUNTIME_SHARED = {"wire", "engine_client", "config", "process", "auth", "asgi"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """Every `splitserve...` module `name` imports, resolved to a module that exists."""
    known = modules()
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if not t.startswith("splitserve"):
                continue
            while t and t not in known:  # `import splitserve.a.b.c` where c is a name, not a module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "cli"  # splitserve/__init__.py
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1]


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) for name, path in modules().items()}


def test_every_module_is_in_a_layer():
    unknown = sorted({layer(m) for m in modules()} - ALLOWED.keys())
    assert not unknown, f"packages with no place in the layer rules: {unknown}"


def test_layers_import_downward_only():
    bad = []
    for mod, deps in graph().items():
        own = layer(mod)
        for dep in deps:
            theirs = layer(dep)
            if theirs != own and theirs not in ALLOWED[own]:
                bad.append(f"{mod} -> {dep} ({own} may not import {theirs})")
    assert not bad, "imports against the layer rules:\n" + "\n".join(sorted(bad))


def _runtime_part(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "runtime" else None


def test_frontend_and_worker_share_only_the_wire():
    bad = []
    for mod, deps in graph().items():
        part = _runtime_part(mod)
        if part not in ("frontend", "worker") and part not in RUNTIME_SHARED:
            continue
        for dep in deps:
            theirs = _runtime_part(dep)
            if theirs is None or theirs == part:
                continue
            if part in RUNTIME_SHARED and theirs not in RUNTIME_SHARED:
                bad.append(f"{mod} -> {dep} (the shared runtime modules sit below both processes)")
            elif part in ("frontend", "worker") and theirs in ("frontend", "worker"):
                bad.append(f"{mod} -> {dep} (the frontend and the worker processes meet only on the wire)")
    assert not bad, "\n".join(sorted(bad))


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    # Package __init__ files that re-export their submodules would be circles by construction; ours are empty
    # or re-export downward only, so every circle counts.
    assert _cycles(graph()) == []


@pytest.mark.parametrize("bad_graph, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_circle_finder_finds_circles(bad_graph, expected):
    assert _cycles(bad_graph) == expected


def documented_rules() -> dict[str, set[str]]:
    """The 'may import' column of docs/architecture.md's package table."""
    rules: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        name = cells[0].strip("`").rstrip("/").removesuffix(".py")
        if name not in ALLOWED:
            continue
        rules[name] = {part.strip().strip("`") for part in cells[2].split(",")} - {"nothing"}
    return rules


def test_the_architecture_page_states_these_rules():
    assert documented_rules() == ALLOWED
