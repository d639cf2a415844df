"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

MB = 1024 * 1024


def cpu_model() -> str:
    """The CPU's model name (for the machine line every benchmark prints)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_mb() -> float:
    """This process's resident set size now, in MB."""
    import psutil

    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_llama_config(layers: int, hidden: int, ffn: int, vocab: int, **extra):
    """The benchmarks' dense LLaMA shape: head dim 64, 2 query heads per KV head, untied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
        **extra,
    )


def make_dense_source(path: Path, layers: int, hidden: int, ffn: int, vocab: int, shard: str) -> None:
    """A seeded random dense LLaMA (:func:`random_llama_config`) saved as safetensors shards."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = random_llama_config(layers, hidden, ffn, vocab)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size=shard)
