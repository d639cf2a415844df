#!/usr/bin/env python
"""Write or check ``requirements.lock``: the exact versions a fresh clone installs.

``make lock`` (``--write``) resolves today's releases inside pyproject's bounds in a scratch
virtual environment (torch first, as ``make setup`` does, so the CPU build is taken), then
records ``pip freeze --all`` of that environment: every package, pip and setuptools included, at
the version that was installed. ``make setup`` installs with ``pip install -c requirements.lock``
and then runs ``--check``, which fails when the environment holds a version the lock does not
name (a stale lock after a pyproject change, or a pip that ignored the constraints); a package the
lock does not list at all (left over in a reused venv) is only a warning.

The torch line is written without its local label (``2.13.0``, not ``2.13.0+cpu``) so the same
lock serves the CPU and the CUDA builds of one release.

Usage:
  python scripts/lock.py --write requirements.lock [--torch 'torch==2.13.0'] [--extras dev]
  python scripts/lock.py --check requirements.lock
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import re
import shlex
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` from a lock file (comments and blank lines ignored)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def strip_local(version: str) -> str:
    return version.split("+", 1)[0]


def installed() -> dict[str, str]:
    """``{canonical name: version}`` of this interpreter's environment, the project itself excluded."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) != "moe-app":
            out[canonical(name)] = dist.version
    return out


def check(lock: Path) -> int:
    pins = read_lock(lock)
    bad = []
    for name, version in sorted(installed().items()):
        if name not in pins:
            # Left over in a reused venv from an older lock, or installed by hand: not what was
            # tested, but not a version conflict either. A fresh venv (CI) never has one.
            print(f"warning: {name}=={version} is installed but not in {lock.name}", file=sys.stderr)
        elif strip_local(version) != strip_local(pins[name]):
            bad.append(f"{name}=={version} is installed but {lock.name} pins {pins[name]}")
    if bad:
        print(f"error: the environment does not match {lock}:", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        print("fix: `make lock` after changing pyproject.toml, then `make clean setup`", file=sys.stderr)
        return 1
    print(f"environment matches {lock.name} ({len(pins)} pinned packages)")
    return 0


def run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def write(lock: Path, torch_spec: str, extras: str) -> int:
    with tempfile.TemporaryDirectory(prefix="moe-app-lock-") as tmp:
        venv.EnvBuilder(with_pip=True).create(tmp)
        py = str(Path(tmp) / "bin" / "python")
        pip = [py, "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
        run([*pip, "--upgrade", "pip"])
        run([*pip, *shlex.split(torch_spec)])
        run([*pip, f"{ROOT}[{extras}]"])
        freeze = subprocess.run(
            [py, "-m", "pip", "freeze", "--all", "--exclude-editable"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        pyver = subprocess.run(
            [py, "-c", "import platform; print(platform.python_version())"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    lines = []
    for line in freeze.splitlines():
        m = _LINE.match(line)
        if not m or canonical(m.group(1)) == "moe-app":
            continue
        name, version = m.group(1), m.group(2)
        lines.append(f"{name}=={strip_local(version) if canonical(name) == 'torch' else version}")
    header = [
        "# Exact versions installed and tested: `make setup` / `make test` / `.ci/run` / docker install",
        "# with `pip install -c requirements.lock`. Regenerate with `make lock` (scripts/lock.py), which",
        f"# resolves today's releases within pyproject.toml's bounds (extras: {extras}).",
        f"# Generated {dt.date.today().isoformat()} on Python {pyver}, {sys.platform}.",
    ]
    lock.write_text("\n".join([*header, *sorted(lines, key=str.lower)]) + "\n")
    print(f"wrote {lock} ({len(lines)} packages)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="LOCK", help="re-resolve and write the lock")
    mode.add_argument("--check", type=Path, metavar="LOCK", help="check this environment against the lock")
    ap.add_argument("--torch", default="torch==2.13.0", help="pip spec for torch, installed first")
    ap.add_argument("--extras", default="dev", help="project extras to include, comma-separated")
    args = ap.parse_args(argv)
    if args.check:
        return check(args.check)
    return write(args.write, args.torch, args.extras)


if __name__ == "__main__":
    sys.exit(main())
