"""Streaming shard writing and streaming `moe-app export`.

* The in-place safetensors writer produces the reference writer's exact bytes, holds no tensor
  once it is written, and its planned/unplanned modes read back through ``safe_open``.
* Exporting a moe-app checkpoint dir layer by layer equals the in-memory export tensor for tensor
  (and stock transformers reproduces moe-app's logits from it).
* Peak memory of an export, measured in a fresh process, stays within 1.5x (largest decoder layer
  + one copy buffer), for a small and a large ``max_shard_size`` alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.export import export_checkpoint
from moe_app.checkpoint.export_streaming import streaming_export_reason
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.names import INDEX_FILE
from moe_app.checkpoint.safetensors_io import (
    COPY_CHUNK,
    SafetensorsFile,
    TensorInfo,
    read_header,
    read_tensor,
)
from moe_app.checkpoint.shards import ShardWriter, load_all, shard_files
from moe_app.core.upcycling import UpcycleConfig
from upcycling_helpers import build, logits, qwen2_config, qwen3_config, tokens, upcycled

MIXED = {
    "b.weight": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
    "a.bias": torch.arange(7, dtype=torch.float32).bfloat16(),
    "scalar": torch.tensor(3.5),
    "mask": torch.tensor([[True, False, True]]),
    "ids": torch.arange(5),
    "empty": torch.empty(0, 4),
    "half": torch.linspace(-1, 1, 16).reshape(4, 4).half(),
}


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_planned_file_is_byte_identical_to_safetensors_save_file(tmp_path):
    save_file(MIXED, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    f = SafetensorsFile(
        tmp_path / "mine.safetensors",
        [TensorInfo.of(k, v) for k, v in MIXED.items()],
        metadata={"format": "pt"},
    )
    for k in reversed(list(MIXED)):  # any arrival order: every offset is known in advance
        f.write(k, MIXED[k])
    f.finish()
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_unplanned_file_pads_or_moves_its_header(tmp_path):
    for reserve in (4096, 8):  # room for the header / too little: the data is moved once at the end
        path = tmp_path / f"u{reserve}.safetensors"
        f = SafetensorsFile(path, metadata={"format": "pt"}, reserve_header=reserve)
        for k, v in MIXED.items():
            f.write(k, v)
        f.finish()
        _assert_same(_read(path), MIXED)
        n = int.from_bytes(path.read_bytes()[:8], "little")
        assert n % 8 == 0 and n >= (4096 if reserve == 4096 else 1)


def test_unplanned_file_keeps_every_tensor_aligned_to_its_element_size(tmp_path):
    """Tensors arriving in any order (an odd-length uint8 blob first, as bitsandbytes' quantisation
    state comes) still start at offsets aligned to their element size, as in the reference writer's
    files: a float weight a reader maps at an odd offset can change the last bit of a product. The
    side file the odd-sized ones wait in is gone after finish and after abort."""
    blob = {"blob": torch.arange(5, dtype=torch.uint8), **MIXED, "odd.weight": torch.randn(3, 3)}
    save_file({"copied": torch.arange(3, dtype=torch.float32)}, str(tmp_path / "src.safetensors"))
    (stored,) = read_header(tmp_path / "src.safetensors")[0].values()
    for reserve in (4096, 8):
        path = tmp_path / f"u{reserve}.safetensors"
        f = SafetensorsFile(path, metadata={"format": "pt"}, reserve_header=reserve)
        for k, v in blob.items():
            f.write(k, v)
        f.copy("copied", stored)
        f.finish()
        _assert_same(_read(path), {**blob, "copied": read_tensor(stored)})
        header = read_header(path)[0]
        assert {k: t.offset % t.info.dtype.itemsize for k, t in header.items()} == dict.fromkeys(header, 0)
        assert list(header)[:3] == ["ids", "empty", "half"]  # 8-byte multiples stay in arrival order
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["src.safetensors", "u4096.safetensors", *(["u8.safetensors"] if reserve == 8 else [])]
        )
    f = SafetensorsFile(tmp_path / "gone.safetensors", reserve_header=64)
    f.write("blob", blob["blob"])
    f.abort()
    assert not list(tmp_path.glob("gone*"))


def test_interrupted_file_has_no_valid_header(tmp_path):
    """The header is written last: a file cut short is refused, never read as zeros."""
    path = tmp_path / "cut.safetensors"
    f = SafetensorsFile(path, [TensorInfo.of(k, v) for k, v in MIXED.items()])
    f.write("b.weight", MIXED["b.weight"])
    f.close()  # the process 'dies' here
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type)
        safe_open(str(path), framework="pt")
    with pytest.raises(ValueError, match="never written"):
        f2 = SafetensorsFile(tmp_path / "x.safetensors", [TensorInfo.of("a", torch.zeros(2))])
        f2.finish()


@pytest.mark.parametrize("planned", [False, True])
def test_shard_writer_holds_no_tensor_once_added(tmp_path, planned):
    tensors = {f"t{i}": torch.full((64, 64), float(i)) for i in range(6)}
    writer = ShardWriter(tmp_path, max_shard_size=3 * 64 * 64 * 4)  # 3 tensors per shard
    if planned:
        writer.plan(TensorInfo.of(k, v) for k, v in tensors.items())
    refs = []
    for k in list(tensors):
        t = tensors.pop(k)
        refs.append(weakref.ref(t))
        writer.add(k, t)
        del t
        assert refs[-1]() is None  # written to disk: nothing waits in memory for the shard to fill
    weight_map = writer.close()
    assert sorted(set(weight_map.values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    back = load_all(tmp_path)
    for i in range(6):
        assert torch.equal(back[f"t{i}"], torch.full((64, 64), float(i)))
    assert json.loads((tmp_path / INDEX_FILE).read_text())["metadata"]["total_size"] == 6 * 64 * 64 * 4


def test_planned_shard_writer_refuses_what_was_not_planned(tmp_path):
    writer = ShardWriter(tmp_path, "1MB")
    writer.plan([TensorInfo("a", torch.float32, (2, 2)), TensorInfo("b", torch.float32, (3,))])
    with pytest.raises(ValueError, match="not in the plan"):
        writer.add("c", torch.zeros(1))
    with pytest.raises(ValueError, match=r"planned torch.float32 \(2, 2\)"):
        writer.add("a", torch.zeros(2, 3))
    writer.add("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"never written: \['a'\]"):
        writer.close()
    assert not any(tmp_path.glob("*.safetensors"))


def _llama_mixtral():
    return upcycled(
        build(tiny_llama_config(num_hidden_layers=3)),
        UpcycleConfig(method="noise", num_experts=4, top_k=2, noise_std=0.2, scale=1.5, layers="0,2"),
    )


def _qwen2_shared():
    return upcycled(
        build(qwen2_config(num_hidden_layers=3)),
        UpcycleConfig(
            method="partition", num_experts=3, top_k=2, shared_experts=1, layers="0,1", router_std=0.5
        ),
    )


def _qwen3_tied():
    return upcycled(
        build(qwen3_config(num_hidden_layers=3, tie_word_embeddings=True)),
        UpcycleConfig(method="partition", num_experts=4, top_k=2, layers="1,2", router_std=0.5),
    )


def _llama_bf16():
    return upcycled(build(tiny_llama_config()), UpcycleConfig(method="drop", num_experts=4, top_k=2)).to(
        torch.bfloat16
    )


KINDS = {
    "mixtral-scale-dense-layer": (_llama_mixtral, "auto", "mixtral"),
    "qwen2_moe-shared": (_qwen2_shared, "auto", "qwen2_moe"),
    "qwen3_moe-tied": (_qwen3_tied, "auto", "qwen3_moe"),
    "mixtral-bf16": (_llama_bf16, "mixtral", "mixtral"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_streaming_export_equals_in_memory_export(kind, tmp_path):
    make, fmt, expect = KINDS[kind]
    model = make()
    ckpt = save_moe_checkpoint(model, tmp_path / "ckpt", max_shard_size="30KB")
    assert streaming_export_reason(ckpt) is None
    streamed = export_checkpoint(ckpt, tmp_path / "stream", fmt, max_shard_size="40KB")
    in_memory = export_checkpoint(ckpt, tmp_path / "memory", fmt, max_shard_size="40KB", streaming=False)
    assert streamed.format == in_memory.format == expect
    _assert_same(load_all(streamed.path), load_all(in_memory.path))
    configs = [json.loads((p / "config.json").read_text()) for p in (streamed.path, in_memory.path)]
    assert configs[0] == configs[1]
    assert len(shard_files(streamed.path)) > 1
    if model.dtype == torch.float32:
        stock = AutoModelForCausalLM.from_pretrained(streamed.path).eval()
        ids = tokens()
        assert_close(logits(stock, ids), logits(moe_app.load_model(ckpt), ids), rtol=1e-5, atol=1e-5)


def test_pesc_lora_checkpoint_keeps_the_in_memory_export(tiny_llama_dir, tmp_path):
    from moe_app.cli.main import main

    out = tmp_path / "pesc"
    argv = ["upcycle", "--model", tiny_llama_dir, "--out", out, "--method", "pesc_lora"]
    assert main([str(a) for a in [*argv, "--num_experts", "4", "--top_k", "2"]]) == 0
    assert "LoRA experts" in (streaming_export_reason(out) or "")


def test_progress_bar_names_the_export(tmp_path, capfd, monkeypatch):
    ckpt = save_moe_checkpoint(_llama_mixtral(), tmp_path / "ckpt")
    monkeypatch.setenv("MOE_APP_PROGRESS", "1")
    export_checkpoint(ckpt, tmp_path / "hf")
    assert "export -> mixtral" in capfd.readouterr().err


# --- peak memory of a real-sized export -------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    def reset_peak():  # restart the high-water mark (Linux >= 4.0); False where it cannot
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    import torch, transformers  # noqa: F401  (part of the baseline)
    from moe_app.checkpoint.export import export_checkpoint

    src, warm, out = sys.argv[1:4]
    export_checkpoint(warm, out + "-warm", "mixtral")  # lazy imports, allocator pools: baseline
    results = []
    for shard in sys.argv[4:]:
        baseline = status("VmRSS")
        reset = reset_peak()
        export_checkpoint(src, f"{out}-{shard}", "mixtral", max_shard_size=shard)
        results.append({"shard": shard, "baseline": baseline, "peak": status("VmHWM"), "reset": reset})
        if not reset:
            break  # without a reset a second peak would include the first
    print(json.dumps(results))
    """
)


