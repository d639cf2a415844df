"""Record parsers: every format, multi-turn kept, malformed rows -> DataError, skip policy, fuzz."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_app.core.data.formats import Example, Message, detect_format, parse_record, parse_records
from moe_app.errors import DataError


def roles(ex: Example) -> list[str]:
    return [m.role for m in ex.messages]


def test_alpaca_with_and_without_input():
    ex = parse_record({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca")
    assert ex.messages == [Message("user", "Add\n\n2 and 3"), Message("assistant", "5")]
    ex = parse_record({"instruction": "Say hi", "input": "", "output": "hi", "system": "Be brief."})
    assert roles(ex) == ["system", "user", "assistant"]
    assert ex.messages[1].content == "Say hi"
    assert ex.answer() == "hi"


def test_messages_multi_turn_kept_with_domain_and_reference():
    rec = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ],
        "domain": "chat",
        "reference": "A2",
    }
    ex = parse_record(rec, "auto")
    assert roles(ex) == ["system", "user", "assistant", "user", "assistant"]
    assert ex.domain == "chat" and ex.reference == "A2" and ex.answer() == "A2"


def test_sharegpt_multi_turn():
    rec = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "r1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "r2"},
        ]
    }
    ex = parse_record(rec)
    assert detect_format(rec) == "sharegpt"
    assert [m.content for m in ex.messages] == ["S", "q1", "r1", "q2", "r2"]
    assert ex.answer() == "r2"


def test_pesc_keeps_every_turn_and_uses_dataset_as_domain():
    rec = {
        "corpus": "",
        "dataset": "math",
        "instruction": "You are a tutor.",
        "conversation": [{"input": "1+1?", "output": "2"}, {"input": "and 2+2?", "output": "4"}],
    }
    ex = parse_record(rec)
    assert detect_format(rec) == "pesc"
    assert roles(ex) == ["system", "user", "assistant", "user", "assistant"]
    assert ex.domain == "math" and ex.answer() == "4"
    # No system prompt and the corpus as the domain when dataset is missing.
    ex = parse_record(
        {"corpus": "code", "instruction": "", "conversation": [{"input": "a", "output": "b"}]}, "pesc"
    )
    assert roles(ex) == ["user", "assistant"] and ex.domain == "code"


def test_text():
    ex = parse_record({"text": "hello world"})
    assert ex.text == "hello world" and not ex.is_conversation and ex.answer() is None


@pytest.mark.parametrize(
    ("record", "fmt", "needle"),
    [
        ({"instruction": "x"}, "alpaca", "missing field 'output'"),
        ({"instruction": 3, "output": "y"}, "alpaca", "'instruction' must be a string"),
        ({"messages": []}, "messages", "empty conversation"),
        ({"messages": "hi"}, "messages", "must be a list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "q"}]}, "messages", "unknown role"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},
            "messages",
            "alternate",
        ),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", "no assistant turn"),
        ({"conversations": [{"from": "alien", "value": "q"}]}, "sharegpt", "unknown speaker"),
        ({"conversation": [{"input": "q"}]}, "pesc", "missing field 'output'"),
        ({"conversation": []}, "pesc", "empty conversation"),
        ({"text": ""}, "text", "'text' is empty"),
        ({"foo": 1}, "auto", "cannot tell the record format"),
        (["not", "a", "dict"], "auto", "expected a JSON object"),
    ],
)
def test_malformed_records_name_where_and_what(record, fmt, needle):
    with pytest.raises(DataError) as err:
        parse_record(record, fmt, where="data.jsonl line 7")
    msg = str(err.value)
    assert needle in msg and "data.jsonl line 7" in msg and "Fix:" in msg


def test_unknown_format():
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        parse_record({"text": "a"}, "xml")


def test_skip_policy_drops_exactly_the_bad_ones(caplog):
    rows = [
        ("r0", {"text": "ok"}),
        ("r1", {"instruction": "no output"}),
        ("r2", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        ("r3", 42),
        ("r4", {"text": "ok too"}),
    ]
    with caplog.at_level(logging.WARNING, logger="moe_app.core.data"):
        out = parse_records(rows, on_bad_record="skip", source="mine")
    assert [ex.meta["where"] for ex in out] == ["r0", "r2", "r4"]
    assert "skipped 2 malformed record(s) of 5" in caplog.text and "mine" in caplog.text
    with pytest.raises(DataError, match="r1"):
        parse_records(rows, on_bad_record="error")


def test_example_round_trips_through_its_record():
    ex = parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    ex.domain, ex.reference = "d", "a"
    again = parse_record(ex.to_record())
    assert again == ex


# --------------------------------------------------------------------------------------------
# Fuzz: random (mostly malformed) rows give an Example, a DataError, or a skip; nothing else.

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(["role", "content", "from", "value", "input", "output", "x"]), inner, max_size=3
        ),
    ),
    max_leaves=8,
)
_turn = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(["system", "user", "assistant", "bot"]), _scalars),
        "content": st.one_of(st.text(max_size=4), _scalars),
        "from": st.one_of(st.sampled_from(["human", "gpt", "system", "x"]), _scalars),
        "value": st.one_of(st.text(max_size=4), _scalars),
        "input": st.one_of(st.text(max_size=4), _scalars),
        "output": st.one_of(st.text(max_size=4), _scalars),
    },
)
_keys = ["messages", "conversations", "conversation", "instruction", "input", "output", "text", "system"]
_record = st.one_of(
    st.dictionaries(
        st.sampled_from([*_keys, "domain", "reference", "dataset", "corpus"]),
        st.one_of(_values, st.lists(_turn, max_size=4), st.text(max_size=6)),
        max_size=5,
    ),
    _values,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_record, fmt=st.sampled_from(["auto", "alpaca", "messages", "sharegpt", "pesc", "text"]))
def test_fuzz_parse_never_raises_other_exceptions(record, fmt):
    try:
        ex = parse_record(record, fmt, where="fuzz record 0")
    except DataError as err:
        assert "fuzz record 0" in str(err)
    else:
        assert isinstance(ex, Example)
        assert (ex.messages is None) != (ex.text is None)
    out = parse_records([("fuzz record 0", record)], fmt, on_bad_record="skip")
    assert len(out) <= 1
