"""Instruction data: record formats, sources, the built-in offline suite, tokenizer, templates,
packing and the Lightning DataModule.

Everything but :class:`InstructionDataModule` is free of Lightning; the DataModule is imported
lazily so that core code can use the parsers and templates without pulling in Lightning.
"""

from __future__ import annotations

from typing import Any

from moe_app.data.formats import Example, Message, parse_record, parse_records
from moe_app.data.sources import SourceConfig, load_examples
from moe_app.data.synthetic import NEAR_DUPLICATES, SUITE_DOMAINS, check, generate_domain
from moe_app.data.templates import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, encode_example, generation_prompt

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
    if name == "InstructionDataModule":
        from moe_app.data.datamodule import InstructionDataModule

        return InstructionDataModule
    if name == "suite_tokenizer":
        from moe_app.data.tokenizer import suite_tokenizer

        return suite_tokenizer
    raise AttributeError(f"module 'moe_app.data' has no attribute {name!r}")
