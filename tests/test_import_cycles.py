"""No import cycles among kdzoo's modules, counting imports inside functions.

An import inside a function hides a cycle from Python's import machinery but not from the design:
the two modules still depend on each other. So the graph here has an edge for every ``import``
and ``from ... import`` statement anywhere in a file (functions, methods, ``try`` blocks, module
``__getattr__``), except under ``if TYPE_CHECKING:``, which never runs.

How an import becomes an edge:

* ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) depend on the module ``a.b.c``;
  ``from a.b import name`` (``name`` not a submodule) depends on ``a.b``: for a package, its
  ``__init__.py``. Relative imports are resolved against the importing module's package.
* Parent packages are *not* counted: ``from kdzoo.methods.base import X`` runs
  ``kdzoo/methods/__init__.py`` first, but counting that would turn every package whose
  ``__init__`` re-exports its submodules into a cycle. A submodule that imports names from its
  own package's ``__init__`` (``from kdzoo.methods import KD`` inside ``kdzoo/methods/x.py``)
  does depend on it, and closes a cycle when that ``__init__`` imports the submodule.
* Only modules under ``kdzoo/`` are nodes; third-party imports are ignored.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdzoo"


def module_names(package: Path) -> dict[str, Path]:
    """Every module of ``package`` (a folder with ``__init__.py``), by dotted name."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth, outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the body never runs; an ``else:`` does
            continue
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """``name`` if it is a module, else its longest prefix that is one (``None``: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the modules of ``package``."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]  # package of relative imports
        targets: list[str] = []
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules else base)
        for target in targets:
            known = _known(target, modules)
            if known is not None and known != name:
                graph[name].add(known)
    return graph


def find_cycle(graph: Mapping[str, set[str] | list[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when it is acyclic."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path, on_path = [root], {root}
        iterators = [iter(sorted(graph.get(root, ())))]
        while iterators:
            child = next(iterators[-1], None)
            if child is None:
                iterators.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif child in on_path:
                return [*path[path.index(child) :], child]
            elif child not in done:
                path.append(child)
                on_path.add(child)
                iterators.append(iter(sorted(graph.get(child, ()))))
    return None


# ---- the cycle finder and the graph builder check themselves ---------------------------------


def test_find_cycle_reports_a_cycle_and_only_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = find_cycle({"x": {"y"}, "y": {"z"}, "z": {"w", "y"}, "w": set()})
    assert cycle == ["y", "z", "y"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b"}}) is None  # an edge to a node without its own entry


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_import_graph_counts_function_level_and_resolves_names(tmp_path) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import thing\n",
            "pkg/sub/__init__.py": "from . import leaf\nfrom .leaf import x\n",
            "pkg/sub/leaf.py": (
                "from __future__ import annotations\n"
                "import os\n"
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from pkg.typed import T\n"
                "else:\n"
                "    from pkg import other\n"
                "def f():\n"
                "    import pkg.late.deep\n"
                "    from ..lazy import y\n"
            ),
            "pkg/typed.py": "",
            "pkg/other.py": "import pkg.sub.leaf\n",
            "pkg/late/__init__.py": "",
            "pkg/late/deep.py": "",
            "pkg/lazy.py": "from pkg.sub.leaf import x\n",
        },
    )
    graph = import_graph(package)
    assert graph["pkg"] == {"pkg.sub"}  # a name from a package: its __init__
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}  # `from . import leaf` is the submodule
    # TYPE_CHECKING left out, its else kept, function-level and relative imports counted, and
    # the parents of pkg.late.deep not counted.
    assert graph["pkg.sub.leaf"] == {"pkg.other", "pkg.late.deep", "pkg.lazy"}
    # Both pkg.other (from the else branch) and pkg.lazy (from inside a function) close a cycle.
    (package / "lazy.py").write_text("")
    assert _members(find_cycle(import_graph(package))) == {"pkg.other", "pkg.sub.leaf"}
    (package / "other.py").write_text("")
    (package / "lazy.py").write_text("from pkg.sub.leaf import x\n")
    assert _members(find_cycle(import_graph(package))) == {"pkg.lazy", "pkg.sub.leaf"}
    (package / "lazy.py").write_text("")
    assert find_cycle(import_graph(package)) is None


def _members(cycle: list[str] | None) -> set[str]:
    assert cycle is not None and cycle[0] == cycle[-1]
    return set(cycle)


# ---- kdzoo itself -----------------------------------------------------------------------------


def test_kdzoo_has_no_import_cycles() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and graph["kdzoo.__main__"] == {"kdzoo.cli"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cli_dispatch_sits_above_every_subcommand() -> None:
    """``kdzoo.cli`` imports the subcommands (lazily), never the other way round."""
    graph = import_graph(PACKAGE)
    importers = sorted(name for name, targets in graph.items() if "kdzoo.cli" in targets)
    assert importers == ["kdzoo.__main__"]
