"""The package's layers, read from its imports: no cycles, and no module importing from a
layer above its own (what the README's layout section promises)."""

from __future__ import annotations

import ast
from pathlib import Path

import mergekit_pcb

PACKAGE = Path(mergekit_pcb.__file__).parent
# Top to bottom; a module may import only from its own layer's package or lower layers.
LAYERS: list[set[str]] = [
    {"__main__", "cli", "mergekit_compat"},  # the command line, and mergekit-yaml's flags
    {"kinds"},
    # the search and reprogramming engines, and the merge diagnostics (beside each other)
    {"evolve", "reprogram", "analysis"},
    {"engine"},  # the merge engine
    {"recipe"},
    {"methods", "io"},
    {"errors", "usercode", "threads", "machine", "__init__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> mergekit_pcb modules it imports (TYPE_CHECKING and function-local too)."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module \
                    and node.module.startswith("mergekit_pcb"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("mergekit_pcb")}
        out[module_name(path)] = found
    return out


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_every_top_level_module_has_a_layer() -> None:
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert tops <= set().union(*LAYERS), tops - set().union(*LAYERS)


def test_no_module_imports_from_a_layer_above() -> None:
    bad = [(m, i) for m, targets in imports().items() for i in targets
           if layer_of(i) < layer_of(m)]
    assert not bad, bad


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module: each one is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = imports()
    graph = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    assert not strongly_connected(graph)


def test_the_cycle_finder_finds_cycles() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) != []
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_command_line_loads_no_optional_heavy_library() -> None:
    """Every `pcbmerge` command imports the CLI and the kinds registry: libraries that only
    some recipes use (Ray, nevergrad, torchmetrics and, through it, scipy and matplotlib)
    are imported where they are used, not at start-up (torchmetrics alone cost 2.3 s)."""
    import subprocess
    import sys

    code = ("import sys, mergekit_pcb.cli, mergekit_pcb.kinds; "
            "print(' '.join(m for m in ('ray', 'nevergrad', 'torchmetrics', 'scipy', "
            "'matplotlib', 'skimage') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"imported at start-up: {out}"
