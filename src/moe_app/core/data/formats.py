"""Instruction-data records and the parsers that turn raw rows into them.

Every data source (a local file, a hub dataset, the built-in suite) ends up as a list of
:class:`Example`: either a conversation (system/user/assistant :class:`Message` turns) or a plain
text (for continued pre-training), plus an optional ``domain`` (used to group metrics and to
reweight the mixture) and an optional ``reference`` (the expected final answer, for exact-match
evaluation by greedy generation).

Supported row formats (``format=``):

* ``alpaca``: ``{"instruction", "input"?, "output", "system"?}`` (single turn);
* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}``;
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], "system"?}``;
* ``pesc``: the PESC / Camelidae instruction files,
  ``{"corpus", "dataset", "instruction", "conversation": [{"input", "output"}, ...]}`` where
  ``instruction`` is the system prompt and ``dataset`` (else ``corpus``) names the domain. All turns
  are kept (the original loader keeps only the first pair and silently drops the rest);
* ``text``: ``{"text"}`` (plain text, loss on every token);
* ``auto``: picks one of the above from the keys of each row.

Every format also accepts optional top-level ``"domain"`` and ``"reference"`` keys. A malformed
row raises :class:`~moe_app.errors.DataError` naming where it is (file and line, or record index)
and what was expected; :func:`parse_records` can instead skip bad rows and log how many it dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_app.errors import DataError

logger = logging.getLogger("moe_app.core.data")

ROLES: tuple[str, ...] = ("system", "user", "assistant")
FORMATS: tuple[str, ...] = ("auto", "alpaca", "messages", "sharegpt", "pesc", "text")
BAD_RECORD_POLICIES: tuple[str, ...] = ("error", "skip")

# ShareGPT speaker names seen in the wild, mapped to chat roles.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    """``"system"``, ``"user"`` or ``"assistant"``."""
    content: str
    """The text of the turn."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataError(f"unknown message role {self.role!r}", fix=f"use one of {list(ROLES)}.")
        if not isinstance(self.content, str):
            raise DataError(
                f"message content must be a string, got {type(self.content).__name__}",
                fix="store each turn's text as a JSON string.",
            )

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Example:
    """A training/eval record: a conversation (``messages``) or a plain text (``text``)."""

    messages: list[Message] | None = None
    """Conversation turns; ``None`` for a plain-text example."""
    text: str | None = None
    """Plain text (continued pre-training); ``None`` for a conversation."""
    domain: str | None = None
    """Domain/task name used to group metrics and mixture weights; ``None`` = the source's name."""
    reference: str | None = None
    """Expected final answer for exact-match eval; ``None`` = the last assistant turn."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """Free-form provenance (e.g. ``{"where": "data.jsonl line 3"}``); not used for training."""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise DataError(
                "an Example holds either `messages` or `text`, not both or neither",
                fix="pass exactly one of messages=[...] or text='...'.",
            )
        if self.messages is not None:
            self.messages = [m if isinstance(m, Message) else Message(**m) for m in self.messages]
            if not any(m.role == "assistant" for m in self.messages):
                raise DataError("conversation has no assistant turn", fix="add the expected assistant reply.")

    @property
    def is_conversation(self) -> bool:
        return self.messages is not None

    def answer(self) -> str | None:
        """The expected final answer: ``reference``, else the last assistant turn (``None`` for text)."""
        if self.reference is not None:
            return self.reference
        if self.messages is None:
            return None
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")

    def to_record(self) -> dict[str, Any]:
        """The row in ``messages`` (or ``text``) format, as written by ``moe-app suite``."""
        row: dict[str, Any] = (
            {"messages": [m.to_dict() for m in self.messages]}
            if self.messages is not None
            else {"text": self.text}
        )
        if self.domain is not None:
            row["domain"] = self.domain
        if self.reference is not None:
            row["reference"] = self.reference
        return row


# --------------------------------------------------------------------------------------------
# Field helpers: each raises DataError with the location and the expected shape.


def _bad(where: str, what: str, fix: str) -> DataError:
    return DataError(what, where=where, fix=fix)


def _require_mapping(record: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise _bad(
            where,
            f"expected a JSON object (a record), got {type(record).__name__}",
            'write one JSON object per line/row, e.g. {"messages": [...]}.',
        )
    return record


def _get_str(
    record: Mapping[str, Any], key: str, where: str, *, required: bool, nonempty: bool = False
) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise _bad(where, f"missing field {key!r}", f"add a string field {key!r} to the record.")
        return ""
    if not isinstance(value, str):
        raise _bad(
            where,
            f"field {key!r} must be a string, got {type(value).__name__}",
            f"store {key!r} as a JSON string.",
        )
    if nonempty and not value.strip():
        raise _bad(where, f"field {key!r} is empty", f"give {key!r} a non-empty value or drop the record.")
    try:  # lone surrogates (JSON "\ud800") crash the tokenizer later; found by test_reliability_fuzz
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _bad(
            where,
            f"field {key!r} is not valid Unicode text ({err.reason} at character {err.start})",
            "remove lone surrogate escapes such as \\ud800 from the data.",
        ) from None
    return value


def _get_list(record: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = record.get(key)
    if value is None:
        raise _bad(where, f"missing field {key!r}", f"add a list field {key!r} to the record.")
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _bad(
            where,
            f"field {key!r} must be a list, got {type(value).__name__}",
            f"store {key!r} as a JSON list.",
        )
    value = list(value)
    if not value:
        raise _bad(where, f"field {key!r} is an empty conversation", "drop the record or add its turns.")
    return value


def _optional_label(record: Mapping[str, Any], key: str, where: str) -> str | None:
    """``domain`` / ``reference``: a string, or a number (CSV/parquet columns), or absent."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(
            where,
            f"field {key!r} must be a string, got {type(value).__name__}",
            f"store {key!r} as a string.",
        )
    return str(value)


