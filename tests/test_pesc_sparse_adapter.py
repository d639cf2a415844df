"""SparseAdapter ("Large-Sparse", He et al. 2022) as a PESC adapter option: fixed masks from the seed.

Masks: exact per-expert density, fixed through training, zero gradient on masked entries, saved in
both checkpoint kinds; ``adapter_sparsity = 0`` is exactly the dense PESC adapter of before.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import moe_app
from moe_app.checkpoint.pesc import ADAPTER_FILE, load_pesc_model, save_pesc_adapters, save_pesc_full
from moe_app.core.moe.adapters import BottleneckAdapters, kaiming_uniform_stacked_
from moe_app.core.moe.pesc import PescMoeBlock, pesc_forward_naive
from moe_app.core.pesc.config import PescConfig, equal_budget_adapter_dim, is_pesc_trainable
from moe_app.core.pesc.surgery import build_pesc, pesc_blocks
from moe_app.core.upcycling.rng import layer_generator
from moe_app.errors import ConfigError

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
HIDDEN = 32  # tests/conftest.py TINY_DECODER
E = 4


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _perturb(model, std=0.05, seed=5):
    """Non-zero values in every trainable tensor (masked entries included: the forward must ignore them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _adapters(model) -> list[BottleneckAdapters]:
    return [block.adapters for _, block in pesc_blocks(model)]


def _sparse_cfg(**kw) -> PescConfig:
    return PescConfig(**{"num_experts": E, "top_k": 2, "adapter_dim": 16, "adapter_sparsity": 0.5, **kw})


# ---------------------------------------------------------------------- masks at initialisation
@pytest.mark.parametrize("mask", ["magnitude", "random"])
@pytest.mark.parametrize(("r", "s"), [(16, 0.5), (32, 0.75), (8, 0.25)])
def test_mask_density_is_exactly_one_minus_s_per_expert(tiny_llama_dir, mask, r, s):
    model = build_pesc(
        _load(tiny_llama_dir), _sparse_cfg(adapter_dim=r, adapter_sparsity=s, adapter_mask=mask)
    )
    kept = round((1 - s) * r * HIDDEN)
    assert kept == (1 - s) * r * HIDDEN  # the chosen sizes make the density exact
    for ad in _adapters(model):
        assert ad.down_mask.dtype == torch.bool and ad.down_mask.shape == (E, r, HIDDEN)
        assert ad.up_mask.shape == (E, HIDDEN, r)
        for m in (ad.down_mask, ad.up_mask):
            assert m.reshape(E, -1).sum(1).tolist() == [kept] * E
        assert not ad.down[~ad.down_mask].any() and not ad.up.any()  # masked entries start at zero


def test_magnitude_mask_keeps_the_largest_initial_down_entries():
    seed_gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    ad = BottleneckAdapters(E, HIDDEN, 16, sparsity=0.5, mask="magnitude")
    ad.reset_parameters(seed_gen())
    ref = kaiming_uniform_stacked_(torch.empty(E, 16, HIDDEN), seed_gen())  # the same first draw
    assert torch.equal(ad.down, ref * ad.down_mask)
    for e in range(E):
        kept, pruned = ref[e][ad.down_mask[e]].abs(), ref[e][~ad.down_mask[e]].abs()
        assert kept.min() >= pruned.max()


def test_masks_are_deterministic_per_seed_and_differ_across_seeds_and_layers(tiny_llama_dir):
    a = _adapters(build_pesc(_load(tiny_llama_dir), _sparse_cfg(adapter_mask="random", seed=3)))
    b = _adapters(build_pesc(_load(tiny_llama_dir), _sparse_cfg(adapter_mask="random", seed=3)))
    c = _adapters(build_pesc(_load(tiny_llama_dir), _sparse_cfg(adapter_mask="random", seed=4)))
    for x, y in zip(a, b):
        assert torch.equal(x.down_mask, y.down_mask) and torch.equal(x.up_mask, y.up_mask)
    assert not torch.equal(a[0].up_mask, c[0].up_mask)
    assert not torch.equal(a[0].up_mask, a[1].up_mask)


def test_trainable_nonzeros_match_the_equal_budget_rule(tiny_llama_dir):
    r, s = 8, 0.75
    r_wide = equal_budget_adapter_dim(r, s)
    assert (
        r_wide == 32 and equal_budget_adapter_dim(64, 0.5) == 128 and equal_budget_adapter_dim(64, 0.0) == 64
    )
    dense = build_pesc(_load(tiny_llama_dir), PescConfig(num_experts=E, adapter_dim=r))
    sparse = build_pesc(_load(tiny_llama_dir), _sparse_cfg(adapter_dim=r_wide, adapter_sparsity=s))
    dense_budget = sum(p.numel() for n, p in dense.named_parameters() if ".mlp.adapters." in n)
    assert dense_budget == 2 * 2 * E * r * HIDDEN  # 2 layers x (D and U)
    sparse_ads = _adapters(sparse)
    mask_nonzeros = sum(int(ad.down_mask.sum() + ad.up_mask.sum()) for ad in sparse_ads)
    assert mask_nonzeros == dense_budget
    assert sum(ad.trainable_nonzeros() for ad in sparse_ads) == dense_budget
    assert sum(ad.trainable_nonzeros() for ad in _adapters(dense)) == dense_budget
    # the routers are the same size either way
    routers = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".mlp.router." in n)  # noqa: E731
    assert routers(dense) == routers(sparse)


