"""The package's layout: dependencies point one way, no module is too long to read.

Layers, lowest first; a module may import only from its own layer or those below it (a
lazy import inside a function counts too). Every module must be placed here: a new one
is placed by deciding where it belongs.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rankbias"
LAYERS = [
    # shared helpers
    ["version", "utils", "validate"],
    # measurement of one matrix or model; models and data sets
    ["spectral", "layers", "models", "data"],
    # a run's configuration, the theory's checks, tracking, the checkpoint format
    ["config", "bound", "gradient_rank", "theory", "tracker", "checkpoint"],
    # training one run, and the engines that train stacks of runs
    ["steps", "stack", "mlp_stack", "train"],
    ["ensemble", "store"],
    # sweeps of many runs, and where they run
    ["backends", "estimate", "sweep"],
    # what is done with the runs: claims, reports, compression, fits, analysis
    ["runsets", "claims", "analyze", "lowrank", "compress", "compress_claim", "law", "fit",
     "plots",
     "static_page", "explorer_data", "report", "explorer", "serve", "integrations"],
    ["reproduce"],
    # the command line
    ["config_flags", "commands", "cli", "__main__"],
    # the package itself re-exports the public names: nothing inside imports it
    ["__init__"],
]
MAX_LINES = 500


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py")}


def layer(name: str) -> int:
    top = name.split(".")[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"rankbias.{name} is in no layer of tests/test_layout.py: place it")


def imports(path: Path, name: str) -> set[str]:
    """The rankbias modules that module `name` imports, anywhere in it."""
    found = set()
    package = name.rsplit(".", 1)[0] if "." in name else ""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rankbias.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .y import z
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                found.add("rankbias." + ".".join([*filter(None, base), node.module or ""]))
            elif node.module and node.module.startswith("rankbias."):
                found.add(node.module)
            elif node.module == "rankbias":  # a submodule, or a name of the package itself
                found |= {f"rankbias.{a.name}" if (PACKAGE / a.name).exists()
                          or (PACKAGE / f"{a.name}.py").exists() else "rankbias.__init__"
                          for a in node.names}
    return {f.removeprefix("rankbias.").rstrip(".") for f in found}


def graph() -> dict[str, set[str]]:
    names = modules()
    edges = {}
    for name, path in names.items():
        targets = set()
        for target in imports(path, name):
            while target and target not in names and f"{target}.__init__" not in names:
                target = target.rpartition(".")[0]  # an object imported from a module
            if target and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


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
            if nxt.endswith("__init__") and nxt.rsplit(".", 1)[0] == node.rsplit(".", 1)[0]:
                continue  # a module of a package importing its own package's names
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in edges:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name, path", sorted(modules().items()))
def test_modules_stay_readable(name, path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"rankbias/{name}.py"
