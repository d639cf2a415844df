"""AdamW kernels of build_optimizer: fused / foreach / for_loop give the same update up to rounding."""

from __future__ import annotations

import pytest
import torch

from moe_app.core.moe.experts import SwiGLUExperts
from moe_app.errors import ConfigError
from moe_app.lightning.modules.optim import OptimConfig, adamw_kernel_kwargs, build_optimizer


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    experts = SwiGLUExperts(4, 16, 24)  # stacked (E, 2F, d) and (E, d, F) parameters, as MoE layers hold
    return [
        *experts.parameters(),
        torch.nn.Parameter(torch.randn(16)),
        torch.nn.Parameter(torch.randn(5, 16)),
    ]


def _train(impl: str, steps: int = 4) -> list[torch.Tensor]:
    params = _params()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, schedule="cosine", impl=impl)
    out = build_optimizer(params, cfg, total_steps=steps)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


def test_auto_picks_fused_on_cpu_and_kernels_agree_to_rounding():
    assert adamw_kernel_kwargs(_params(), "auto") == {"fused": True}
    assert build_optimizer(_params(), OptimConfig(), 10)["optimizer"].defaults["fused"] is True
    reference = _train("for_loop")
    start = _params()
    for impl in ("fused", "foreach", "auto"):
        got = _train(impl)
        for p0, r, g in zip(start, reference, got, strict=True):
            assert not torch.equal(r, p0)  # the steps moved every parameter
            # fp32, 4 steps of lr 1e-2: the kernels differ by a few ulps of the update
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7, msg=f"{impl} != for_loop")


def test_fused_optimizer_keeps_the_ordinary_amp_contract():
    # Lightning refuses gradient clipping under mixed precision for optimisers that unscale themselves.
    opt = build_optimizer(_params(), OptimConfig(impl="fused"), 10)["optimizer"]
    assert opt._step_supports_amp_scaling is False


def test_fused_refused_with_a_clear_error_where_unsupported():
    ints = [torch.zeros(3, dtype=torch.int64)]
    with pytest.raises(ConfigError, match=r"optim\.impl=fused needs plain floating-point"):
        adamw_kernel_kwargs(ints, "fused")
    assert adamw_kernel_kwargs(ints, "auto") == {}
    with pytest.raises(ConfigError, match="unknown AdamW implementation 'apex'"):
        OptimConfig(impl="apex")


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_lightning_clips_gradients_with_the_fused_optimizer(tmp_path, precision):
    import lightning as L

    from conftest import cpu_trainer

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0]).pow(2).sum() * 100.0  # a large gradient: clipping acts

        def configure_optimizers(self):
            return build_optimizer(self.parameters(), OptimConfig(lr=1e-2, warmup_steps=0), total_steps=2)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 8)), batch_size=2)
    module = Tiny()
    before = module.lin.weight.detach().clone()
    trainer = cpu_trainer(tmp_path, steps=2, precision=precision, gradient_clip_val=1.0)
    trainer.fit(module, data)
    assert trainer.optimizers[0].defaults["fused"] is True
    assert not torch.equal(module.lin.weight, before)
