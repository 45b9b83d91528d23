"""The layers hold: no import cycle among first-party modules, and no first-party import
hidden inside a function unless it is listed below with its reason; imports point down the
layers of ../shared/DESIGN.md (core, stages, Feast adapters and jobs, entry points).

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
    "featurepipe.cli.online": "CLI: a command imports its stage when it runs",
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
    ("featurepipe.jobs.backfill", "featurepipe.jobs.spark_backfill"):
        "the Spark engine is an extra: it (and pyspark) load only when --engine spark is asked for",
    ("featurepipe.jobs.spark_backfill", "featurepipe.quality.spark_gate"):
        "after require_spark(), so a missing pyspark or Java gets the message that says what to install",
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


# The layers of ../shared/DESIGN.md, bottom up. A module imports from its own layer or the
# ones below; between two stages only along the data flow (STAGE_EDGES).
LAYERS: dict[str, int] = {
    "featurepipe": 0,  # the package itself holds only its version
    "core": 0, "errors": 0, "config": 0, "definitions": 0, "redis_server": 0,
    "batch": 1, "offline": 1, "online": 1, "stream": 1, "quality": 1, "serving": 1, "training": 1,
    "generate": 1, "report": 1,
    "feast": 2, "jobs": 2,
    "cli": 3, "demo": 3, "orchestration": 3,
}
LAYER_NAMES = {0: "core", 1: "stages", 2: "Feast adapters and jobs", 3: "entry points"}

STAGE_EDGES = {
    ("stream", "online"): "the stream job writes online rows through online's writer",
    ("stream", "batch"): "stream rows come from the batch engine's SQL, so both agree to the bit",
    ("stream", "quality"): "the stream checks events against the same data contracts and records its run",
    ("quality", "online"): "the materialisation gate checks the latest rows with online's own scan",
    ("serving", "online"): "the server reads Feast's key layout as online writes it",
}

# Modules that import upwards, each for one reason.
UPWARD_IMPORTS = {
    ("featurepipe.online.engine", "featurepipe.feast.materialization_engine"):
        "re-export at the dotted path that feature_store.yaml files written before 0.2 name",
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "featurepipe" and len(parts) > 1 else parts[0]


def test_imports_point_down_the_layers() -> None:
    _, every = _graph()
    assert set(LAYERS) >= {_room(m) for m in _modules()}, "give every new folder a layer in LAYERS"
    wrong = set()
    for i in every:
        source, target = _room(i.module), _room(i.target)
        if source == target or (i.module, i.target) in UPWARD_IMPORTS:
            continue
        up, down = LAYERS[source], LAYERS[target]
        if down > up:
            wrong.add(f"{i.module} ({LAYER_NAMES[up]}) imports {i.target} ({LAYER_NAMES[down]})")
        elif down == up == 1 and (source, target) not in STAGE_EDGES:
            wrong.add(f"stage {source} imports stage {target} ({i.module} -> {i.target}): declare a hook "
                      "and let the layer above wire it, or add the edge to STAGE_EDGES with its reason")
    assert sorted(wrong) == []


def test_the_core_never_loads_feast() -> None:
    """Quoting an identifier or opening DuckDB must not import the Feast SDK (4.5 s)."""
    for path in (ROOT / "featurepipe" / "core").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] == "feast" for n in names), f"{path.name} imports {names}"


def test_the_layer_exceptions_hold_nothing_stale() -> None:
    _, every = _graph()
    rooms = {(_room(i.module), _room(i.target)) for i in every}
    pairs = {(i.module, i.target) for i in every}
    assert sorted(set(STAGE_EDGES) - rooms) == []
    assert sorted(set(UPWARD_IMPORTS) - pairs) == []
