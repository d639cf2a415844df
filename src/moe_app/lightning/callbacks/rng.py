"""``TrainingRNG``: training steps draw randomness from a stream of their own, saved per rank.

Dropout, router noise and jitter draw from it. Lightning does not checkpoint RNG state, and the
global stream is also consumed between steps by things a resumed run does differently (sanity
check, validation, creating data-loader iterators); isolating the training stream makes a resumed
run draw exactly what the uninterrupted one drew. Every rank's stream is gathered into the
checkpoint (Lightning writes callback state from rank 0 only) and each rank resumes its own.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import torch

log = logging.getLogger("moe_app.reliability")


def _collect_rng() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *map(_plain, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_plain(v) for v in x]
    return x


def _tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_tuple(v) for v in x)
    return x


def _set_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), *rest))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class TrainingRNG(L.Callback):
    """Training steps draw from their own RNG stream, which every checkpoint carries.

    Between ``on_train_batch_start`` and ``on_train_batch_end`` the global generators (torch CPU
    and CUDA, numpy, ``random``) hold the training stream; outside, they hold the rest of the
    program's. So dropout and router noise see the same numbers in an uninterrupted and a resumed
    run, whatever validation, sanity checks or data-loader start-up drew in between. A fresh run
    starts the stream from the global state at ``on_train_start`` (i.e. from ``seed_everything``).
    Under data parallelism every rank draws its own stream; Lightning writes callback state from
    rank 0 only, so the checkpoint gathers all ranks' streams and each rank resumes its own (a
    resume on a different number of processes falls back to rank 0's stream, with a warning).
    """

    def __init__(self) -> None:
        super().__init__()
        self._stream: dict[str, Any] | None = None
        self._outside: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stream is None:
            self._stream = _collect_rng()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._stream is None:
            self._stream = _collect_rng()
        self._outside = _collect_rng()
        _set_rng(self._stream)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._swap_out()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._swap_out()

    def _swap_out(self) -> None:
        if self._outside is not None:
            self._stream = _collect_rng()
            _set_rng(self._outside)
            self._outside = None

    def state_dict(self) -> dict[str, Any]:
        # Inside a step (a checkpoint written by a callback that runs before ours at batch end), the
        # live global state *is* the training stream.
        stream = _collect_rng() if self._outside is not None else self._stream
        if stream is None:
            return {}
        state: dict[str, Any] = {"stream": stream}
        world = _world()
        if world is not None:  # every rank saves a checkpoint together (Lightning's contract)
            streams: list[Any] = [None] * world[1]
            torch.distributed.all_gather_object(streams, stream)
            state["rank_streams"] = streams
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stream = state_dict.get("stream")
        streams = state_dict.get("rank_streams")
        world = _world()
        if streams is not None and world is not None and len(streams) == world[1]:
            stream = streams[world[0]]
        elif streams is not None and len(streams) != (world[1] if world else 1):
            log.warning(
                "the checkpoint holds RNG streams for %d processes, this run has %d: every rank resumes rank "
                "0's stream (deterministic, not identical to an uninterrupted run)",
                len(streams),
                world[1] if world else 1,
            )
        if stream is not None:
            self._stream = stream


def _world() -> tuple[int, int] | None:
    """``(rank, world_size)`` of an initialised multi-process group, else ``None``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None
