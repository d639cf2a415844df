#!/usr/bin/env python
"""Import statistics of a moe_app source tree: how many internal imports sit inside functions.

An import inside a function hides a dependency from a reader of the module's header (and once hid
layer violations); this counts them. Package = the folder a module is in.

Usage: python scripts/import_stats.py [SRC]   (default: this checkout's src/)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def stats(src: Path) -> tuple[int, int, int, tuple[int, str]]:
    """(internal imports, inside functions, inside functions crossing a package, (lines, largest file))."""

    def modname(f: Path) -> str:
        parts = list(f.relative_to(src).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def package_of(m: str) -> str:
        p = src / Path(*m.split("."))
        return m if (p / "__init__.py").exists() else m.rpartition(".")[0]

    total = nested_n = cross = 0
    largest = (0, "")
    for f in sorted((src / "moe_app").rglob("*.py")):
        text = f.read_text()
        largest = max(largest, (len(text.splitlines()), str(f.relative_to(src))))
        tree = ast.parse(text)
        mine = package_of(modname(f))
        nested = {
            id(n)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(fn)
            if isinstance(n, (ast.Import, ast.ImportFrom))
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [node.module]
            else:
                continue
            for t in (t for t in targets if t.startswith("moe_app")):
                total += 1
                if id(node) in nested:
                    nested_n += 1
                    p = src / Path(*t.split("."))
                    theirs = package_of(t) if p.with_suffix(".py").exists() or p.is_dir() else t
                    cross += theirs != mine and not theirs.startswith(mine + ".")
    return total, nested_n, cross, largest


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    src = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "src"
    total, nested, cross, (lines, name) = stats(src)
    print(f"internal imports {total}; inside functions {nested}, of which crossing a package {cross}")
    print(f"largest file: {name} ({lines} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
