"""The house rules of the code base, checked on the source: no import cycles between modules, `wsicore` stands
on neither package, `preprocessing` never imports `slidechat`, and `slidechat` meets `preprocessing` only where
the data meets: the feature stores, and the preprocessing entry points that one-command inference runs."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("wsicore", "preprocessing", "slidechat")
# What slidechat may import from preprocessing besides `preprocessing.stores` (the store surface).
ENTRY_POINTS = {
    "preprocessing.tissue": {"segment_slide", "segmentation_paths", "PRESETS"},  # preset names for --preset
    "preprocessing.tiling": {"tile_slide", "load_coords"},
    "preprocessing.extract": {"extract_slide"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _known(name: str) -> str | None:
    """The project module `name` lives in (a dotted name may end in a class or function)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(project module, imported name or None) for every import in `module`, at any depth (lazy ones too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(m, None) for a in node.names if (m := _known(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                target = _known(f"{base}.{alias.name}")
                if target == f"{base}.{alias.name}":  # a submodule imported by name
                    found.append((target, None))
                elif (target := _known(base)) is not None:
                    found.append((target, alias.name))
    return [(m, n) for m, n in found if m != module]


def _graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in _imports(m)} for m in MODULES}


def test_the_scan_sees_the_packages_and_their_imports():
    graph = _graph()
    assert {"wsicore.files", "preprocessing.stores", "slidechat.model", "slidechat.checkpoint"} <= set(graph)
    assert "slidechat.model" in graph["slidechat.checkpoint"]  # a known edge: the scan is not blind
    assert "preprocessing.stores" in graph["slidechat.train"]


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_layers():
    wrong = []
    for module in MODULES:
        for target, name in _imports(module):
            if module.startswith("wsicore") and not target.startswith("wsicore"):
                wrong.append(f"{module} -> {target}")
            if module.startswith("preprocessing") and target.startswith("slidechat"):
                wrong.append(f"{module} -> {target}")
            if module.startswith("slidechat") and target.startswith("preprocessing"):
                allowed = target == "preprocessing.stores" or name in ENTRY_POINTS.get(target, set())
                if not allowed:
                    wrong.append(f"{module} -> {target}{'.' + name if name else ''}")
    assert wrong == []
