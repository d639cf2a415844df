"""The import contract of ``shared/DESIGN.md``: three layers, imports point down only, no cycles.

Layers, bottom to top (a package may import its own layer and the ones below it):

    moe_app.errors                      the user-facing error types
    moe_app.core.*                      pure PyTorch + transformers: moe, models, upcycling, pesc,
                                        pruning, mixing, data, spec, utils
    moe_app.checkpoint.*                the on-disk formats: model dirs, loaders, streaming, export
    moe_app.lightning.*                 modules, data modules, callbacks, strategies
    moe_app.cli.*                       the command line

The test reads every file's AST, so an import inside a function counts as much as one at the top
(that is where violations used to hide). A second check imports every core and checkpoint module in
a fresh interpreter and asserts that Lightning is not loaded at any depth, through third-party
packages included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "moe_app"

LAYERS = ["moe_app.errors", "moe_app.core", "moe_app.checkpoint", "moe_app.lightning", "moe_app.cli"]
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # ``from moe_app.core import moe`` imports the subpackage moe_app.core.moe
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            found += [(t, node.lineno, id(node) in nested) for t in (subs or [target])]
    return found


def _is_module(name: str) -> bool:
    p = SRC / Path(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def layer_of(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def package_of(module: str) -> str:
    """The folder a module lives in: ``moe_app.core.moe.router`` -> ``moe_app.core.moe``."""
    p = SRC / Path(*module.split("."))
    return module if (p / "__init__.py").exists() else module.rpartition(".")[0]


def all_files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_every_module_is_in_a_layer():
    stray = [module_name(f) for f in all_files() if layer_of(module_name(f)) is None]
    stray = [m for m in stray if m not in ("moe_app", "moe_app.__main__")]
    assert stray == [], f"modules outside core/ checkpoint/ lightning/ cli/: {stray}"


def test_imports_point_down_only():
    violations = []
    for f in all_files():
        src = module_name(f)
        mine = layer_of(src)
        if mine is None:
            continue
        for target, line, nested in imports(f):
            where = f"{f.relative_to(SRC)}:{line}{' (in a function)' if nested else ''}"
            if target.split(".")[0] in LIGHTNING and mine < LAYERS.index("moe_app.lightning"):
                violations.append(f"{where} imports {target}")
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                violations.append(f"{where} imports {target} (a higher layer)")
    assert violations == [], "layer violations:\n" + "\n".join(violations)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for f in all_files():
        src = package_of(module_name(f))
        for target, _, _ in imports(f):
            if not target.startswith("moe_app.") or not _is_module(target):
                continue
            dst = package_of(target)
            # a package importing its own subpackages (re-exports in __init__) is not a cycle
            if dst != src and not dst.startswith(src + "."):
                edges[src].add(dst)
    return edges


def test_no_import_cycle_between_packages():
    assert _cycles(package_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", ["moe_app.core", "moe_app.checkpoint"])
def test_lower_layers_never_load_lightning_at_any_depth(layer):
    mods = [module_name(f) for f in all_files() if layer_of(module_name(f)) == LAYERS.index(layer)]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {layer} loaded: {out.stdout.strip()}"
