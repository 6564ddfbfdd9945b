"""The shape of the package, read from the source: layers, no import circle, small modules.

Every module of ``fusioner`` and ``mosaic4`` is parsed with :mod:`ast` (nothing is imported), and
every ``import`` in it counts, at module level or inside a function: an import deferred into a
function to dodge a circle is still the circle. Only ``if TYPE_CHECKING:`` blocks are skipped, as
they never run. A package's ``__init__`` is the module named after the package, and an import of
``a.b`` is an import of ``a.b`` alone (the parent packages Python runs first are not counted).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fusioner", "mosaic4")
MAX_LINES = 400

# Bottom first. A module belongs to the layer of the longest prefix that names it (``a.b`` names
# ``a.b`` and ``a.b.*``) and may import only from its own layer and those below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Errors, file writing, input pixels, the version; the backbones behind their contracts and registry.
    (
        "base",
        (
            "fusioner.errors",
            "fusioner.io",
            "fusioner.inputs",
            "fusioner.progress",
            "fusioner.version",
            "fusioner.visualize",
            "fusioner.adapters",
        ),
    ),
    # The flat Config; the registries above hand it their names (config.register_choices).
    ("config", ("fusioner.config",)),
    ("data", ("fusioner.data",)),
    # The head's parts (fusion, decoder, head, released checkpoints, seeding, file names).
    ("model", ("fusioner.model",)),
    ("methods", ("fusioner.methods", "fusioner.methods.zegclip_st")),
    ("inference", ("fusioner.inference", "fusioner.labels", "fusioner.decide")),
    # A run directory's files, and what is read from them (metrics, calibration, eval outputs).
    ("run", ("fusioner.run", "fusioner.metrics_file", "fusioner.calibration", "fusioner.eval_output")),
    # FusionerModel ties a method's head, the adapters, a refiner and inference together, and
    # from_pretrained reads a run directory: it sits above all four.
    ("pretrained", ("fusioner.model.model", "fusioner.model.released_import", "=fusioner.model")),
    ("engine", ("fusioner.engine",)),
    (
        "apps",
        (
            "fusioner.sweep",
            "fusioner.hub",
            "fusioner.export",
            "fusioner.demo",
            "fusioner.predict",
            "fusioner.quickstart",
            "fusioner.pictograms",
            "mosaic4",
        ),
    ),
    ("cli", ("fusioner.cli", "fusioner.commands", "mosaic4.cli", "=fusioner")),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            init = parts[-1] == "__init__"
            found[".".join(parts[:-1] if init else parts)] = (path, init)
    return found


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST):
    """Every node, except what sits under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _type_checking(child):
            yield from (n for stmt in child.orelse for n in [stmt, *_nodes(stmt)])
            continue
        yield child
        yield from _nodes(child)


def imports_of(name: str) -> list[tuple[str, int]]:
    """``(module, line)`` of every import of this project's modules in module ``name``."""
    path, init = MODULES[name]
    out = []
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = name.split(".") if init else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                # `from a import b` imports the module a.b when there is one, else a name of a.
                out.append(
                    (f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, node.lineno)
                )
    return [(m, line) for m, line in out if m.split(".")[0] in PACKAGES]


def layer_of(name: str) -> int | None:
    """The index in LAYERS of the longest prefix naming ``name``; "=a.b" names the module a.b alone
    (a package's ``__init__``, not its submodules) and wins over "a.b"."""
    best: tuple[int, bool, int] | None = None  # (prefix length, exact, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact = prefix.startswith("=")
            prefix = prefix.lstrip("=")
            if name == prefix or (not exact and name.startswith(prefix + ".")):
                best = max(best or (0, False, 0), (len(prefix), exact, index))
    return None if best is None else best[2]


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_walk_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    # The walker itself, on a module written here: a test of the rules must be able to fail.
    source = (
        "from typing import TYPE_CHECKING\nimport fusioner.io\nfrom fusioner import config\n"
        "if TYPE_CHECKING:\n    from fusioner.run import RunDir\n"
        "def f():\n    from fusioner.engine.cache import FeatureCache\n"
    )
    (tmp_path / "probe.py").write_text(source)
    MODULES["fusioner._probe"] = (tmp_path / "probe.py", False)
    try:
        found = [m for m, _ in imports_of("fusioner._probe")]
    finally:
        del MODULES["fusioner._probe"]
    assert found == ["fusioner.io", "fusioner.config", "fusioner.engine.cache"]


def test_every_module_has_a_layer():
    assert len(MODULES) > 50  # the walk found the package
    missing = sorted(name for name in MODULES if layer_of(name) is None)
    assert not missing, f"modules in no layer (add them to LAYERS in tests/test_layers.py): {missing}"


def test_every_import_names_a_module_of_the_project():
    unknown = [
        f"{name}:{line} imports {target}"
        for name, edges in GRAPH.items()
        for target, line in edges
        if target not in MODULES
    ]
    assert not unknown


def test_no_import_runs_up_a_layer():
    upward = sorted(
        {
            f"{name}:{line} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
            for name, edges in GRAPH.items()
            for target, line in edges
            # Modules in no layer are test_every_module_has_a_layer's to report.
            if target in MODULES
            and None not in (layer_of(name), layer_of(target))
            and layer_of(target) > layer_of(name)
        }
    )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_circle():
    # Depth-first search; a back edge to a module still on the stack closes a circle.
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    circles: list[list[str]] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted({t for t, _ in GRAPH[name] if t in MODULES and t != name}):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_is_under_the_line_limit(package):
    long = {
        name: n
        for name, (path, _) in MODULES.items()
        if name.split(".")[0] == package
        and (n := len(path.read_text(encoding="utf-8").splitlines())) >= MAX_LINES
    }
    assert not long, f"modules of {MAX_LINES} lines or more (split them by job): {long}"


def test_registries_import_nothing_above_the_errors():
    # The config reads the registries' names; a registry importing an implementation would bring
    # the circle back.
    registries = [name for name in MODULES if name.endswith(".registry")]
    assert len(registries) >= 3
    allowed = {"fusioner.errors"}
    heavy = {name: sorted({t for t, _ in GRAPH[name]} - allowed) for name in registries}
    # The adapters' registry reads the adapter contracts (base.py), which import only errors.
    heavy["fusioner.adapters.registry"] = sorted(
        set(heavy["fusioner.adapters.registry"]) - {"fusioner.adapters.base"}
    )
    assert all(not targets for targets in heavy.values()), heavy
