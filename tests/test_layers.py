"""The layers hold: no import cycle among first-party modules, and no first-party import
hidden inside a function unless it is listed below with its reason.

Imports are read from the source (AST), module level and inside functions alike; imports
under ``if TYPE_CHECKING:`` are left out (they never run). Narwhals' ``no_imports_test`` is
the model: the test reads the code, it does not trust it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featurepipe", "serving", "training")

# Entry points: each command imports the stage it runs when it runs, so `--help` and the
# other commands stay fast (importing Feast alone takes about 4.5 s).
LAZY_MODULES = {
    "featurepipe.cli.pipeline": "CLI: a command imports its stage when it runs",
    "featurepipe.cli.quality": "CLI: a command imports its stage when it runs",
    "featurepipe.cli.training": "CLI: a command imports its stage when it runs",
    "featurepipe.cli.local": "CLI: a command imports its stage when it runs",
    "featurepipe.cli.stream": "CLI: a command imports its stage when it runs",
    "featurepipe.demo": "CLI: the demo imports each step's stage when the step runs",
    "featurepipe.stream.runner": "CLI: `featurepipe stream` sub-commands import their source when they run",
    "serving.command": "CLI: `featurepipe serve` / `python -m serving` import the server when it starts",
}

# (module, imported module): why the import stays inside a function.
LAZY_IMPORTS = {
    ("featurepipe.quality.runlog", "featurepipe.definitions"):
        "the Feast SDK only to hash definitions: readers of the run log stay light",
    ("featurepipe.quality.runlog", "featurepipe"):
        "the package version at run time (the package imports the run log's readers)",
    ("featurepipe.quality.runlog", "featurepipe.errors"): "kept beside the one raise that needs it",
    ("serving", "serving.server"):
        "the package's face: `import serving` (the client) must not load the server",
    ("featurepipe.cli.group", "serving.command"):
        "`featurepipe serve` is the server's own command: loading it loads gRPC, so only when asked for",
}


@dataclass(frozen=True)
class Import:
    module: str
    target: str
    line: int
    in_function: bool


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    found: list[Import] = []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            checking = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module if is_package else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for name in targets:
                if name.split(".")[0] in PACKAGES and not checking:
                    target = _resolve(name, modules)
                    if target and target != module:
                        found.append(Import(module, target, child.lineno, in_function))
            visit(child, nested, checking)

    visit(ast.parse(path.read_text(encoding="utf-8")), False, False)
    return found


def _graph() -> tuple[dict[str, set[str]], list[Import]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    every = []
    for module, path in modules.items():
        for imp in _imports(module, path, modules):
            edges[module].add(imp.target)
            every.append(imp)
    return edges, every


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_among_first_party_modules() -> None:
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_function_level_imports_are_listed_with_a_reason() -> None:
    _, every = _graph()
    unlisted = sorted({
        f"{i.module}:{i.line} imports {i.target} inside a function"
        for i in every
        if i.in_function and i.module not in LAZY_MODULES and (i.module, i.target) not in LAZY_IMPORTS
    })
    assert unlisted == [], (
        "move these imports to module level, or list them in tests/test_layers.py with the reason "
        "they must stay lazy:\n" + "\n".join(unlisted))


def test_the_allowlists_hold_nothing_stale() -> None:
    """Every allowlisted lazy import still exists (a list that only grows hides the layers)."""
    _, every = _graph()
    lazy = {(i.module, i.target) for i in every if i.in_function}
    assert sorted(set(LAZY_IMPORTS) - lazy) == []
    assert sorted(set(LAZY_MODULES) - {m for m, _ in lazy}) == []


def test_the_checker_sees_a_cycle_and_a_lazy_import(tmp_path: Path) -> None:
    """The reader itself: a cycle hidden by an import inside a function is found."""
    modules = {"featurepipe.a": tmp_path / "a.py", "featurepipe.b": tmp_path / "b.py"}
    modules["featurepipe.a"].write_text("from featurepipe.b import f\n")
    modules["featurepipe.b"].write_text("def f():\n    from featurepipe import a\n    return a\n")
    imports = [i for m, p in modules.items() for i in _imports(m, p, {**modules, "featurepipe": tmp_path})]
    edges = {m: {i.target for i in imports if i.module == m} for m in modules}
    assert edges["featurepipe.b"] == {"featurepipe.a"}
    assert _cycles(edges) == [["featurepipe.a", "featurepipe.b"]]
    assert [(i.module, i.in_function) for i in imports] == [("featurepipe.a", False), ("featurepipe.b", True)]
