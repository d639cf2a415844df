"""Instruction data (core: no Lightning): record formats, sources, the built-in offline suite,
tokenizer, templates, packing and collation. The DataModules that feed a Trainer are in
:mod:`moe_app.lightning.data`.
"""

from __future__ import annotations

from typing import Any

from moe_app.core.data.formats import Example, Message, parse_record, parse_records
from moe_app.core.data.sources import SourceConfig, load_examples
from moe_app.core.data.synthetic import NEAR_DUPLICATES, SUITE_DOMAINS, check, generate_domain
from moe_app.core.data.templates import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, encode_example, generation_prompt

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "NEAR_DUPLICATES",
    "SUITE_DOMAINS",
    "Example",
    "InstructionDataModule",
    "Message",
    "SourceConfig",
    "check",
    "encode_example",
    "generate_domain",
    "generation_prompt",
    "load_examples",
    "parse_record",
    "parse_records",
    "suite_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name == "suite_tokenizer":
        from moe_app.core.data.tokenizer import suite_tokenizer

        return suite_tokenizer
    raise AttributeError(f"module 'moe_app.core.data' has no attribute {name!r}")
