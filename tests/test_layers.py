"""Layers of lvis_longtail point one way, and no import cycle hides in a function body.

Every ``import`` of an lvis_longtail module is read from the source (module level and
function level alike), so a function-level import that would close a cycle fails here too.
Run as a script to print each module's imports of lvis_longtail modules:
``python tests/test_layers.py``.
"""

import ast
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lvis_longtail"

# The layer of each part of the package, lowest first. A module may import modules of its own
# part or of a lower layer. The package root (lvis_longtail/__init__.py: applies the
# compatibility layer, registers the datasets and models) is the entry point: Python runs it
# before any submodule, so importing it is not an edge, and its own imports are not checked.
LAYERS: Dict[str, int] = {
    "lvis_longtail.config": 0,  # defaults only: imports nothing of lvis_longtail
    "lvis_longtail.registries": 0,
    "lvis_longtail.utils": 0,
    "lvis_longtail.layers": 1,
    "lvis_longtail.compat": 2,
    "lvis_longtail.config_check": 2,
    "lvis_longtail.data": 3,
    "lvis_longtail.modeling": 4,
    "lvis_longtail.evaluation": 4,
    "lvis_longtail.engine": 5,
    "lvis_longtail.tools": 6,
}


class Import(NamedTuple):
    source: str  # importing module
    target: str  # imported lvis_longtail module
    line: int
    level: str  # "module" or "function"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> List[Import]:
    """The lvis_longtail modules ``path`` imports: ``from pkg import name`` counts as an
    import of ``pkg.name`` when that is a module, else of ``pkg``."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [s for s in subs if _is_module(s)] or [base]
            if len(targets) < len(subs) and base not in targets:
                targets.append(base)  # names that are not modules come from the package
        else:
            continue
        level = "module" if id(node) in top_level else "function"
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found.append(Import(module, target, node.lineno, level))
    return found


def all_imports() -> List[Import]:
    return [i for p in sorted((REPO / PACKAGE).rglob("*.py")) for i in imports_of(p)]


def part_of(module: str) -> str:
    """The key of :data:`LAYERS` that ``module`` belongs to (its longest prefix)."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not matches:
        raise KeyError(f"{module} is in no layer of LAYERS (tests/test_layers.py)")
    return max(matches, key=len)


def _cycles(edges: Dict[str, set]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer():
    modules = [module_name(p) for p in (REPO / PACKAGE).rglob("*.py")]
    outside = [m for m in modules if m != PACKAGE and not any(
        m == p or m.startswith(p + ".") for p in LAYERS)]  # fmt: skip
    assert not outside, f"modules in no layer of LAYERS: {outside}"
    # and every layer holds a module (no stale entry)
    assert {part_of(m) for m in modules if m != PACKAGE} == set(LAYERS)


def test_config_imports_nothing_of_the_package():
    found = [i for i in all_imports() if i.source.startswith("lvis_longtail.config.")]
    found += [i for i in all_imports() if i.source == "lvis_longtail.config"]
    outside = [i for i in found if not i.target.startswith("lvis_longtail.config.")]
    assert not outside, outside


def test_layers_point_one_way():
    upward = []
    for i in all_imports():
        if PACKAGE in (i.source, i.target):
            continue
        src, dst = part_of(i.source), part_of(i.target)
        if src != dst and LAYERS[dst] >= LAYERS[src]:
            upward.append(f"{i.source}:{i.line} ({i.level}) imports {i.target}")
    assert not upward, "imports of a module of the same or a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges: Dict[str, set] = {}
    for i in all_imports():
        if i.source != i.target:
            edges.setdefault(i.source, set()).add(i.target)
    assert _cycles(edges) == []


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    found = imports_of(REPO / PACKAGE / "tools" / "pseudo_label.py")
    assert ("lvis_longtail.engine", "function") in {(i.target, i.level) for i in found}
    relative = imports_of(REPO / PACKAGE / "config" / "__init__.py")
    assert {i.target for i in relative} >= {"lvis_longtail.config.data"}
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


if __name__ == "__main__":
    for imp in all_imports():
        print(f"{imp.source} -> {imp.target}  [{imp.level}, line {imp.line}]")
