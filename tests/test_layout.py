"""The import graph of `flows/` and `tasks/`: no circle, and stage code is imported only by the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package a.b names a.b.x
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from tasks import graph` names a module
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles a depth-first walk meets, each as the modules along it."""
    found: list[list[str]] = []
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                done.add(path.pop())
                stack.pop()
            elif nxt in path:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in done:
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle():
    assert cycles(import_graph()) == []


def stage_importers(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Modules of `tasks/` that import a stage module, with the stages they import."""
    stages = {m for m in graph if m.startswith("tasks.stages.") and m != "tasks.stages.files"}
    return {m: found for m, deps in graph.items() if m.startswith("tasks") and (found := deps & stages)}


def test_only_the_pipeline_graph_imports_a_stage():
    graph = import_graph()
    assert set(stage_importers(graph)) == {"tasks.pipeline.graph"}
    assert stage_importers(graph)["tasks.pipeline.graph"] == {
        "tasks.stages.download", "tasks.stages.validate", "tasks.stages.pretrain", "tasks.stages.finetune",
        "tasks.stages.baselines", "tasks.stages.evaluate", "tasks.stages.report"}


def test_config_imports_nothing_of_the_project():
    assert import_graph()["tasks.config"] == set()


# What each lower package may import besides itself, `tasks.config`, `tasks.document` and `tasks.stages.files`.
BELOW = {"tasks.store": set(), "tasks.data": {"tasks.store"}, "tasks.ml": {"tasks.data", "tasks.store"},
         "tasks.serve": {"tasks.data", "tasks.ml", "tasks.store"},
         "tasks.runs": {"tasks.data", "tasks.ml", "tasks.store", "tasks.pipeline"}}
SHARED = {"tasks", "tasks.config", "tasks.document", "tasks.stages.files"}


def test_lower_packages_import_only_what_lies_below_them():
    wrong = {}
    for module, deps in import_graph().items():
        package = ".".join(module.split(".")[:2])
        if package in BELOW:
            allowed = BELOW[package] | {package}
            if bad := sorted(d for d in deps - SHARED if ".".join(d.split(".")[:2]) not in allowed):
                wrong[module] = bad
    assert wrong == {}


def test_tests_are_laid_out_as_the_code_is():
    """tests/flows/ holds the flows' and command line's tests, tests/tasks/<package>/ each package's."""
    misplaced = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("test_*.py"))
                 if p.parent != ROOT / "tests"  # this file: the whole tree's
                 and not (ROOT / p.parent.relative_to(ROOT / "tests")).is_dir()]
    loose = [p.name for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name]
    assert misplaced == [] and loose == []
