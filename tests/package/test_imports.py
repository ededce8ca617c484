"""The package's import graph, read from the source with ast (every import, at module level or
inside a function): no cycles, and no import from a lower layer up into a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import squeezer

ROOT = Path(squeezer.__file__).parent

#: Layers, lowest first: a module may import from its own layer or below, never above.
#: Sub-packages are listed by their dotted prefix.
LAYERS: list[tuple[str, ...]] = [
    ("_version", "errors", "progress", "threads", "distributed", "atomic", "milp", "factory"),
    ("budget", "config", "attention", "graph"),
    ("stream", "data", "quant", "measure", "hvp", "estimators", "encoders", "text", "models", "hf",
     "zoo", "images", "evaluation",
     "ties"),  # fmt: skip
    ("spectrum", "measured", "sensitivity", "zeroshot", "costs", "layer_timing", "plan", "plan_joint",
     "templates",
     "qbert", "integer", "export", "calibration", "train", "prune"),  # fmt: skip
    ("pipeline",),
    ("report", "runfolder", "deploy", "runs"),
    ("cli", "__init__", "__main__"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def resolve(mod: str, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """The package modules an import statement in ``mod`` reaches."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == "squeezer" or a.name.startswith("squeezer."):
                out.append(a.name.removeprefix("squeezer").lstrip(".") or "__init__")
        return [m for m in out if m in known or m == "__init__"]
    if node.level == 0:
        if not (node.module or "").startswith("squeezer"):
            return []
        base = node.module.removeprefix("squeezer").lstrip(".")
    else:
        pkg = mod.split(".")[:-1]  # the package the module is in ("" for the top level)
        up = node.level - 1
        base_parts = pkg[: len(pkg) - up] if up else pkg
        base = ".".join([*base_parts, *(node.module.split(".") if node.module else [])])
    targets = []
    for a in node.names:
        sub = f"{base}.{a.name}" if base else a.name
        if sub in known or f"{sub}.__init__" in known:
            targets.append(sub if sub in known else f"{sub}.__init__")
    if not targets:
        targets.append(base if base in known else f"{base}.__init__" if base else "__init__")
    return [t for t in targets if t in known or t == "__init__"]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for t in resolve(mod, node, known):
                    if t != mod:
                        edges[mod].add(t)
    return edges


def top(mod: str) -> str:
    """The layer key of a module: its first component (``quant.apply`` -> ``quant``)."""
    head = mod.split(".")[0]
    return head


def layer_of(mod: str) -> int:
    key = top(mod)
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"module {mod} is in no layer of LAYERS; add it where it belongs")


def test_every_module_has_a_layer():
    for mod in modules():
        layer_of(mod)


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ importing its own submodules is how a package is built; a submodule
    # importing its package's __init__ back would close a cycle and is caught below.
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        color[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if color.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if color.get(n) is None:
                visit(n)
        stack.pop()
        color[m] = 2

    for m in sorted(edges):
        if m not in color:
            visit(m)


def test_no_upward_imports():
    bad = []
    for mod, targets in graph().items():
        for t in targets:
            same_package = top(t) == top(mod)
            if not same_package and layer_of(t) > layer_of(mod):
                bad.append(f"{mod} -> {t}")
    assert not bad, "imports from a lower layer into a higher one: " + ", ".join(sorted(bad))


def test_the_graph_reader_sees_imports():
    """The test can fail: the reader finds known edges, function-level ones included."""
    edges = graph()
    assert "plan" in edges["pipeline"] and "milp" in edges["plan"]
    assert "zeroshot" in edges["calibration"]  # imported inside a function
