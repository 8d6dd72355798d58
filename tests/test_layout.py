"""The package's import graph: no circle between modules and no import from a higher layer.

Layers, low to high: errors; utils; plan, data, metrics, models; pretrain, adapters, baselines, predict;
study and the entry points. Read from the source (every ``import`` and ``from ... import``, inside functions too; annotations under
``if TYPE_CHECKING:`` are not imports at run time), so a lazy import inside a function counts as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Low to high; a module may import its own layer or lower ones only. Package __init__ files re-export
# their package and sit with it; ``ssl_em`` itself (the lazy facade) and the entry points are on top.
LAYERS: list[tuple[str, ...]] = [
    ("ssl_em.errors", "ssl_em._version"),
    ("ssl_em.utils",),
    ("ssl_em.plan", "ssl_em.data", "ssl_em.metrics", "ssl_em.models"),
    ("ssl_em.pretrain", "ssl_em.adapters", "ssl_em.baselines", "ssl_em.predict"),
    ("ssl_em.study", "ssl_em.fit", "ssl_em.demo", "ssl_em.datasets", "ssl_em.cli", "ssl_em.predict.cli",
     "ssl_em.napari_plugin"),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for root, prefix in ((REPO / "ssl_em", "ssl_em"), (REPO / "adapters", "ssl_em.adapters")):
        for path in root.rglob("*.py"):
            parts = [prefix, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> the ssl_em modules it imports at run time (a ``from pkg import name`` of a submodule
    counts as that submodule)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        edges = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.startswith("ssl_em") else None
                if found and found != mod:
                    edges.add(found)
        graph[mod] = edges
    return graph


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if module == "ssl_em":
        return len(LAYERS) - 1
    assert rank is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layout.py"
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = import_graph()
    # a package's __init__ importing its submodules and a submodule importing a sibling through the
    # package is the same circle as importing each other directly: both are kept in the graph
    assert cycles(graph) == []


def test_no_import_from_a_higher_layer():
    upward = [f"{mod} -> {dep}" for mod, deps in import_graph().items() for dep in deps
              if layer_of(dep) > layer_of(mod)]
    assert upward == []


def test_the_check_finds_a_circle_and_an_upward_import():
    graph = {"ssl_em.models.a": {"ssl_em.models.b"}, "ssl_em.models.b": {"ssl_em.models.a"},
             "ssl_em.data.x": {"ssl_em.predict.blocks"}}
    assert cycles(graph) == [["ssl_em.models.a", "ssl_em.models.b"]]
    assert layer_of("ssl_em.data.x") < layer_of("ssl_em.predict.blocks")
    assert layer_of("ssl_em.adapters.io") == layer_of("ssl_em.predict")


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_has_a_layer(module):
    layer_of(module)