def _random_dense(path: Path, *, layers: int, hidden: int, ffn: int, vocab: int) -> Path:
    """A random dense LLaMA written tensor by tensor (never a whole model in memory)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    writer = ShardWriter(path, "64MB")
    g = torch.Generator().manual_seed(0)
    for k, v in meta.state_dict().items():
        writer.add(k, torch.randn(v.shape, generator=g) * 0.02)
    writer.close()
    return path


def _largest_layer_bytes(ckpt: Path) -> int:
    sizes: dict[int, int] = {}
    for f in shard_files(ckpt):
        for name, t in read_header(f)[0].items():
            parts = name.split(".")
            if name.startswith("model.layers."):
                sizes[int(parts[2])] = sizes.get(int(parts[2]), 0) + t.info.nbytes
    return max(sizes.values())


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
def test_export_peak_memory_is_bounded_by_one_layer_whatever_the_shard_size(tmp_path):
    from moe_app.checkpoint.streaming import upcycle_checkpoint_streaming

    cfg = UpcycleConfig(method="copy", num_experts=8, top_k=2)
    dense = _random_dense(tmp_path / "dense", layers=3, hidden=512, ffn=1536, vocab=4096)
    moe = tmp_path / "moe"
    upcycle_checkpoint_streaming(dense, moe, cfg, max_shard_size="100MB")  # ~250 MB fp32, 8 experts
    tiny = _random_dense(tmp_path / "tiny", layers=2, hidden=128, ffn=256, vocab=256)
    upcycle_checkpoint_streaming(tiny, tmp_path / "warm", cfg)
    layer = _largest_layer_bytes(moe)
    model_payload = sum(t.info.nbytes for f in shard_files(moe) for t in read_header(f)[0].values())
    bound = 1.5 * (layer + COPY_CHUNK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_APP_PROGRESS": "0"}
    shards = ["30MB", "2GB"]
    results: list[dict] = []
    while len(results) < len(shards):  # one child for both sizes where the peak can be reset
        out = tmp_path / f"out{len(results)}"
        argv = [
            sys.executable,
            "-c",
            CHILD,
            str(moe),
            str(tmp_path / "warm"),
            str(out),
            *shards[len(results) :],
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results += json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        shard, footprint = r["shard"], r["peak"] - r["baseline"]
        assert footprint <= bound, (
            f"max_shard_size={shard}: export used {footprint / 2**20:.0f} MiB over its after-import baseline; "
            f"bound 1.5 x (largest layer {layer / 2**20:.0f} MiB + copy buffer {COPY_CHUNK / 2**20:.0f} MiB) "
            f"= {bound / 2**20:.0f} MiB; model {model_payload / 2**20:.0f} MiB"
        )
        print(f"max_shard_size={shard}: footprint {footprint / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
        files = shard_files(next(tmp_path.glob(f"out*-{shard}")))
        assert len(files) == 1 if shard == "2GB" else len(files) > 5
        payload = sum(t.info.nbytes for f in files for t in read_header(f)[0].values())
        assert payload >= model_payload  # every expert written (per-expert tensors + routers)