def _check_turns(messages: list[Message], where: str) -> list[Message]:
    """Conversation shape: optional leading system turn, then user/assistant alternating from user."""
    body = messages
    if body and body[0].role == "system":
        body = body[1:]
    for i, m in enumerate(body):
        offset = len(messages) - len(body)
        if m.role == "system":
            raise _bad(
                where,
                f"turn {i + offset} is a system turn after the start of the conversation",
                "put the system prompt first (only one) or make it a user turn.",
            )
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise _bad(
                where,
                f"turn {i + offset} has role {m.role!r} but {expected!r} was expected "
                "(turns must alternate user/assistant, starting with user)",
                "merge consecutive turns of the same speaker, or fix the roles.",
            )
    if not any(m.role == "assistant" for m in body):
        raise _bad(
            where,
            "conversation has no assistant turn (nothing to learn from)",
            "add the expected assistant reply, or use format 'text' for plain text.",
        )
    if body[-1].role != "assistant":
        raise _bad(
            where,
            "conversation ends with a user turn that has no reply",
            "drop the trailing user turn or add the assistant reply.",
        )
    for i, m in enumerate(messages):
        if m.role == "assistant" and not m.content.strip():
            raise _bad(where, f"assistant turn {i} is empty", "give every assistant turn its reply text.")
    return messages


def _finish(
    record: Mapping[str, Any], where: str, messages: list[Message], domain: str | None = None
) -> Example:
    return Example(
        messages=_check_turns(messages, where),
        domain=_optional_label(record, "domain", where) or domain,
        reference=_optional_label(record, "reference", where),
        meta={"where": where},
    )


# --------------------------------------------------------------------------------------------
# One parser per format.


def parse_alpaca(record: Mapping[str, Any], where: str) -> Example:
    instruction = _get_str(record, "instruction", where, required=True, nonempty=True)
    extra = _get_str(record, "input", where, required=False)
    output = _get_str(record, "output", where, required=True, nonempty=True)
    system = _get_str(record, "system", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = ([Message("system", system)] if system.strip() else []) + [
        Message("user", user),
        Message("assistant", output),
    ]
    return _finish(record, where, messages)


def parse_messages(record: Mapping[str, Any], where: str) -> Example:
    turns = _get_list(record, "messages", where)
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}, messages[{i}]"
        turn = _require_mapping(turn, at)
        role = _get_str(turn, "role", at, required=True)
        if role not in ROLES:
            raise _bad(at, f"unknown role {role!r}", f"use one of {list(ROLES)}.")
        messages.append(Message(role, _get_str(turn, "content", at, required=True)))
    return _finish(record, where, messages)


