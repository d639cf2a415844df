"""Cached greedy generation == uncached greedy generation, for every model kind moe-app builds or writes.

``generate(..., use_cache=True)`` must give the same tokens as ``use_cache=False`` (a full recompute
at every step) and the same logits at every step. This catches a KV cache that a wrapper drops or
misindexes (the attention MoE once silently lost the cache when transformers renamed the argument
from ``past_key_values`` to ``cache``), wrong cache slots after block drop, routing that depends on
the sequence length, and stock exports whose cached path differs from moe-app's.

Every model is made non-trivial first: routers get large random weights (routing differs between
tokens), zero-initialised adapters / LoRA ``B`` get seeded noise, and MoE outputs are not a plain
copy of the dense FFN (``softmax_topk`` without renormalisation, noisy copies, partitions).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import moe_app
from conftest import tiny_config, tiny_llama_config
from moe_app.checkpoint.export import export_checkpoint
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.core.moe.attention import AttentionMoe
from moe_app.core.moe.block import find_moe_blocks
from moe_app.core.upcycling import UpcycleConfig, upcycle

PAD = 0
NEW_TOKENS = 12
TOL = dict(rtol=1e-4, atol=1e-5)

# Two prompts, the first one shorter and LEFT-padded (pad id 0 never appears as a real token).
PROMPTS = torch.tensor(
    [
        [PAD, PAD, PAD, 17, 93, 5, 41, 66, 23],
        [12, 77, 3, 58, 101, 9, 34, 120, 71],
    ]
)
PROMPT_MASK = (PROMPTS != PAD).long()
# An unpadded batch (equal lengths, no mask holes).
UNPADDED = torch.tensor([[44, 8, 91, 27, 63, 15], [5, 110, 36, 72, 19, 88]])
UNPADDED_MASK = torch.ones_like(UNPADDED)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are overhead-bound: one intra-op thread is as fast and immune to CPU oversubscription
    (with 2 threads on a busy 2-core machine each generate() call became ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------- the check
def _generate(model, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=PAD,
            eos_token_id=None,  # always NEW_TOKENS steps: no early stop hides a late divergence
        )


def assert_cached_generation_equal(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Greedy decoding with the KV cache == without it (tokens, every step's logits); returns the tokens."""
    model.eval()
    cached = _generate(model, ids, mask, use_cache=True)
    full = _generate(model, ids, mask, use_cache=False)
    assert cached.sequences.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert len(cached.logits) == len(full.logits) == NEW_TOKENS
    new = cached.sequences[:, ids.shape[1] :]
    # Non-degenerate: each prompt's continuation is not one repeated token.
    for row in new:
        assert row.unique().numel() > 1, f"degenerate generation {row.tolist()}"
    assert torch.equal(cached.sequences, full.sequences), (
        f"cached generation diverged:\n{cached.sequences[:, ids.shape[1] :].tolist()}\n"
        f"vs uncached\n{full.sequences[:, ids.shape[1] :].tolist()}"
    )
    assert_close(cached.logits[-1], full.logits[-1], **TOL)
    for step, (a, b) in enumerate(zip(cached.logits, full.logits)):
        assert_close(a, b, **TOL, msg=lambda m, step=step: f"step {step}: {m}")
    return cached.sequences


def _check_both_batches(model) -> None:
    assert_cached_generation_equal(model, PROMPTS, PROMPT_MASK)
    assert_cached_generation_equal(model, UNPADDED, UNPADDED_MASK)


# ---------------------------------------------------------------------- model builders
def _dense(config, seed: int = 0):
    torch.manual_seed(seed)
    # A wider init than HF's 0.02 gives peaked, varied next-token distributions (no near-ties).
    config.initializer_range = 0.2
    return AutoModelForCausalLM.from_config(config).eval()


def _llama(**kw):
    return _dense(tiny_llama_config(**kw))


def _qwen2(**kw):
    from transformers import Qwen2Config

    return _dense(tiny_config(Qwen2Config, **kw))


def _qwen3(**kw):
    from transformers import Qwen3Config

    return _dense(tiny_config(Qwen3Config, **{"head_dim": 8, **kw}))


def _mistral(**kw):
    from transformers import MistralConfig

    return _dense(tiny_config(MistralConfig, **kw))


