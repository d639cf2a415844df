"""Per-expert matmuls over the sorted buffer's segments, with oneDNN for the token-row products.

After the sort-by-expert dispatch (:mod:`moe_app.core.moe.dispatch`) each expert owns a contiguous
segment of rows, and each projection is one small matmul per expert. A GPU runs them as one
grouped GEMM (``F.grouped_mm``). On CPU, ``F.grouped_mm`` and a plain loop both hand each
expert's product to MKL's ``sgemm``, which at the row counts of a fine-tuning batch packs each
expert's whole weight for few rows: SmolLM2-135M copy-upcycled to 8 experts, top-2, 4 x 100
tokens gives ~100 rows per expert, half of the products under 64 rows, and there its experts'
matmuls ran 1.44x slower per multiply-add than the dense FFN's (docs/train_step.md).

The products whose rows are tokens (``x W^T`` in the forward, ``g W`` for the input gradient) are
exactly what oneDNN's inner-product primitive is built for, and it packs the weight faster at few
rows. Measured on this project's 2-core Zen 4 (``python benchmarks/expert_matmul.py --threads 2``:
torch 2.13, fp32, 2 threads, a cold 3072 x 576 weight), the forward product took 0.48 against
0.80 ms with MKL at 8 rows, 0.86 against 1.24 at 32, 1.94 against 2.44 at 100 and 7.08 against
8.20 at 400; the input gradient 0.58-0.88x MKL's time likewise. The weight gradients
``a_g^T b_g``, whose inner dimension is the rows, stay on MKL (``torch.mm``): oneDNN took 0.98x
its time at 8 rows and 1.10x-1.24x from 100 rows on.

The primitive is reached through ``torch.ops.mkldnn._linear_pointwise``, a private op of torch's
oneDNN bindings (tests/test_moe_segments.py pins its behaviour, so a torch release that changes it
fails there); where a torch build lacks it, ``torch.mm`` does every product. oneDNN sums in a
different order from MKL (relative difference ~1e-6, as another fp32 GEMM would); each product is
deterministic and independent of the thread count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

# oneDNN builds (JIT-compiles) a primitive per new shape, ~1.6 ms over a cached call at 3072 x 576,
# and keeps 1024 of them; every step's routing brings new row counts. Padding the rows to a multiple
# of 8 bounds the shapes (SmolLM2's step: 50 row buckets x 4 weight shapes) at the cost of < 8 rows.
_ROW_BUCKET = 8
# Smallest expert projection (hidden x intermediate entries) for which `auto` takes oneDNN: below
# it oneDNN's per-call cost outweighs its faster packing (the 4-layer hidden-128, F=352 model of
# `benchmarks/moe_train_step.py --tiny` stepped 1.17x slower than with grouped_mm; from d=256,
# 2F=1376 on, one product at 8-100 rows took 0.65x-0.81x MKL's time).
ONEDNN_MIN_WEIGHT = 1 << 17


@cache  # asked on every MoE forward; the torch build does not change
def onednn_available() -> bool:
    """Whether this torch build exposes oneDNN's fp32 linear on plain (strided) CPU tensors."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: Tensor, w: Tensor) -> Tensor:
    """``x W^T`` by oneDNN's inner product: ``x (n, K)``, ``w (M, K)`` (any strides) -> ``(n, M)``."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")


@dataclass(frozen=True)
class ExpertSegments:
    """Rows ``[start, end)`` of each expert in the sorted buffer, and how to multiply them."""

    bounds: tuple[tuple[int, int], ...]  # (E,) row range of each expert
    onednn: bool  # token-row products through oneDNN (fp32 on CPU, where this torch has it)

    @classmethod
    def from_counts(cls, counts: Sequence[int], onednn: bool = False) -> ExpertSegments:
        bounds, start = [], 0
        for n in counts:
            bounds.append((start, start + n))
            start += n
        return cls(tuple(bounds), onednn)

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        """``out[rows of g] = a[rows of g] @ b[g]``: ``a (N, K)``, ``b (E, K, M)`` -> ``(N, M)``."""
        out = a.new_empty(a.shape[0], b.shape[-1])  # (N, M)
        for g, (s, e) in enumerate(self.bounds):
            if s == e:
                continue
            if self.onednn:  # x @ W^T with W = b[g]^T; the primitive allocates: one copy of the rows
                # Rows padded to a multiple of _ROW_BUCKET with the next segments' rows (their
                # outputs are dropped), where the buffer has them: fewer shapes, fewer primitives.
                end = min(s + -(-(e - s) // _ROW_BUCKET) * _ROW_BUCKET, a.shape[0])
                out[s:e] = onednn_linear(a[s:end], b[g].t())[: e - s]
            else:
                torch.mm(a[s:e], b[g], out=out[s:e])
        return out

    def weight_grad(self, a: Tensor, b: Tensor) -> Tensor:
        """Per expert ``a_g^T b_g``: ``a (N, K)``, ``b (N, M)`` -> ``(E, K, M)``, zero where ``g`` has no rows."""
        out = a.new_empty(len(self.bounds), a.shape[1], b.shape[1])  # (E, K, M): one pass, no zero-fill
        for g, (s, e) in enumerate(self.bounds):
            if s == e:
                out[g].zero_()
            else:
                torch.mm(a[s:e].t(), b[s:e], out=out[g])
        return out
