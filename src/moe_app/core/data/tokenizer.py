"""A small byte-level BPE tokenizer for the built-in suite, trained once and cached on disk.

Tiny offline models need a tokenizer that exists without a download: this one is trained with
the ``tokenizers`` library on the suite's training text (instruction domains rendered with the
default chat template, plus the ``pretrain`` corpus). Design choices:

* **digits are always single tokens** (``Digits(individual_digits=True)`` before the byte-level
  split), so column-wise arithmetic is learnable and numbers never merge with spaces;
* **byte-level** (GPT-2 style) so any text round-trips through ``decode`` (no ``<unk>`` in practice);
* special tokens with fixed ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then the chat
  markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>`` (4-7); matching the tiny
  LLaMA test configs (pad 0, bos 1, eos 2);
* the default chat template is set as ``chat_template`` so a model saved with it works with
  ``apply_chat_template`` (and vLLM / lm-eval) after export;
* deterministic: same corpus, same order, same trainer settings -> byte-identical files. Bump
  :data:`TOKENIZER_VERSION` whenever the suite text or these settings change.

The cache lives in ``$MOE_APP_CACHE`` (default ``~/.cache/moe_app``) under
``suite-tokenizer-v{VERSION}-{VOCAB}``; it is written to a temporary sibling and renamed, so a
crash never leaves a half-written tokenizer that later runs would load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from moe_app.core.data.formats import Example
from moe_app.core.data.synthetic import PRETRAIN, SUITE_DOMAINS, generate_domain
from moe_app.core.data.templates import CHAT_MARKERS, DEFAULT_CHAT_TEMPLATE
from moe_app.core.utils.atomic import atomic_directory

TOKENIZER_VERSION = 2
"""Bump when the suite text or the tokenizer settings change (invalidates caches)."""
SUITE_VOCAB_SIZE = 768
"""Vocabulary cap: 8 special tokens + 256 byte symbols + merges. The suite text has fewer pairs
seen twice than that, so the trained vocabulary is smaller (650 tokens); size models by ``len(tok)``."""
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
_TRAINING_RECORDS = 500  # per domain: enough for the merges to settle, and trains in about a second
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, *CHAT_MARKERS)


def default_cache_dir() -> Path:
    """``$MOE_APP_CACHE`` or ``~/.cache/moe_app``."""
    return Path(os.environ.get("MOE_APP_CACHE") or Path.home() / ".cache" / "moe_app")


def _training_text() -> Iterator[str]:
    """The suite's training text in a fixed order (default sizes, seed 0)."""

    def render(ex: Example) -> str:
        if ex.messages is None:
            return ex.text or ""
        return "".join(
            f"{CHAT_MARKERS[('system', 'user', 'assistant').index(m.role)]}\n{m.content}<|end|>\n"
            for m in ex.messages
        )

    for domain in (*SUITE_DOMAINS, PRETRAIN):
        for ex in generate_domain(domain, "train", _TRAINING_RECORDS, seed=0):
            yield render(ex)


def build_suite_tokenizer(vocab_size: int = SUITE_VOCAB_SIZE):
    """Train the BPE from scratch (about a second) and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    # `tokenizer(text)` adds bos like LLaMA tokenizers do; the templates add it themselves.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=list(CHAT_MARKERS),
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def suite_tokenizer(cache_dir: str | None = None):
    """The suite tokenizer, trained on first use and loaded from the cache afterwards."""
    from transformers import PreTrainedTokenizerFast

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"suite-tokenizer-v{TOKENIZER_VERSION}-{SUITE_VOCAB_SIZE}"
    if not (path / "tokenizer.json").is_file():
        tok = build_suite_tokenizer()
        if not (path / "tokenizer.json").is_file():  # another process may have finished meanwhile
            with atomic_directory(path) as tmp:
                tok.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(str(path))
