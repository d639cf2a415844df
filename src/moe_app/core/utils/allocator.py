"""Let a training process keep the heap memory it frees (glibc ``mallopt``), on CPU.

Why: a training step frees and re-allocates the same large buffers every step (gradients,
optimiser temporaries, activations). glibc serves a block above its mmap threshold (128 KiB,
raised on the fly to at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, so every
step's large buffers are new pages that the kernel zeroes on first touch. An upcycled MoE makes
this the dominant cost: SmolLM2-135M copied to 8 experts has 57 MB expert gradients, and in its
training step 6.4 s of the 7.6 s backward went to zeroing 612k freshly mapped pages
(``benchmarks/moe_train_step.py``). Raising the mmap and trim thresholds keeps those blocks in
the heap, where the next step reuses them: the step went from 1.60x to 1.21x its FLOP ratio to
the dense step.

The cost is that the process's RSS stays at its high-water mark instead of shrinking between
steps (15.2 vs 14.3 GB peak in that run). That is the right trade for a replicated training loop,
whose peak is reached every step anyway, so it is made when training starts
(``CausalLMModule.on_fit_start``, after the model is loaded), and only there:

* not for the offline commands that stream checkpoints under a memory budget (``upcycle``,
  ``export``, ``prune``) nor for ``test`` / ``predict``;
* not under FSDP, whose per-layer all-gather buffers come and go within every step: kept, they
  held each rank's peak RSS at DDP's (9235 vs 9174 MB, SmolLM2 8x, 2 ranks,
  ``benchmarks/fsdp_memory.py``), where glibc's defaults give about 0.55x. Sharding is chosen to
  save memory, so there memory wins.

Opt out with ``MOE_APP_MALLOC=system``. A user who tunes glibc already (``MALLOC_*_`` variables
or ``GLIBC_TUNABLES``), or runs another allocator (``LD_PRELOAD``), is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MALLOC_ENV = "MOE_APP_MALLOC"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mallopt takes an int: the largest threshold it can express, far above any single tensor we free.
_KEEP = 2**31 - 1
_USER_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process; return what was done and why.

    Returns ``"applied"``, or the reason it was not: ``"opted out"`` (``MOE_APP_MALLOC=system``),
    ``"user tuning"`` (the user's own glibc settings win), ``"not glibc"``.
    """
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "system":
        return "opted out"
    if any(os.environ.get(name) for name in _USER_TUNING):
        return "user tuning"
    if not sys.platform.startswith("linux"):
        return "not glibc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return "not glibc"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The trim threshold first: setting either one turns off glibc's dynamic threshold.
    if not (mallopt(_M_TRIM_THRESHOLD, _KEEP) and mallopt(_M_MMAP_THRESHOLD, _KEEP)):
        return "not glibc"
    return "applied"
