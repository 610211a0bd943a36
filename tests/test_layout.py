"""The package's shape: no function longer than MAX_LINES lines, and no import circle between
its modules. Both read the source with `ast`: nothing of cnnlab is imported or run."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "cnnlab"
MAX_LINES = 70  # from the `def` line to the function's last line, docstring included


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name; a package's __init__.py is the package."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def functions(tree: ast.AST, prefix: str = ""
              ) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method in `tree`, nested ones too, with its qualified name."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def long_functions() -> list[str]:
    """`path:line name (N lines)` of each function longer than MAX_LINES."""
    found = []
    for path in modules().values():
        for name, node in functions(parse(path)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                found.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno} {name} "
                             f"({length} lines)")
    return found


def imported(module: str, node: ast.Import | ast.ImportFrom, known: dict[str, Path]
             ) -> list[str]:
    """The package's modules that import statement `node` in `module` names: for
    `from X import y` the submodule X.y where there is one, else X."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            if known[module].name != "__init__.py":
                base = base[:-1]  # a plain module's imports are relative to its package
            base = base[:len(base) - (node.level - 1)]
            base = ".".join([*base, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        names = [name if name in known else base
                 for name in (f"{base}.{alias.name}" for alias in node.names)]
    return [name for name in dict.fromkeys(names) if name in known]


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported module: line of the first such import}} between the package's
    modules, from every import statement anywhere in each module (in functions and in
    `if TYPE_CHECKING:` blocks too)."""
    known = modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in known}
    for name, path in known.items():
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(name, node, known):
                    graph[name][target] = min(graph[name].get(target, node.lineno), node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph`."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_path(graph: dict[str, dict[str, int]], start: str, end: str,
                  within: set[str]) -> list[str]:
    """The shortest path from `start` to `end` through the modules `within` (breadth first)."""
    came_from: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        if node == end:
            break
        for target in sorted(graph[node]):
            if target in within and target not in came_from:
                came_from[target] = node
                queue.append(target)
    path = [end]
    while (previous := came_from[path[-1]]) is not None:
        path.append(previous)
    return path[::-1]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """For every import that lies on a circle, the shortest circle through it, each starting
    at its first module by name (`[a, b, a]` for a -> b -> a)."""
    found: dict[tuple[str, ...], list[str]] = {}
    for component in strongly_connected(graph):
        members = set(component)
        for source in component:
            for target in graph[source]:
                if target not in members:
                    continue
                circle = [source, *shortest_path(graph, target, source, members)][:-1]
                first = circle.index(min(circle))
                circle = circle[first:] + circle[:first]
                found.setdefault(tuple(circle), [*circle, circle[0]])
    return sorted(found.values())


def describe(circle: list[str], graph: dict[str, dict[str, int]], known: dict[str, Path]
             ) -> str:
    """`a -> b -> a`, and below it where each of its imports is."""
    where = [f"    {known[a].relative_to(REPO).as_posix()}:{graph[a][b]} imports {b}"
             for a, b in zip(circle, circle[1:])]
    return "\n".join([" -> ".join(circle), *where])


def test_no_function_is_too_long():
    found = long_functions()
    assert not found, (f"{len(found)} functions are longer than {MAX_LINES} lines; split "
                       "them into named helpers:\n" + "\n".join(found))


def test_no_import_circle():
    graph = import_graph()
    known = modules()
    found = cycles(graph)
    assert not found, (f"{len(found)} import circles between cnnlab's modules:\n"
                       + "\n".join(describe(circle, graph, known) for circle in found))



def run_directory_names() -> dict[str, str]:
    """The file names of run, sweep and search directories as runs.py names them: its
    module-level string constants (CONFIG = "config.json", ...)."""
    names = {}
    for node in parse(modules()[f"{PACKAGE}.runs"]).body:
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets
                       for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for target, value in zip(targets, values):
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    names[value.value] = target.id
    return names


def test_only_runs_spells_the_names_of_a_run_directorys_files():
    """One owner names every file of a run, sweep or search directory: the other modules use
    its names (runs.CONFIG, not "config.json"), also inside f-strings."""
    from cnnlab.options import OPTIONS

    names = {k: v for k, v in run_directory_names().items()
             if k not in OPTIONS}  # "tensorboard" names a folder and an option
    assert {"config.json", "summary.json", "metrics.jsonl", "best.pt", "sweep.json",
            "tune.json", "diverged.json", "loss.png", ".cnnlab.lock"} <= names.keys()
    spelled = [f"{name}:{node.lineno}: {node.value!r} (runs.{names[node.value]})"
               for name, path in modules().items() if name != f"{PACKAGE}.runs"
               for node in ast.walk(parse(path))
               if isinstance(node, ast.Constant) and node.value in names]
    assert not spelled, "\n".join(spelled)


def test_the_architecture_table_names_every_module_and_nothing_else():
    """ARCHITECTURE.md's table gives each module its one job: a new module gets a row, a
    removed one loses it."""
    import re

    text = (REPO / "ARCHITECTURE.md").read_text()
    rows = re.findall(r"^\| `([\w/]+\.py)` \|", text, re.M)
    present = sorted(path.relative_to(SRC / PACKAGE).as_posix()
                     for path in (SRC / PACKAGE).rglob("*.py"))
    assert sorted(rows) == present, (sorted(set(present) - set(rows)),
                                     sorted(set(rows) - set(present)))


# Third-party packages whose import takes long enough to matter at start-up
HEAVY_PACKAGES = {"torch", "torchvision", "numpy", "optuna", "sqlalchemy", "matplotlib",
                  "captum", "onnx", "onnxruntime", "onnxscript", "scipy", "PIL"}


def top_level_imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """The import statements a module runs when it is imported (not those in functions or
    under `if TYPE_CHECKING:`)."""
    found = []
    for node in parse(path).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.Try):  # try: import tomllib / except: import tomli
            found += [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def heavy_modules() -> set[str]:
    """The package's modules whose import loads a heavy package, themselves or through
    another of the package's modules."""
    known = modules()
    direct, uses = set(), {}
    for name, path in known.items():
        uses[name] = set()
        for node in top_level_imports(path):
            if isinstance(node, ast.Import):
                third = {alias.name.split(".")[0] for alias in node.names}
            else:
                third = {(node.module or "").split(".")[0]} if not node.level else set()
            if third & HEAVY_PACKAGES:
                direct.add(name)
            uses[name].update(imported(name, node, known))
    heavy, grew = set(direct), True
    while grew:
        grew = False
        for name, targets in uses.items():
            if name not in heavy and targets & heavy:
                heavy.add(name)
                grew = True
    return heavy


def test_the_package_imports_its_own_modules_at_the_top():
    """A reader sees a module's dependencies at its top: an import of one of the package's
    own modules inside a function is for a module whose import loads a heavy package
    (torch, Optuna, matplotlib ...), which is deferred so that `cnnlab --help` stays fast."""
    known, heavy = modules(), heavy_modules()
    assert {"cnnlab.trainer", "cnnlab.engine", "cnnlab.models.lenet"} <= heavy
    assert not {"cnnlab.cli", "cnnlab.config", "cnnlab.runs", "cnnlab.models"} & heavy
    inside = []
    for name, path in known.items():
        tree = parse(path)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level:
                    light = [t for t in imported(name, node, known) if t not in heavy]
                    inside += [f"{name}:{node.lineno} imports {t} in {fn.name}()"
                               for t in light if t != name]
    assert not inside, "\n".join(sorted(set(inside)))