def _randomize_routers(model, std: float = 1.0, seed: int = 11) -> None:
    """Large seeded router weights: routing differs strongly between tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, block in find_moe_blocks(model):
            w = block.router.weight
            w.copy_(torch.randn(w.shape, generator=g) * std)


def _upcycled(dense, **cfg):
    model = upcycle(dense, UpcycleConfig(**cfg)).eval()
    _randomize_routers(model)
    return model


def _perturb_trainable(model, seed: int = 5):
    """PESC adapters' ``U`` / LoRA ``B`` start at zero (the dense function): give them and the routers content."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                std = 1.0 if name.endswith("router.weight") else 0.2
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _routing_is_non_uniform(model, ids: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    real = mask.reshape(-1).bool()
    blocks = list(find_moe_blocks(model))
    assert blocks
    for name, block in blocks:
        routing = block.last_routing
        top1 = routing.indices[real, 0]
        assert top1.unique().numel() > 1, f"{name}: every token routed to expert {top1[0]}"
        probs = routing.probs[real]
        assert probs.std(dim=-1).min() > 1e-3, f"{name}: uniform routing probabilities"
        assert not torch.allclose(probs, probs[:1].expand_as(probs), atol=1e-3), f"{name}: same routing"


# ---------------------------------------------------------------------- 1. dense
@pytest.mark.parametrize("family", [_llama, _qwen2, _mistral, _qwen3], ids=lambda f: f.__name__[1:])
def test_dense(family):
    _check_both_batches(family())


def test_dense_eager_attention():
    model = _llama()
    model.config._attn_implementation = "eager"
    assert_cached_generation_equal(model, PROMPTS, PROMPT_MASK)


# ---------------------------------------------------------------------- 2./3. MLP MoE
MLP_MOE = {
    # softmax_topk (no renormalisation): the copy-upcycled output depends on the routing.
    "copy": dict(method="copy", num_experts=4, top_k=2, rule="softmax_topk"),
    "noise": dict(method="noise", num_experts=4, top_k=2, noise_std=0.5),
    "drop": dict(method="drop", num_experts=4, top_k=2, drop_ratio=0.5),
    "partition": dict(method="partition", num_experts=4, top_k=2),
    "partition-shared": dict(method="partition", split="random", num_experts=3, top_k=2, shared_experts=1),
    "partition-top1": dict(method="partition", num_experts=4, top_k=1, layers="1"),
}


@pytest.mark.parametrize("kind", list(MLP_MOE))
def test_mlp_moe_llama(kind):
    model = _upcycled(_llama(), **MLP_MOE[kind])
    _routing_is_non_uniform(model, PROMPTS, PROMPT_MASK)
    _check_both_batches(model)


@pytest.mark.parametrize("family", [_qwen2, _mistral], ids=lambda f: f.__name__[1:])
def test_mlp_moe_other_families(family):
    model = _upcycled(family(), method="noise", num_experts=4, top_k=2, noise_std=0.5)
    assert_cached_generation_equal(model, PROMPTS, PROMPT_MASK)


# ---------------------------------------------------------------------- 4. attention MoE
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mlp", ["attention-only", "with-mlp-moe"])
def test_attention_moe_all_groups(attn_impl, mlp):
    dense = _llama()
    dense.config._attn_implementation = attn_impl
    cfg = (
        dict(method="attention", num_experts=2, top_k=1)
        if mlp == "attention-only"
        else dict(method="noise", num_experts=4, top_k=2, noise_std=0.5, attention_moe=True)
    )
    model = _upcycled(dense, **cfg)
    attn = [m for m in model.modules() if isinstance(m, AttentionMoe)]
    assert len(attn) == 2 and all(a.router.top_k == a.num_groups == 2 for a in attn)
    _routing_is_non_uniform(model, PROMPTS, PROMPT_MASK)
    _check_both_batches(model)


@pytest.mark.parametrize("family", [_qwen2, _mistral], ids=lambda f: f.__name__[1:])
def test_attention_moe_all_groups_other_families(family):
    model = _upcycled(family(), method="attention", num_experts=2, top_k=1)
    assert_cached_generation_equal(model, PROMPTS, PROMPT_MASK)


@pytest.mark.parametrize("kind", ["dense", "mlp-moe", "attention-moe", "attention-moe-top1"])
def test_sliding_window_shorter_than_the_sequence(kind):
    """Mistral with a 4-token window: the cache keeps only the window (the prompts alone are longer)."""
    model = _mistral(sliding_window=4)
    if kind == "mlp-moe":
        model = _upcycled(model, method="noise", num_experts=4, top_k=2, noise_std=0.5)
    elif kind == "attention-moe":
        model = _upcycled(model, method="attention", num_experts=2, top_k=1)
    elif kind == "attention-moe-top1":  # groups dropped: the evicted window carries the NaN markers too
        model = _upcycled(model, method="attention", num_experts=2, top_k=1, attention_top_k=1)
    seq = assert_cached_generation_equal(model, PROMPTS, PROMPT_MASK)
    if kind == "dense":  # the window really matters for these sequences
        unwindowed = _mistral(sliding_window=None)  # same seed, same weights
        mask = (seq != PAD).long()
        with torch.no_grad():
            narrow = model(input_ids=seq, attention_mask=mask).logits[:, -1]
            wide = unwindowed(input_ids=seq, attention_mask=mask).logits[:, -1]
        assert not torch.allclose(narrow, wide, atol=1e-3)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_attention_moe_dropped_groups(attn_impl):
    """top-1 of 2 groups: the cache keeps which group each past token chose (NaN keys elsewhere)."""
    dense = _llama()
    dense.config._attn_implementation = attn_impl
    model = _upcycled(dense, method="attention", num_experts=2, top_k=1, attention_top_k=1)
    assert all(a.router.top_k == 1 < a.num_groups for a in model.modules() if isinstance(a, AttentionMoe))
    _routing_is_non_uniform(model, PROMPTS, PROMPT_MASK)
    _check_both_batches(model)


def test_attention_moe_dropped_groups_with_mlp_moe_and_four_groups():
    """2 of 4 groups (8 heads, 4 KV heads) under an MLP MoE: groups drop per token in every layer."""
    model = _upcycled(
        _llama(hidden_size=64, num_attention_heads=8, num_key_value_heads=4),
        method="noise",
        num_experts=4,
        top_k=2,
        noise_std=0.5,
        attention_moe=True,
        attention_top_k=2,
    )
    _routing_is_non_uniform(model, PROMPTS, PROMPT_MASK)
    _check_both_batches(model)


# ---------------------------------------------------------------------- 5. PESC
def _pesc(variant: str, **kw):
    from moe_app.core.pesc.config import PescConfig
    from moe_app.core.pesc.surgery import build_pesc

    cfg = PescConfig(variant=variant, num_experts=4, top_k=2, adapter_dim=8, lora_rank=4, **kw)
    return _perturb_trainable(build_pesc(_llama(), cfg))


@pytest.mark.parametrize("variant", ["adapter", "lora"])
def test_pesc(variant):
    model = _pesc(variant)
    _routing_is_non_uniform(model, PROMPTS, PROMPT_MASK)
    _check_both_batches(model)


def test_pesc_with_shared_peft_lora():
    model = _pesc("adapter", peft_lora={"enabled": True, "rank": 4})
    assert any(".self_attn.q_proj.lora_B." in n for n, _ in model.named_parameters())
    assert_cached_generation_equal(model, PROMPTS, PROMPT_MASK)


# ---------------------------------------------------------------------- 6. pruning and skipping
def _calibration():
    from moe_app.core.pruning.calibration import normalize_batches

    g = torch.Generator().manual_seed(3)
    return normalize_batches([torch.randint(3, 128, (4, 16), generator=g) for _ in range(2)])


def _pruned():
    from moe_app.core.pruning import ExpertPruneConfig, moe_layer_views, prune_experts

    model = _upcycled(_llama(), method="noise", num_experts=6, top_k=2, noise_std=0.5)
    prune_experts(model, _calibration(), ExpertPruneConfig(keep=3))
    assert all(v.num_experts == 3 for _, v in moe_layer_views(model))
    return model.eval()


def _skipping():
    from moe_app.core.pruning import apply_skipping, calibrate_skipping, skip_rates

    model = _upcycled(_llama(), method="noise", num_experts=6, top_k=2, noise_std=0.5)
    apply_skipping(model, calibrate_skipping(model, _calibration()))
    rates = skip_rates(model, _calibration())
    assert 0.0 < rates["all"] < 1.0
    return model.eval()


def _block_dropped():
    from moe_app.core.pruning import drop_blocks

    model = _upcycled(
        _llama(num_hidden_layers=3), method="noise", num_experts=4, top_k=2, noise_std=0.5, attention_moe=True
    )
    drop_blocks(model, [1])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    return model.eval()


PRUNED: dict[str, Callable] = {"experts": _pruned, "skipping": _skipping, "block-drop": _block_dropped}


@pytest.mark.parametrize("kind", list(PRUNED))
def test_pruned(kind):
    model = PRUNED[kind]()
    _check_both_batches(model)


def test_skipping_skips_tokens_during_generation():
    model = _skipping()
    seq = assert_cached_generation_equal(model, PROMPTS, PROMPT_MASK)
    with torch.no_grad():
        model(input_ids=seq, attention_mask=(seq != PAD).long(), use_cache=False)
    skipped = [int((b.last_routing.indices[:, 1] < 0).sum()) for _, b in find_moe_blocks(model)]
    assert all(0 < s < seq.numel() for s in skipped), skipped


# ---------------------------------------------------------------------- 7. checkpoints and exports
ROUND_TRIP: dict[str, Callable] = {
    "noise": lambda: _upcycled(_llama(), **MLP_MOE["noise"]),
    "partition-shared": lambda: _upcycled(_llama(), **MLP_MOE["partition-shared"]),
    "attention-moe": lambda: _upcycled(
        _llama(), method="partition", num_experts=4, top_k=2, attention_moe=True
    ),
    "pruned": _pruned,
    "skipping": _skipping,
    "block-drop": _block_dropped,
}


@pytest.mark.parametrize("kind", list(ROUND_TRIP))
def test_moe_app_checkpoint_loaded_back(kind, tmp_path):
    model = ROUND_TRIP[kind]()
    expected = _generate(model, PROMPTS, PROMPT_MASK, use_cache=False)
    loaded = moe_app.load_model(save_moe_checkpoint(model, tmp_path / "ckpt"))
    assert type(loaded) is type(model)
    seq = assert_cached_generation_equal(loaded, PROMPTS, PROMPT_MASK)
    assert torch.equal(seq, expected.sequences)  # and the same model as before saving


def test_pesc_adapter_dir_loaded_back(tmp_path):
    from moe_app.checkpoint.pesc import save_pesc_adapters
    from moe_app.core.pesc.config import PescConfig
    from moe_app.core.pesc.surgery import build_pesc

    base = tmp_path / "base"
    _llama().save_pretrained(base)
    cfg = PescConfig(num_experts=4, top_k=2, adapter_dim=8)
    model = _perturb_trainable(build_pesc(AutoModelForCausalLM.from_pretrained(base), cfg))
    expected = _generate(model, PROMPTS, PROMPT_MASK, use_cache=False)
    loaded = moe_app.load_model(save_pesc_adapters(model, tmp_path / "adapters", base_model=base))
    seq = assert_cached_generation_equal(loaded, PROMPTS, PROMPT_MASK)
    assert torch.equal(seq, expected.sequences)


# kind: (build the moe-app model, format, stock architecture). Exported from a saved moe-app
# checkpoint dir (the CLI path), except the PESC model, which export merges in memory.
EXPORTS: dict[str, tuple[Callable, str, str]] = {
    "mixtral": (
        lambda: _upcycled(_llama(num_hidden_layers=3), **{**MLP_MOE["noise"], "layers": "0,2"}),
        "mixtral",
        "MixtralForCausalLM",
    ),
    "qwen2_moe-shared": (
        lambda: _upcycled(
            _qwen2(num_hidden_layers=3),
            **{**MLP_MOE["partition-shared"], "layers": "0,1"},
        ),
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
    ),
    "qwen2_moe-from-llama": (
        lambda: _upcycled(_llama(), method="partition", num_experts=4, top_k=2, rule="softmax_topk"),
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
    ),
    "qwen3_moe": (
        lambda: _upcycled(
            _qwen3(num_hidden_layers=3, tie_word_embeddings=True),
            method="partition",
            num_experts=4,
            top_k=2,
            layers="1,2",
        ),
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
    ),
    "mixtral-merged-pesc-lora": (lambda: _pesc("lora"), "mixtral", "MixtralForCausalLM"),
}


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_exported_stock_checkpoint(kind, tmp_path):
    build_model, fmt, arch = EXPORTS[kind]
    model = build_model()
    expected = _generate(copy.deepcopy(model), PROMPTS, PROMPT_MASK, use_cache=False)
    src = model if kind.startswith("mixtral-merged-pesc") else save_moe_checkpoint(model, tmp_path / "ckpt")
    result = export_checkpoint(src, tmp_path / "hf", fmt)
    assert result.format == fmt
    stock = AutoModelForCausalLM.from_pretrained(result.path).eval()
    assert type(stock).__name__ == arch
    seq = assert_cached_generation_equal(stock, PROMPTS, PROMPT_MASK)
    assert_cached_generation_equal(stock, UNPADDED, UNPADDED_MASK)
    assert torch.equal(seq, expected.sequences)  # stock transformers continues exactly like moe-app
