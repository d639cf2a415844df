"""Command-line options of the offline commands, parsed by jsonargparse from typed dataclasses.

As LightningCLI and litgpt do: an option's name, type, default and help come from a dataclass
field and its attribute docstring (``UpcycleConfig``, ``PescConfig``, a command's own options
class), so the CLI, YAML configs and the Python API share one definition. Options stay flat
(``--num_experts``, not ``--upcycle.num_experts``), the names the commands always had; a nested
dataclass field becomes dotted options (``--peft_lora.rank``). Boolean fields are flags: ``--flag``,
``--flag true|false`` or ``--no_flag``.

A bad value (wrong type, unknown choice, missing required option) is one ``moe-app: error:`` line
naming the option, and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import typing
from collections.abc import Iterable, Iterator
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

DEBUG_ENV = "MOE_APP_DEBUG"
_KEY = re.compile(r'Parser key "([^"]+)":')  # jsonargparse's name for an option -> its flag
_REQUIRED = re.compile(r"arguments are required: (.*)$")


class OfflineArgumentParser(ArgumentParser):
    """A jsonargparse parser that reports a bad option in one line and exits with code 2."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if os.environ.get(DEBUG_ENV) == "1":
            return super().error(message, ex)
        first = _KEY.sub(r"--\1:", " ".join(str(message).split()))
        required = _REQUIRED.search(first)
        if required:
            names = ", ".join("--" + n.strip().lstrip("-") for n in required.group(1).split(","))
            first = first[: required.start(1)] + names
        sys.stderr.write(f"moe-app: error: {first}\nFix: see `{self.prog} --help`.\n")
        raise SystemExit(2)


def make_parser(prog: str, description: str | None = None) -> OfflineArgumentParser:
    return OfflineArgumentParser(prog=prog, description=description)


@contextlib.contextmanager
def _attribute_docstrings() -> Iterator[None]:
    """Let jsonargparse read field docstrings while options are added; restore the setting after.

    The setting is process-wide and makes signature parsing slower, so the Lightning part of the
    CLI (in the same process in tests) is left as it was.
    """
    from jsonargparse import set_parsing_settings

    try:
        from jsonargparse._optionals import get_docstring_parse_options

        before = bool(get_docstring_parse_options().get("attribute_docstrings", False))
    except (ImportError, AttributeError):
        before = False
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        yield
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=before)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass's attribute docstrings (docstring_parser, as jsonargparse)."""
    import docstring_parser

    doc = docstring_parser.parse_from_object(cls)
    return {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}


def _bool_fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if hints.get(f.name) is bool]


def add_options(parser: ArgumentParser, cls: type, *, skip: Iterable[str] = ()) -> list[str]:
    """Add the fields of dataclass ``cls`` as flat ``--field`` options; return their names.

    Types, defaults and help come from the class (the group's title is its docstring). ``bool``
    fields become flags (``--x``, ``--x false``, ``--no_x``).
    """
    skip = set(skip)
    if not isinstance(parser, ArgumentParser):  # a plain argparse parser (embedding, old callers)
        return _add_to_argparse(parser, cls, skip)
    bools = [f for f in _bool_fields(cls) if f.name not in skip]
    lists = {f.name: t for f in dataclasses.fields(cls) if f.name not in skip and (t := _list_item(cls, f))}
    with _attribute_docstrings():
        added = list(parser.add_class_arguments(cls, skip=skip | {f.name for f in bools} | set(lists)))
    group = parser.groups.get(cls.__name__, parser) if getattr(parser, "groups", None) else parser
    docs = field_docs(cls) if bools or lists else {}
    for f in dataclasses.fields(cls):
        if f.name in lists:  # ``--x a b c``, as argparse's nargs="+"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            group.add_argument(
                f"--{f.name}", type=lists[f.name], nargs="+", default=default, help=docs[f.name]
            )
        elif f in bools:
            group.add_argument(
                f"--{f.name}",
                action=ActionYesNo(yes_prefix="", no_prefix="no_"),
                nargs="?",
                default=f.default,
                help=docs.get(f.name, ""),
            )
        else:
            continue
        added.append(f.name)
    return added


def _list_item(cls: type, f: dataclasses.Field) -> type | None:
    """The item type of a ``list[T]`` / ``list[T] | None`` field of scalars, else ``None``."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) is not list:  # list[T] | None, not e.g. str | list[int]
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    item = typing.get_args(hint) if typing.get_origin(hint) is list else ()
    return item[0] if item and item[0] in (str, int, float) else None


def _add_to_argparse(parser: Any, cls: type, skip: set[str]) -> list[str]:
    """The same options on a plain ``argparse`` parser (scalars, optionals, lists, literals, flags)."""
    hints, docs, added = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kw: dict[str, Any] = {"help": docs.get(f.name, "").replace("%", "%%")}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hint is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(hint) is typing.Literal:
            kw["choices"] = args
        elif list in (typing.get_origin(hint), *(typing.get_origin(a) for a in args)):
            listed = hint if typing.get_origin(hint) is list else args[0]
            kw.update(nargs="+", type=typing.get_args(listed)[0])
        else:
            kw["type"] = args[0] if len(args) == 1 else hint
        parser.add_argument(f"--{f.name}", **kw)
        added.append(f.name)
    return added


def plain(value: Any) -> Any:
    """A parsed value as plain Python (nested jsonargparse Namespaces -> dicts)."""
    if isinstance(value, Namespace):
        return value.as_dict()
    return value


def values(cfg: Namespace, names: Iterable[str]) -> dict[str, Any]:
    """``{name: value}`` for the top-level options ``names`` (nested groups as dicts)."""
    return {n: plain(getattr(cfg, n)) for n in names if n in cfg}


def build(cls: type, cfg: Namespace, **override: Any) -> Any:
    """An instance of dataclass ``cls`` from the parsed options named after its fields."""
    kw = values(cfg, [f.name for f in dataclasses.fields(cls) if f.init])
    kw.update(override)
    return cls(**kw)


def non_default(cfg: Namespace, cls: type, names: Iterable[str]) -> list[str]:
    """The options among ``names`` whose value differs from ``cls``'s default."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
            defaults[f.name] = dataclasses.asdict(d) if dataclasses.is_dataclass(d) else d
    return [n for n in names if n in cfg and n in defaults and plain(getattr(cfg, n)) != defaults[n]]
