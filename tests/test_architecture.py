"""The layers of docs/architecture.md, kept true: data/ and model/ import nothing of
sweep/ or bench/, sweep/ nothing of bench/, no two modules import each other (nor any
longer loop), the training recipe is built in one module, and the page names every
module, and only modules that exist.

Read from the source with `ast`, so that an import inside a function counts as much as
one at the top: a loop through a lazy import is still a loop."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "model", "sweep", "bench")
# What each layer may import of ours (docs/architecture.md, "Three layers").
MAY_IMPORT = {"data": {"data"}, "model": {"model"}, "sweep": {"data", "model", "sweep"},
              "bench": {"data", "model", "sweep", "bench"}}
PAGE = ROOT / "docs" / "architecture.md"
MODULE_NAMED = re.compile(r"\b((?:data|model|sweep|bench)/\w+\.py)\b")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """`package.module` -> its file, for every module of ours."""
    return {f"{p.parent.name}.{p.stem}": p for package in PACKAGES
            for p in sorted((root / package).glob("*.py")) if p.stem != "__init__"}


def only_for_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ast.unparse(test) in ("TYPE_CHECKING",
                                                              "typing.TYPE_CHECKING")


def imported_names(tree: ast.AST) -> set[str]:
    """Every dotted name an import statement in `tree` names (`from a import b` names `a`
    and `a.b`), wherever the statement is, but not under `if TYPE_CHECKING:`: those
    import nothing when the code runs."""
    names: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if only_for_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        names |= imported_names(node)
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Which of our modules each of our modules imports."""
    ours = modules(root)
    return {name: imported_names(ast.parse(path.read_text())) & ours.keys() - {name}
            for name, path in ours.items()}


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops: the strongly connected components of more than one module
    (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_each_layer_imports_only_the_layers_below_it() -> None:
    upward = [f"{module} imports {name}" for module, names in import_graph().items()
              for name in sorted(names)
              if name.split(".")[0] not in MAY_IMPORT[module.split(".")[0]]]
    assert not upward, upward


def test_no_two_modules_import_each_other() -> None:
    assert loops(import_graph()) == []


def test_the_loop_check_finds_a_loop_through_a_lazy_import(tmp_path: Path) -> None:
    """The checks above pass because the code is so, not because they see nothing: a loop
    of three modules, one link inside a function, and a type-only import that is none."""
    (tmp_path / "sweep").mkdir()
    for name, source in {
        "a": "from sweep import b\n",
        "b": "def later():\n    from sweep.c import thing\n",
        "c": "import sweep.a\n",
        "d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sweep import a\n",
    }.items():
        (tmp_path / "sweep" / f"{name}.py").write_text(source)
    graph = import_graph(tmp_path)
    assert graph["sweep.d"] == set()
    assert loops(graph) == [["sweep.a", "sweep.b", "sweep.c"]]


def optimizers_built(tree: ast.AST) -> list[str]:
    """The torch.optim optimizers and schedules a module constructs (calls, not types)."""
    return [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)
            and ast.unparse(node.func).startswith(("torch.optim.", "optim."))]


def test_the_training_recipe_is_built_in_one_place() -> None:
    """Optimizers and learning-rate schedules come from sweep/recipe.py (and its Muon):
    train.py, the benches and gpu_check build their training through it. The one
    exception is a forecast's own schedule: bench/anneal_forecast.py replaces the
    restored schedule's tail with a short linear anneal, which is what it measures."""
    own_schedule = {"bench.anneal_forecast": ["torch.optim.lr_scheduler.LinearLR"]}
    built = {name: optimizers_built(ast.parse(path.read_text()))
             for name, path in modules().items()
             if name not in ("sweep.recipe", "sweep.muon")}
    assert {name: calls for name, calls in built.items() if calls} == own_schedule


def test_the_architecture_page_names_every_module_and_no_other() -> None:
    named = set(MODULE_NAMED.findall(PAGE.read_text()))
    files = {str(path.relative_to(ROOT)) for path in modules().values()}
    assert sorted(files - named) == [], "modules the page does not name"
    assert sorted(named - files) == [], "modules the page names that do not exist"


def test_names_that_experiments_pickled_before_the_split_still_resolve() -> None:
    """An experiment's tuner.pkl names the trial-directory function and the sweep's
    config under sweep.run, where they were defined when it began; a resume unpickles
    them. (The searcher's old path, sweep.study.StudySearch: tests/test_study.py.)"""
    from sweep.config import SweepConfig
    from sweep.tuner import name_trial_dir

    assert pickle.loads(b"csweep.run\nname_trial_dir\n.") is name_trial_dir
    assert pickle.loads(b"csweep.run\nSweepConfig\n.") is SweepConfig


def test_the_readme_links_the_architecture_page() -> None:
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
