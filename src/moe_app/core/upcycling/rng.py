"""Order-independent random streams for surgery.

Every random choice (noise, dropped neurons, random split, router init, k-means seeds) draws from
a CPU generator seeded by ``(seed, layer, purpose)``. Results therefore do not depend on the order
in which layers are converted, which is what lets the streaming converter (shard by shard) produce
bit-identical tensors to in-memory surgery.
"""

from __future__ import annotations

import hashlib

import torch


def layer_generator(seed: int, layer: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` unique to ``(seed, layer, purpose, index)``."""
    digest = hashlib.sha256(f"{seed}/{layer}/{purpose}/{index}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g
