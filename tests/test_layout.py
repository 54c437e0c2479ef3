"""The package's layout: its folders are its layers, dependencies point one way, no module
is too long to read, and no SQL lives outside the store's package.

Layers, lowest first; a package (or top-level module) may import only from its own layer or
those below it (a lazy import inside a function counts too). Modules of one package import
each other freely, without cycles. A new package is placed here by deciding where it belongs.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rankbias"
LAYERS = [
    # shared helpers
    ["version", "utils", "validate"],
    # measurement of one matrix or one model; models and data sets
    ["metrics", "models", "data"],
    # one run's configuration and training, and the engines that train stacks of runs
    ["training"],
    # the theory made executable (it trains through training's SGD loop)
    ["theory"],
    # many runs and where they run; what is done with one trained model
    ["runs", "compress", "analyze"],
    # what is read from many runs: figures and pages, the rank law, framework callbacks
    ["report", "fit", "integrations"],
    # the paper's claims: rules, run sets, the reproduction pipeline
    ["claims"],
    # the command line
    ["cli", "__main__"],
    # the package itself re-exports the public names: nothing inside imports it
    ["__init__"],
]
MAX_LINES = 500
MAX_TOP_LEVEL_MODULES = 8
MIN_SUBPACKAGES = 6
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE TABLE|BEGIN IMMEDIATE)\b")
STORE_PACKAGE = "runs"


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py")}


def unit(name: str) -> str:
    """The layer unit of a module: its top-level package, or the module itself."""
    return name.split(".")[0]


def layer(name: str) -> int:
    for index, names in enumerate(LAYERS):
        if unit(name) in names:
            return index
    raise AssertionError(f"rankbias.{name} is in no layer of tests/test_layout.py: place it")


def imports(path: Path, name: str) -> set[str]:
    """The rankbias modules that module `name` imports, anywhere in it."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rankbias.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .y import z
                parts = package.split(".") if package else []
                base = parts[:len(parts) - node.level + 1]
                found.add("rankbias." + ".".join([*base, node.module or ""]).strip("."))
            elif node.module and node.module.startswith("rankbias."):
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif node.module == "rankbias":  # a subpackage, or a name of the package itself
                found |= {f"rankbias.{a.name}" for a in node.names}
    return {f.removeprefix("rankbias.") for f in found}


def resolve(target: str, names: dict[str, Path]) -> str:
    """The module an import names (an object imported from a module resolves to it)."""
    while target and target not in names and f"{target}.__init__" not in names:
        target = target.rpartition(".")[0]
    if not target:
        return "__init__"
    return target if target in names else f"{target}.__init__"


def graph() -> dict[str, set[str]]:
    names = modules()
    return {name: {t for t in (resolve(i, names) for i in imports(path, name)) if t != name}
            for name, path in names.items()}


def test_the_folders_are_the_layers():
    top_modules = [p.stem for p in PACKAGE.glob("*.py")]
    packages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]
    assert len(top_modules) <= MAX_TOP_LEVEL_MODULES, sorted(top_modules)
    assert len(packages) >= MIN_SUBPACKAGES, sorted(packages)
    for name in [*top_modules, *packages]:
        layer(name)  # every one placed


def test_dependencies_point_down():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if nxt.endswith("__init__") and node.startswith(nxt.removesuffix("__init__")):
                continue  # a module of a package reading its own package's names
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in edges:
        if name not in state:
            visit(name, [name])


def test_no_package_cycles():
    """Packages too: a package that imports another may not be imported back by it."""
    edges: dict[str, set[str]] = {}
    for a, targets in graph().items():
        edges.setdefault(unit(a), set()).update(unit(b) for b in targets if unit(b) != unit(a))
    cycles = sorted(f"{a} <-> {b}" for a, targets in edges.items() for b in targets
                    if a in edges.get(b, ()) and a < b)
    assert not cycles, cycles


@pytest.mark.parametrize("name, path", sorted(modules().items()))
def test_modules_stay_readable(name, path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"rankbias/{name}.py"


def test_sql_only_in_the_store_package():
    """Everything else asks the store: its methods own the schema and the locking."""
    outside = []
    for name, path in modules().items():
        if unit(name) == STORE_PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and SQL.search(node.value) and ("FROM" in node.value or "INTO" in
                                                    node.value or "BEGIN" in node.value):
                outside.append(f"rankbias.{name}, line {node.lineno}")
    assert not outside, outside


def test_the_old_module_paths_still_import():
    """0.2's flat module paths (the docs of that release) work for one more release."""
    import importlib

    spectral = importlib.import_module("rankbias.spectral")
    layers = importlib.import_module("rankbias.layers")
    from rankbias.metrics import layers as new_layers
    from rankbias.metrics import spectral as new_spectral

    assert spectral is new_spectral and layers is new_layers
    from rankbias.layers import weight_matrices  # noqa: F401
    from rankbias.store import Store  # noqa: F401
