"""Fuzz the data layer end to end: malformed *files* and records through reading, parsing, tokenising.

``tests/test_data_formats.py`` fuzzes :func:`parse_record` on in-memory Python values. This adds
what reaches the parsers from disk and what happens after them: random JSON-Lines / JSON files
mixing good records with truncated JSON, binary garbage, invalid UTF-8, byte-order marks, NaN
literals, lone UTF-16 surrogates and absurd nesting, read with both ``on_bad_record`` policies; and
parsed records (lone surrogates and control characters included) tokenised with the suite
tokenizer. The contract (docs/reliability.md): every malformed input yields a
:class:`~moe_app.errors.DataError` naming where it is, or a logged skip; nothing else escapes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_app.core.data.formats import Example, parse_record
from moe_app.core.data.sources import SourceConfig, load_examples
from moe_app.errors import DataError
from reliability_helpers import build_cache, cache_env

FORMATS = ["auto", "alpaca", "messages", "sharegpt", "pesc", "text"]
_text = st.text(max_size=8) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "🙂", ""])
_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _text
_value = st.recursive(
    _scalar, lambda v: st.lists(v, max_size=3) | st.dictionaries(_text, v, max_size=3), max_leaves=6
)
_turns = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "assistant", "system", "bot"]) | _scalar,
            "content": _text | _scalar,
            "from": st.sampled_from(["human", "gpt", "system"]) | _scalar,
            "value": _text | _scalar,
            "input": _text,
            "output": _text,
        },
    ),
    max_size=4,
)
_record = st.dictionaries(
    st.sampled_from(
        [
            *("instruction", "input", "output", "messages", "conversations", "conversation", "text"),
            *("system", "domain", "reference", "dataset", "corpus"),
        ]
    ),
    _text | _turns | _value,
    max_size=5,
)
_good = st.sampled_from(
    [
        {"instruction": "Say hi", "output": "hi"},
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
)


def _truncate(data: bytes, cut: float) -> bytes:
    return data[: max(1, int(len(data) * cut))]


_line = st.one_of(
    _good.map(lambda r: json.dumps(r).encode()),
    _record.map(lambda r: json.dumps(r).encode()),
    st.tuples(_good, st.floats(0.05, 0.95)).map(lambda t: _truncate(json.dumps(t[0]).encode(), t[1])),
    st.binary(max_size=24),
    st.sampled_from(
        [
            b"\xff\xfe\xfa",  # invalid UTF-8
            b'\xef\xbb\xbf{"text": "bom"}',  # UTF-8 byte-order mark
            b'{"text": NaN}',
            b'{"instruction": "a", "output": Infinity}',
            b'{"text": "\\ud800"}',  # lone surrogate escape
            b"[" * 5000 + b"]" * 5000,  # nesting deep enough to hit the recursion limit
            b"null",
            b"[]",
            b'"just a string"',
            b"{}",
        ]
    ),
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cache = build_cache(tmp_path_factory.mktemp("moe_app_cache"))
    with cache_env(cache):
        from moe_app.core.data.tokenizer import suite_tokenizer

        return suite_tokenizer()


def _check_examples(out) -> None:
    assert isinstance(out, list) and out
    assert all(isinstance(ex, Example) for ex in out)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    lines=st.lists(_line, min_size=1, max_size=6),
    suffix=st.sampled_from([".jsonl", ".json"]),
    fmt=st.sampled_from(FORMATS),
    policy=st.sampled_from(["error", "skip"]),
)
def test_fuzzed_files_give_examples_or_a_data_error(lines, suffix, fmt, policy):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        if suffix == ".json" and len(lines) > 1:
            path.write_bytes(b"[" + b",\n".join(lines) + b"]")  # a JSON list (often broken)
        else:
            path.write_bytes(b"\n".join(lines))
        src = SourceConfig(name="fuzz", path=str(path), format=fmt, on_bad_record=policy)
        try:
            out = load_examples(src, "train")
        except DataError as err:
            assert str(path) in str(err) or "fuzz" in str(err), str(err)
        else:
            _check_examples(out)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(record=_record | _good, fmt=st.sampled_from(FORMATS))
def test_fuzzed_records_parse_and_tokenise_or_give_a_data_error(tokenizer, record, fmt):
    from moe_app.core.data.templates import encode_examples

    try:
        ex = parse_record(record, fmt, where="fuzz record 7")
    except DataError as err:
        assert "fuzz record 7" in str(err)
        return
    try:
        (enc,) = encode_examples(tokenizer, [ex], max_length=32)
    except DataError:
        return
    if enc is not None:  # None: nothing to learn after truncation, a documented skip
        assert 0 < len(enc.input_ids) <= 32 and len(enc.labels) == len(enc.input_ids)
