"""Training keeps freed heap memory (core/utils/allocator.py): a re-allocated large buffer reuses
the pages of the freed one instead of faulting in fresh zeroed pages; opt-out and the user's own
glibc settings are respected; the offline commands leave glibc alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

PAGES = 16 * 2**20 * 4 // 4096  # a 64 MB float32 tensor in 4 KiB pages

# Allocate and free a 128 MB tensor, then allocate a 64 MB one; report the minor page faults of the
# second (it fits in the first one's freed block, whatever glibc's alignment padding).
PROBE = textwrap.dedent(
    """
    import json, resource, sys, torch
    setup = sys.argv[1]
    status = None
    if setup == "direct":
        from moe_app.core.utils.allocator import keep_freed_memory
        status = keep_freed_memory()
    elif setup == "fit":  # a real one-step fit of a tiny LLaMA through CausalLMModule
        import lightning as L
        from transformers import LlamaConfig
        from moe_app.core.data.sources import SourceConfig
        from moe_app.lightning.data.instruction import InstructionDataModule
        from moe_app.lightning.modules.lm import CausalLMModule, ModelSource
        arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        module = CausalLMModule(source=ModelSource(arch=arch))
        src = [SourceConfig(name="a", builtin="arithmetic", builtin_train_size=8, builtin_eval_size=4)]
        data = InstructionDataModule(sources=src, max_length=32, batch_size=4)
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  default_root_dir=sys.argv[2]).fit(module, datamodule=data)
    elif setup != "none":
        import contextlib, io
        from moe_app.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(setup.split())
    x = torch.ones(32 * 2**20)
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(16 * 2**20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"status": status, "faults": faults}))
    """
)


def _probe(setup: str, root: str = "", **env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "MOE_APP_MALLOC"))
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, setup, root],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_reused_without_fresh_page_faults():
    system = _probe("none")
    kept = _probe("direct")
    assert kept["status"] == "applied"
    # glibc's default maps a fresh 64 MB block: one fault per page (fewer only with huge pages)
    assert system["faults"] > PAGES // 600, system
    assert kept["faults"] < 50, kept
    assert kept["faults"] * 10 < system["faults"]


def test_opt_out_and_user_tuning_are_respected():
    assert _probe("direct", MOE_APP_MALLOC="system")["status"] == "opted out"
    tuned = _probe("direct", MALLOC_TRIM_THRESHOLD_="131072")
    assert tuned["status"] == "user tuning"


def test_training_keeps_freed_memory_and_other_commands_do_not(tmp_path):
    fit = _probe("fit", str(tmp_path))  # CausalLMModule.on_fit_start (not under FSDP: see the module)
    offline = _probe("export --help")
    assert fit["faults"] < 50, fit
    assert offline["faults"] > PAGES // 600, offline