# ---------------------------------------------------------------------- forward and training
def test_block_applies_the_mask_in_forward_and_matches_the_naive_oracle(tiny_llama_dir):
    model = build_pesc(_load(tiny_llama_dir), _sparse_cfg())
    _perturb(model)  # masked stored entries become non-zero: the forward must still ignore them
    model.eval()
    block = model.model.layers[0].mlp
    assert isinstance(block, PescMoeBlock)
    ad = block.adapters
    assert ad.down[~ad.down_mask].abs().sum() > 0
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = block(x)
        assert_close(out, pesc_forward_naive(block, x), rtol=1e-5, atol=1e-6)
        expected = _logits(model)
        ad.down.mul_(ad.down_mask)
        ad.up.mul_(ad.up_mask)
        assert torch.equal(_logits(model), expected)  # the masked stored values never mattered


def test_sparse_model_equals_dense_base_at_init(tiny_llama_dir):
    dense = _logits(_load(tiny_llama_dir))
    model = build_pesc(_load(tiny_llama_dir), _sparse_cfg())
    assert_close(_logits(model), dense, rtol=0, atol=1e-5)


def test_masked_entries_get_zero_gradient_and_stay_zero_through_training(tiny_llama_dir):
    model = build_pesc(_load(tiny_llama_dir), _sparse_cfg(adapter_dim=16, adapter_sparsity=0.75))
    ads = _adapters(model)
    masks = [(ad.down_mask.clone(), ad.up_mask.clone()) for ad in ads]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        for ad in ads:
            assert not ad.down.grad[~ad.down_mask].any()
            assert not ad.up.grad[~ad.up_mask].any()
            assert ad.up.grad[ad.up_mask].abs().sum() > 0  # the kept entries do learn
        opt.step()
    for ad, (dm, um) in zip(ads, masks):
        assert torch.equal(ad.down_mask, dm) and torch.equal(ad.up_mask, um)  # fixed masks
        assert not ad.down[~ad.down_mask].any() and not ad.up[~ad.up_mask].any()  # exactly zero
        assert ad.up[ad.up_mask].abs().sum() > 0
        nonzero = int((ad.down != 0).sum() + (ad.up != 0).sum())
        assert nonzero <= ad.trainable_nonzeros()
    # the masks are buffers, never parameters, so no optimizer ever sees them
    assert not any(n.endswith("_mask") for n, _ in model.named_parameters())


