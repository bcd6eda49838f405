"""Write the reference of lvis_longtail's config keys (docs/config_keys.md) from the code.

    python -m lvis_longtail.tools.config_reference --out docs/config_keys.md

Every key defined in :mod:`lvis_longtail.config`, grouped by node in the order the keys are
defined: its default (from the built config), its valid values (from
:mod:`lvis_longtail.config_check`: the enum's values, or the names registered for a
registry-named key) and the comment above its assignment. Then the detectron2 keys the check
validates and the renamed keys. ``tests/test_config_reference.py`` compares the committed file
with this output. Without ``--out`` the reference goes to stdout.
"""

import argparse
import ast
import inspect
import io
import tokenize
from typing import Dict, List, Optional, Tuple

from detectron2.config import get_cfg

import lvis_longtail  # noqa: F401  (registers the models, losses and augmentation steps)
from lvis_longtail.config import NODE_GROUPS, add_longtail_config
from lvis_longtail.config_check import ENUMS, REGISTRY_KEYS, RENAMED, get_key
from lvis_longtail.utils.io import atomic_write

COMMAND = "python -m lvis_longtail.tools.config_reference --out docs/config_keys.md"
INTRO = f"""# Config keys

The keys lvis_longtail adds to detectron2's config, node by node: default, valid values and
what each does. Generated from the code (the comment above each key in
`lvis_longtail/config/`, valid values from `lvis_longtail/config_check/`) by

    {COMMAND}

and checked by a test. `setup_cfg` (`lvis_longtail.engine`) rejects an unknown or renamed
key, a value outside its valid values and a broken rule between keys before anything is
built. What each method computes, its reference and every deliberate difference:
[methods.md](methods.md); network options (DCN, deformable RoI pooling, CARAFE, SyncBN,
timm): [architecture.md](architecture.md).
"""
# Registered names are listed when they come from lvis_longtail or detectron2's core (a
# detectron2 project, a test or a user may register more; the reference does not list them).
LISTED_MODULES = ("lvis_longtail.", "detectron2.modeling.")


class KeyDoc:
    """One key: dotted name, comment text (joined lines), whether it creates a node."""

    def __init__(self, key: str, comment: str, is_node: bool):
        self.key, self.comment, self.is_node = key, comment, is_node


def _comments(source: str) -> Dict[int, str]:
    """Line number -> text of the lines that hold only a comment."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not tok.line[: tok.start[1]].strip():
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _target_key(node: ast.expr) -> Optional[str]:
    """``cfg.A.B.C`` -> "A.B.C"; None for any other target."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "cfg" and parts:
        return ".".join(reversed(parts))
    return None


def _comment_above(comments: Dict[int, str], line: int) -> str:
    lines = []
    while line - 1 in comments:
        line -= 1
        lines.insert(0, comments[line])
    return " ".join(lines)


def keys_of(function) -> List[KeyDoc]:
    """The keys ``function`` (one of :data:`NODE_GROUPS`) assigns, in the order they are
    assigned: its statements in order, following calls of the module's own functions."""
    source = inspect.getsource(inspect.getmodule(function))
    tree = ast.parse(source)
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    comments = _comments(source)
    out: List[KeyDoc] = []

    def walk(fn: ast.FunctionDef) -> None:
        for stmt in fn.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                key = _target_key(stmt.targets[0])
                if key is not None:
                    is_node = isinstance(stmt.value, ast.Call) and _call_name(stmt.value) == "CN"
                    out.append(KeyDoc(key, _comment_above(comments, stmt.lineno), is_node))
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                if _call_name(stmt.value) in functions:
                    walk(functions[_call_name(stmt.value)])

    walk(functions[function.__name__])
    return out


def _call_name(call: ast.Call) -> Optional[str]:
    return call.func.id if isinstance(call.func, ast.Name) else None


def _format(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{list(value) if isinstance(value, tuple) else value}`"


def valid_values(key: str) -> str:
    """The valid values of ``key`` as text: an enum's values or a registry's names."""
    if key in ENUMS:
        return ", ".join(_format(v) for v in ENUMS[key])
    if key in REGISTRY_KEYS:
        registry, extra = REGISTRY_KEYS[key]
        names = [n for n, obj in registry if obj.__module__.startswith(LISTED_MODULES)]
        return ", ".join(f"`{n}`" for n in sorted(names + list(extra)))
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows: List[Tuple[str, ...]], header: Tuple[str, ...]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def documented_keys() -> Tuple[List[KeyDoc], Dict[str, str]]:
    """Every key of :mod:`lvis_longtail.config` (leaves) and the description of every node
    it creates, in definition order."""
    leaves, nodes = [], {}
    for function in NODE_GROUPS:
        for doc in keys_of(function):
            if doc.is_node:
                nodes[doc.key] = doc.comment
            else:
                leaves.append(doc)
    return leaves, nodes


def render() -> str:
    """The whole reference (markdown)."""
    cfg = add_longtail_config(get_cfg())
    leaves, nodes = documented_keys()
    groups: Dict[str, List[KeyDoc]] = {}
    for doc in leaves:
        groups.setdefault(doc.key.rpartition(".")[0], []).append(doc)
    out = [INTRO]
    for node, docs in groups.items():
        out += [f"## {node or '(top level)'}", ""]
        if nodes.get(node):
            out += [nodes[node], ""]
        rows = [
            (f"`{d.key}`", _format(get_key(cfg, d.key)), valid_values(d.key), d.comment)
            for d in docs
        ]
        out += _table(rows, ("Key", "Default", "Valid values", "Description")) + [""]
    ours = {d.key for d in leaves}
    d2_keys = [k for k in [*ENUMS, *REGISTRY_KEYS] if k not in ours]
    out += ["## detectron2 keys checked by lvis_longtail", ""]
    rows = [(f"`{k}`", _format(get_key(cfg, k)), valid_values(k)) for k in d2_keys]
    out += _table(rows, ("Key", "Default", "Valid values")) + [""]
    out += ["## Renamed keys", "", "A file or option that sets an old key is rejected.", ""]
    out += _table([(f"`{a}`", f"`{b}`") for a, b in RENAMED.items()], ("Old key", "New key"))
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="file to write (atomically); default: stdout")
    args = parser.parse_args(argv)
    text = render()
    if args.out is None:
        print(text, end="")
        return
    with atomic_write(args.out) as f:
        f.write(text)


if __name__ == "__main__":
    main()
