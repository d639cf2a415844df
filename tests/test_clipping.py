"""Gradient clipping folded into the fused AdamW step (core/utils/clipping.py) updates the weights
as clip_grad_norm_ + the same step does: within float rounding when clipping, bit for bit when not."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from moe_app.core.utils.clipping import can_fold, clip_grad_norm_folded, release, total_norm


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8))


def _train(fold: bool, max_norm: float, steps: int = 4) -> tuple[nn.Module, list[float]]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen) * 10
        loss = model(x).pow(2).mean()
        loss.backward()
        if fold:
            norms.append(float(clip_grad_norm_folded(opt, model.parameters(), max_norm)))
            opt.step()
            release(opt)
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
            opt.step()
        opt.zero_grad(set_to_none=True)
    return model, norms


def test_folded_clip_updates_like_clip_grad_norm_when_clipping():
    ref, ref_norms = _train(fold=False, max_norm=0.5)
    got, norms = _train(fold=True, max_norm=0.5)
    assert min(ref_norms) > 0.5  # every step was clipped
    assert_close(torch.tensor(norms), torch.tensor(ref_norms))
    for a, b in zip(got.parameters(), ref.parameters(), strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-6)
    unclipped, _ = _train(fold=False, max_norm=1e9)
    assert (ref[0].weight - unclipped[0].weight).abs().max() > 1e-3  # the clip changed the result


def test_folded_clip_is_bitwise_when_nothing_is_clipped():
    ref, ref_norms = _train(fold=False, max_norm=1e9)
    got, norms = _train(fold=True, max_norm=1e9)
    assert_close(torch.tensor(norms), torch.tensor(ref_norms))  # summed in another order
    for a, b in zip(got.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_total_norm_is_closer_to_the_exact_norm_than_torchs():
    """Dot products over 1M-element chunks summed in float64: on a 12M-element gradient the norm is
    within 1e-5 of the float64 one (torch's vector_norm is off by 4.7e-4 there)."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 1536, 2048, generator=gen) * 3, torch.randn(577, generator=gen), torch.zeros(0)]
    exact = sum(g.double().pow(2).sum() for g in grads).sqrt()
    got = total_norm(grads)
    assert got.dtype == torch.float32 and got.shape == ()
    err = abs(float(got) / float(exact) - 1)
    assert err < 1e-5
    assert abs(float(torch.nn.utils.get_total_norm(grads, 2.0)) / float(exact) - 1) > 10 * err
    # Anything but dense fp32 CPU tensors is left to torch: the same number, bit for bit.
    for dtype in (torch.bfloat16, torch.float64):
        other = [g.to(dtype) for g in grads[:2]]
        assert torch.equal(total_norm(other), torch.nn.utils.get_total_norm(other, 2.0, foreach=True))
    strided = [grads[0].transpose(0, 2)]
    assert torch.equal(total_norm(strided), torch.nn.utils.get_total_norm(strided, 2.0, foreach=True))


def test_fold_only_where_the_fused_kernel_owns_the_scale():
    params = list(_model().parameters())
    fused = torch.optim.AdamW(params, fused=True)
    assert can_fold(fused)
    assert not can_fold(torch.optim.AdamW(params))  # the per-tensor loop has no grad_scale input
    assert not can_fold(torch.optim.SGD(params, lr=0.1))
    fused.grad_scale = torch.tensor(1024.0)  # an AMP loss scaler is using it
    assert not can_fold(fused)
    with pytest.raises(ValueError, match="fused torch Adam/AdamW"):
        clip_grad_norm_folded(fused, params, 1.0)
    release(fused)
    assert can_fold(fused) and not hasattr(fused, "grad_scale")


def test_training_clips_inside_the_fused_step_like_lightning(suite_dense_dir, tmp_path, monkeypatch):
    """`moe-app fit` with gradient_clip_val: the fused AdamW run (clip folded into its step) ends
    where Lightning's own clip + the foreach kernel ends, and the clip did act."""
    import lightning as L

    from conftest import cpu_trainer
    from moe_app.core.data.sources import SourceConfig
    from moe_app.core.utils import clipping
    from moe_app.lightning.data.instruction import InstructionDataModule
    from moe_app.lightning.modules.lm import CausalLMModule, ModelSource
    from moe_app.lightning.modules.optim import OptimConfig

    folds = []
    real = clipping.clip_grad_norm_folded
    monkeypatch.setattr(clipping, "clip_grad_norm_folded", lambda *a: folds.append(1) or real(*a))

    def fit(impl: str, clip: float | None) -> dict[str, torch.Tensor]:
        L.seed_everything(0)
        src = [
            SourceConfig(name="arithmetic", builtin="arithmetic", builtin_train_size=32, builtin_eval_size=8)
        ]
        data = InstructionDataModule(sources=src, max_length=48, batch_size=8)
        module = CausalLMModule(
            source=ModelSource(pretrained=str(suite_dense_dir)),
            optim=OptimConfig(lr=1e-3, warmup_steps=0, impl=impl),
        )
        trainer = cpu_trainer(tmp_path / f"{impl}-{clip}", 3, gradient_clip_val=clip)
        trainer.fit(module, datamodule=data)
        assert not hasattr(trainer.optimizers[0], "grad_scale")  # released after every step
        return {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    folded = fit("fused", 0.05)
    assert len(folds) == 3
    lightning = fit("foreach", 0.05)
    assert len(folds) == 3  # the foreach kernel cannot fold: Lightning clipped
    unclipped = fit("fused", None)
    for k in folded:
        assert_close(folded[k], lightning[k], rtol=1e-5, atol=1e-6, msg=k)
    assert max((folded[k] - unclipped[k]).abs().max() for k in folded) > 1e-4