def parse_sharegpt(record: Mapping[str, Any], where: str) -> Example:
    turns = _get_list(record, "conversations", where)
    system = _get_str(record, "system", where, required=False)
    messages = [Message("system", system)] if system.strip() else []
    for i, turn in enumerate(turns):
        at = f"{where}, conversations[{i}]"
        turn = _require_mapping(turn, at)
        speaker = _get_str(turn, "from", at, required=True)
        role = _SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise _bad(at, f"unknown speaker {speaker!r}", f"use one of {sorted(_SHAREGPT_ROLES)}.")
        messages.append(Message(role, _get_str(turn, "value", at, required=True)))
    return _finish(record, where, messages)


def parse_pesc(record: Mapping[str, Any], where: str) -> Example:
    turns = _get_list(record, "conversation", where)
    system = _get_str(record, "instruction", where, required=False)
    messages = [Message("system", system)] if system.strip() else []
    for i, turn in enumerate(turns):
        at = f"{where}, conversation[{i}]"
        turn = _require_mapping(turn, at)
        messages.append(Message("user", _get_str(turn, "input", at, required=True, nonempty=True)))
        messages.append(Message("assistant", _get_str(turn, "output", at, required=True, nonempty=True)))
    domain = _get_str(record, "dataset", where, required=False) or _get_str(
        record, "corpus", where, required=False
    )
    return _finish(record, where, messages, domain=domain.strip() or None)


def parse_text(record: Mapping[str, Any], where: str) -> Example:
    text = _get_str(record, "text", where, required=True, nonempty=True)
    return Example(
        text=text,
        domain=_optional_label(record, "domain", where),
        reference=_optional_label(record, "reference", where),
        meta={"where": where},
    )


PARSERS = {
    "alpaca": parse_alpaca,
    "messages": parse_messages,
    "sharegpt": parse_sharegpt,
    "pesc": parse_pesc,
    "text": parse_text,
}


def detect_format(record: Mapping[str, Any], where: str = "record") -> str:
    """The format of one row, from its keys (``messages`` > ``conversations`` > ``conversation``
    > ``instruction``+``output`` > ``text``)."""
    record = _require_mapping(record, where)
    if record.get("messages") is not None:
        return "messages"
    if record.get("conversations") is not None:
        return "sharegpt"
    if record.get("conversation") is not None:
        return "pesc"
    if record.get("instruction") is not None or record.get("output") is not None:
        return "alpaca"
    if record.get("text") is not None:
        return "text"
    keys = sorted(str(k) for k in record)
    raise _bad(
        where,
        f"cannot tell the record format from its keys {keys}",
        "use one of: messages (messages), sharegpt (conversations), pesc (conversation), "
        "alpaca (instruction/input/output), text (text); or set `format` on the source.",
    )


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}", fix=f"use one of {list(FORMATS)}.")
    return fmt


def parse_record(record: Any, fmt: str = "auto", *, where: str = "record") -> Example:
    """Parse one raw row into an :class:`Example`; raises :class:`DataError` naming ``where``."""
    check_format(fmt)
    record = _require_mapping(record, where)
    if fmt == "auto":
        fmt = detect_format(record, where)
    return PARSERS[fmt](record, where)


def parse_records(
    rows: Iterable[tuple[str, Any]], fmt: str = "auto", *, on_bad_record: str = "error", source: str = "data"
) -> list[Example]:
    """Parse ``(where, row)`` pairs. With ``on_bad_record="skip"`` malformed rows are dropped and
    the count (with the first problem) is logged on the ``moe_app.core.data`` logger."""
    check_format(fmt)
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise DataError(
            f"unknown on_bad_record policy {on_bad_record!r}", fix=f"use one of {list(BAD_RECORD_POLICIES)}."
        )
    examples: list[Example] = []
    skipped: list[DataError] = []
    for where, row in rows:
        try:
            examples.append(parse_record(row, fmt, where=where))
        except DataError as err:
            if on_bad_record == "error":
                raise
            skipped.append(err)
    if skipped:
        logger.warning(
            "%s: skipped %d malformed record(s) of %d (on_bad_record='skip'); first: %s",
            source,
            len(skipped),
            len(skipped) + len(examples),
            skipped[0],
        )
    return examples