# ---------------------------------------------------------------------- sparsity 0 = dense as before
def test_sparsity_zero_is_exactly_the_dense_adapter(tiny_llama_dir):
    default = build_pesc(_load(tiny_llama_dir), PescConfig(num_experts=E, adapter_dim=8, seed=2))
    zero = build_pesc(
        _load(tiny_llama_dir),
        PescConfig(num_experts=E, adapter_dim=8, seed=2, adapter_sparsity=0.0, adapter_mask="random"),
    )
    assert list(default.state_dict()) == list(zero.state_dict())
    assert not any(n.endswith("_mask") for n in zero.state_dict())
    for (na, pa), (nb, pb) in zip(default.named_parameters(), zero.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    for i, ad in enumerate(_adapters(zero)):  # the same draws as the dense adapters always made
        ref = kaiming_uniform_stacked_(torch.empty(E, 8, HIDDEN), layer_generator(2, i, "pesc_experts"))
        assert torch.equal(ad.down, ref) and not ad.up.any()
        assert ad.down_mask is None and ad.effective_down() is ad.down and ad.effective_up() is ad.up
    _perturb(default)
    _perturb(zero)
    assert torch.equal(_logits(default.eval()), _logits(zero.eval()))


# ---------------------------------------------------------------------- checkpoints
def _scramble_masks(model, seed=9):
    """Replace the masks by other ones of the same density: a reload must bring these back, not re-derive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in _adapters(model):
            for m in (ad.down_mask, ad.up_mask):
                flat = m.reshape(m.shape[0], -1)
                perm = torch.stack([torch.randperm(flat.shape[1], generator=g) for _ in range(flat.shape[0])])
                m.copy_(torch.gather(flat, 1, perm).reshape(m.shape))


@pytest.mark.parametrize("peft", [False, True])
def test_adapter_only_checkpoint_round_trip_keeps_the_masks(tiny_llama_dir, tmp_path, peft):
    cfg = _sparse_cfg(peft_lora={"enabled": peft, "rank": 4})
    model = build_pesc(_load(tiny_llama_dir), cfg)
    _perturb(model)
    _scramble_masks(model)
    model.eval()
    expected = _logits(model)
    out = save_pesc_adapters(model, tmp_path / "adapters", base_model=tiny_llama_dir)
    saved = load_file(str(out / ADAPTER_FILE))
    mask_keys = sorted(k for k in saved if k.endswith("_mask"))
    assert mask_keys == [f"model.layers.{i}.mlp.adapters.{w}_mask" for i in (0, 1) for w in ("down", "up")]
    assert all(saved[k].dtype == torch.bool for k in mask_keys)
    assert all(is_pesc_trainable(k) for k in saved)
    back = load_pesc_model(out)
    assert torch.equal(_logits(back), expected)
    for a, b in zip(_adapters(model), _adapters(back)):
        assert torch.equal(a.down_mask, b.down_mask) and torch.equal(a.up_mask, b.up_mask)


def test_adapter_checkpoint_keys_must_match_dense_vs_sparse(tiny_llama_dir, tmp_path):
    from moe_app.checkpoint.pesc import load_pesc_adapters
    from moe_app.errors import CheckpointError

    sparse = build_pesc(_load(tiny_llama_dir), _sparse_cfg(adapter_dim=8))
    out = save_pesc_adapters(sparse, tmp_path / "adapters", base_model=tiny_llama_dir)
    dense = build_pesc(_load(tiny_llama_dir), PescConfig(num_experts=E, adapter_dim=8))
    with pytest.raises(CheckpointError, match=r"unexpected \['model.layers.0.mlp.adapters.down_mask'"):
        load_pesc_adapters(dense, out)


def test_full_checkpoint_round_trip_keeps_the_masks(tiny_llama_dir, tmp_path):
    model = build_pesc(_load(tiny_llama_dir), _sparse_cfg(adapter_mask="random"))
    _perturb(model)
    _scramble_masks(model)
    model.eval()
    expected = _logits(model)
    save_pesc_full(model, tmp_path / "full", source=str(tiny_llama_dir))
    back = moe_app.load_model(tmp_path / "full")
    assert torch.equal(_logits(back), expected)
    for a, b in zip(_adapters(model), _adapters(back)):
        assert torch.equal(a.down_mask, b.down_mask) and torch.equal(a.up_mask, b.up_mask)
        assert b.down_mask.dtype == torch.bool


# ---------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adapter_sparsity": 1.0}, r"PescConfig.adapter_sparsity: adapter_sparsity=1.0 not in \[0, 1\)"),
        ({"adapter_sparsity": -0.1}, r"PescConfig.adapter_sparsity: adapter_sparsity=-0.1 not in \[0, 1\)"),
        ({"adapter_sparsity": float("nan")}, r"PescConfig.adapter_sparsity: .*not in \[0, 1\)"),
        ({"adapter_sparsity": "0.5"}, r"PescConfig.adapter_sparsity: .*is not a number"),
        ({"adapter_sparsity": True}, r"PescConfig.adapter_sparsity: .*is not a number"),
        (
            {"adapter_mask": "snip"},
            r"PescConfig.adapter_mask: unknown adapter_mask 'snip'.*magnitude, random",
        ),
        (
            {"variant": "lora", "adapter_sparsity": 0.5},
            r"PescConfig.adapter_sparsity: .*variant 'adapter' only",
        ),
    ],
)
def test_bad_sparse_adapter_config_is_rejected_naming_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PescConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    cfg = _sparse_cfg(adapter_mask="random")
    assert PescConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"PescConfig\.adapter_sparsity"):
        equal_budget_adapter_dim(64, 1.0)


# ---------------------------------------------------------------------- Lightning
def test_lightning_fit_keeps_masks_and_saves_them(tiny_llama_dir, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from moe_app.lightning.modules.lm import ModelSource
    from moe_app.lightning.modules.optim import OptimConfig
    from moe_app.lightning.modules.pesc import PescModule

    module = PescModule(
        ModelSource(pretrained=str(tiny_llama_dir), tokenizer="builtin"),
        pesc=_sparse_cfg(adapter_dim=8),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
    )
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}] * 2
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
    model = module.model.eval()
    for ad in _adapters(model):
        assert not ad.down[~ad.down_mask].any() and not ad.up[~ad.up_mask].any()
        assert ad.up[ad.up_mask].abs().sum() > 0
    back = load_pesc_model(tmp_path / "model")
    assert torch.equal(_logits(back), _logits(model))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert sum(k.endswith("_mask") for k in state) == 4  # 2 layers x (down, up)


def test_pruning_keeps_each_experts_mask_and_merging_is_refused(tiny_llama_dir):
    from moe_app.core.models.views import moe_layer_views
    from moe_app.core.pruning.merge import check_mergeable
    from moe_app.errors import UnsupportedModelError

    model = build_pesc(_load(tiny_llama_dir), _sparse_cfg())
    _perturb(model)
    before = [(a.down_mask.clone(), a.up_mask.clone()) for a in _adapters(model)]
    keep = [0, 2]
    for _, view in moe_layer_views(model):
        view.keep(keep)
    for ad, (down, up) in zip(_adapters(model), before):
        assert ad.num_experts == 2
        assert torch.equal(ad.down_mask, down[keep]) and torch.equal(ad.up_mask, up[keep])
    assert torch.isfinite(_logits(model)).all()  # forward works with the sliced masks
    for lay, view in moe_layer_views(model):
        with pytest.raises(UnsupportedModelError, match="union of its members' masks"):
            check_mergeable(view, where=str(lay))
