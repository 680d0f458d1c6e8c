"""The layering of the packages, read from the source with `ast` (every import, also those inside
functions): `plasticity` imports nothing of ours; `warehouse` never imports Dagster, `assets`,
`dagster_project` or the command line, and each of its subpackages only the ones below it; the
command line imports Dagster only in `cli.ui`; no two modules import each other, directly or around
a loop. Each rule is also run on a small made-up tree that breaks it, so a check that stopped
seeing imports would fail here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("plasticity", "warehouse", "sql", "assets", "dagster_project", "cli")

#: warehouse's subpackages, lowest first, and what each may import besides itself
#: (always allowed: `plasticity`, `sql`, the standard library and third-party libraries but Dagster).
WAREHOUSE_LAYERS = {
    "warehouse.sources": (),
    "warehouse.settings": ("warehouse.sources",),
    "warehouse.store": ("warehouse.sources", "warehouse.settings"),
    "warehouse.run": ("warehouse.sources", "warehouse.settings", "warehouse.store"),
    "warehouse.present": ("warehouse.sources", "warehouse.settings", "warehouse.store"),
}
FORBIDDEN_IN_WAREHOUSE = ("dagster", "dagster_webserver", "assets", "dagster_project", "cli")
DAGSTER = ("dagster", "dagster_webserver", "dagster_project", "assets")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_tree(root: Path, packages=PACKAGES) -> dict[str, tuple[str, bool]]:
    """{module: (source, is_package)} of every module of `packages` under `root`."""
    tree = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree[module_name(path, root)] = (path.read_text(encoding="utf-8"), path.name == "__init__.py")
    return tree


def _top_level(node: ast.AST, module: ast.Module) -> bool:
    return any(node is stmt for stmt in module.body)


def imports_of(name: str, source: str, is_package: bool, known: set[str]) -> list[tuple[str, bool]]:
    """[(imported name, at module level)] of one module: `from a.b import c` gives ``a.b.c`` when that is
    a module of ours, else ``a.b``; relative imports are resolved; names outside `known` are kept
    as written (``dagster``, ``numpy`` ...)."""
    module = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(module):
        top = _top_level(node, module)
        if isinstance(node, ast.Import):
            found += [(alias.name, top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, top))
    return found


def import_graph(tree: dict[str, tuple[str, bool]]) -> dict[str, dict[str, bool]]:
    """{module: {imported name: imported at module level}}; names of ours are reduced to the nearest
    module of the tree (``warehouse.store.db.reader`` -> ``warehouse.store.db``)."""
    known = set(tree)
    graph = {}
    for name, (source, is_package) in tree.items():
        edges: dict[str, bool] = {}
        for target, top in imports_of(name, source, is_package, known):
            node = target
            while node and node not in known and "." in node:
                node = node.rpartition(".")[0]
            target = node if node in known else target
            if target != name:
                edges[target] = edges.get(target, False) or top
        graph[name] = edges
    return graph


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layering_problems(graph: dict[str, dict[str, bool]]) -> list[str]:
    ours = {name.split(".")[0] for name in graph}
    problems = []
    for name, edges in sorted(graph.items()):
        for target in sorted(edges):
            top_package = target.split(".")[0]
            if _within(name, "plasticity") and top_package in ours and top_package != "plasticity":
                problems.append(f"{name} imports {target}: plasticity is pure math and imports nothing of ours")
            if _within(name, "warehouse"):
                if any(_within(target, f) for f in FORBIDDEN_IN_WAREHOUSE):
                    problems.append(f"{name} imports {target}: the warehouse never imports Dagster, the assets, "
                                    "dagster_project or the command line")
                layer = next((layer for layer in WAREHOUSE_LAYERS if _within(name, layer)), None)
                if layer and _within(target, "warehouse") and target != "warehouse" and not _within(target, layer):
                    if not any(_within(target, allowed) for allowed in WAREHOUSE_LAYERS[layer]):
                        problems.append(f"{name} imports {target}: {layer} may import only "
                                        f"{', '.join(WAREHOUSE_LAYERS[layer]) or 'nothing else of warehouse'}")
            if (_within(name, "assets") or _within(name, "dagster_project")) and _within(target, "cli"):
                problems.append(f"{name} imports {target}: Dagster code never imports the command line")
            if _within(name, "sql") and top_package in ours and top_package != "sql":
                problems.append(f"{name} imports {target}: sql holds the SQL files and imports nothing of ours")
            if _within(name, "cli") and any(_within(target, d) for d in DAGSTER):
                if name != "cli.ui":
                    problems.append(f"{name} imports {target}: only `plasticity ui` (cli.ui) may need Dagster")
                elif edges[target] and _within(target, "dagster"):
                    problems.append(f"{name} imports {target} at module level: Dagster only when `ui` runs")
    return problems


def import_cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_package_is_read():
    graph = import_graph(read_tree(REPO))
    assert {name.split(".")[0] for name in graph} == set(PACKAGES)
    assert "warehouse.store.db" in graph["warehouse.run.pipeline"]
    assert graph["cli.ui"]["dagster"] is False  # imported inside the function that starts the UI


def test_the_layering_holds():
    assert layering_problems(import_graph(read_tree(REPO))) == []


def test_no_import_cycles():
    assert import_cycles(import_graph(read_tree(REPO))) == []


def _made_up(**modules: str) -> dict[str, dict[str, bool]]:
    return import_graph({name.replace("__", "."): (source, False) for name, source in modules.items()})


def test_the_checks_see_each_kind_of_break():
    graph = _made_up(
        plasticity__head="import numpy\nfrom warehouse.store import db\n",
        warehouse__store__db="def f():\n    import dagster\n",
        warehouse__sources__card="from warehouse.run.pipeline import analyze_dataset\n",
        warehouse__run__pipeline="from ..store import db\n",
        warehouse__present__plots="from warehouse.run import pipeline\n",
        cli__main="from dagster_project import steps\n",
        cli__ui="import dagster\n",
        dagster_project__steps="from cli.main import build_parser\n",
        sql__helpers="import warehouse\n",
    )
    problems = layering_problems(graph)
    assert [p.split(":")[0] for p in problems] == [
        "cli.main imports dagster_project.steps",
        "cli.ui imports dagster at module level",
        "dagster_project.steps imports cli.main",
        "plasticity.head imports warehouse.store.db",
        "sql.helpers imports warehouse",
        "warehouse.present.plots imports warehouse.run.pipeline",
        "warehouse.sources.card imports warehouse.run.pipeline",
        "warehouse.store.db imports dagster",
    ]
    assert graph["warehouse.run.pipeline"] == {"warehouse.store.db": True}  # a relative import, resolved
    assert import_cycles(graph) == [["cli.main", "dagster_project.steps"]]
    loop = _made_up(warehouse__store__db="def f():\n    from warehouse.store import schema\n",
                    warehouse__store__schema="from warehouse.store.db import reader\n")
    assert import_cycles(loop) == [["warehouse.store.db", "warehouse.store.schema"]]
    assert layering_problems(loop) == []


def test_the_command_line_starts_without_dagster():
    code = ("import sys, contextlib, io\nfrom cli.main import build_parser\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        build_parser().parse_args(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'dagster_webserver', 'assets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
