#!/usr/bin/env python
"""``make test-latest``: today's newest releases, no lock, the fast tests, and who broke what.

CI installs the lock (``requirements.lock``), so an upstream release never blocks landing. This
lane is the early warning: a fresh virtual environment (``.venv-latest``) gets the newest release
of every dependency that pyproject.toml allows, then the tests not marked ``slow`` run. When some
fail, each package whose version differs from the lock is put back to its locked version alone
(``--no-deps``) and the failing tests are run again: a test that passes again is attributed to
that package's release. The report names, per package, locked -> latest and the tests it breaks.

torch stays at ``--torch`` (default the locked 2.13.0 CPU build): an unpinned torch resolves to a
multi-GB CUDA build, and a torch upgrade is a deliberate change, not a drift.

Usage: python scripts/test_latest.py [--lock requirements.lock] [--venv .venv-latest] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock import read_lock, strip_local

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, **kw)


def versions(py: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as md, json, re;"
        "print(json.dumps({re.sub(r'[-_.]+','-',d.metadata['Name']).lower(): d.version "
        "for d in md.distributions() if d.metadata['Name']}))"
    )
    out = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _node_id(classname: str, name: str) -> str:
    """``tests.test_x.TestY`` + ``name`` -> ``tests/test_x.py::TestY::name`` (the file is the longest prefix)."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        if (ROOT / Path(*parts[:i])).with_suffix(".py").exists():
            return "::".join([f"{'/'.join(parts[:i])}.py", *parts[i:], name])
    return f"{classname}::{name}"


def failing_tests(py: str, args: list[str], junit: Path) -> tuple[int, list[str]]:
    """Run pytest; return its exit code and the node ids that failed or errored."""
    rc = sh(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args], cwd=ROOT
    ).returncode
    failed = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(_node_id(case.get("classname", ""), case.get("name", "")))
    return rc, failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-latest")
    ap.add_argument("--torch", default="torch==2.13.0")
    ap.add_argument("--extras", default="dev")
    ap.add_argument("--pytest-args", default="-m 'not slow'", help="which tests (default: the fast ones)")
    args = ap.parse_args(argv)

    shutil.rmtree(args.venv, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(args.venv)
    py = str(args.venv / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    sh([*pip, "--upgrade", "pip"], check=True)
    sh([*pip, *shlex.split(args.torch)], check=True)
    # Hold torch where --torch put it: an eager upgrade would otherwise pull the newest CUDA build.
    torch_pin = args.venv / "torch-constraint.txt"
    torch_pin.write_text(next(a for a in shlex.split(args.torch) if a.startswith("torch")) + "\n")
    sh(
        [
            *pip,
            "--upgrade",
            "--upgrade-strategy",
            "eager",
            "-c",
            str(torch_pin),
            "-e",
            f"{ROOT}[{args.extras}]",
        ],
        check=True,
    )

    locked = read_lock(args.lock)
    now = versions(py)
    drift = {
        name: (locked.get(name, "-"), ver)
        for name, ver in sorted(now.items())
        if name != "moe-app" and strip_local(ver) != strip_local(locked.get(name, ""))
    }
    print("\nnewer than the lock:" if drift else "\nevery package is at its locked version")
    for name, (old, new) in drift.items():
        print(f"  {name:28s} {old:>14s} -> {new}")

    with tempfile.TemporaryDirectory() as tmp:
        rc, failed = failing_tests(py, shlex.split(args.pytest_args), Path(tmp) / "all.xml")
        if rc in (0, 5):
            print("\ntest-latest: every fast test passes on today's releases")
            return 0
        print(f"\n{len(failed)} test(s) fail on today's releases; attributing them to releases:")
        blame: dict[str, list[str]] = {}
        remaining = list(failed)
        for name, (old, new) in drift.items():
            if not remaining or old == "-":
                continue
            sh([*pip, "--no-deps", f"{name}=={old}"], check=True)
            _, still = failing_tests(py, remaining, Path(tmp) / f"{name}.xml")
            fixed = [t for t in remaining if t not in still]
            if fixed:
                blame[f"{name} {old} -> {new}"] = fixed
                remaining = still  # keep the old version installed: later checks see the others alone
            else:
                sh([*pip, "--no-deps", f"{name}=={new}"], check=True)
    print("\n| upstream release | tests it breaks |\n|---|---|")
    for release, tests in blame.items():
        print(f"| {release} | {', '.join(tests)} |")
    if remaining:
        print(f"| (not explained by any single release) | {', '.join(remaining)} |")
    return 1


if __name__ == "__main__":
    sys.exit(main())
