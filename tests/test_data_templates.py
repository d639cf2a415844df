"""Rendering, assistant-only labels (exact positions), truncation, prompts, foreign templates, packing."""

from __future__ import annotations

import copy
import logging

import pytest

from moe_app.core.data import templates
from moe_app.core.data.formats import Example, Message
from moe_app.core.data.packing import pack_sequences
from moe_app.core.data.templates import (
    IGNORE_INDEX,
    encode_example,
    extract_answer,
    generation_prompt,
    stop_strings,
    stop_token_ids,
)
from moe_app.core.data.tokenizer import suite_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return suite_tokenizer(str(tmp_path_factory.getbasetemp() / "suite-tokenizer-cache"))


def conv(*turns: tuple[str, str]) -> Example:
    return Example(messages=[Message(r, c) for r, c in turns])


SINGLE = conv(("user", "What is 2 + 3?"), ("assistant", "5"))
MULTI = conv(
    ("system", "Be brief."),
    ("user", "u one"),
    ("assistant", "a one"),
    ("user", "u two"),
    ("assistant", "a two"),
)


def labelled_runs(tok, enc) -> list[str]:
    """Decoded text of each contiguous run of labelled tokens."""
    runs, cur = [], []
    for i, label in enumerate(enc.labels):
        if label != IGNORE_INDEX:
            assert label == enc.input_ids[i]
            cur.append(label)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_single_turn_exact_label_positions(tok):
    enc = encode_example(tok, SINGLE, max_length=64)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    assert tokens == [
        "<s>", "<|user|>", "Ċ", "What", "Ġis", "Ġ", "2", "Ġ+", "Ġ", "3", "?", "<|end|>", "Ċ",
        "<|assistant|>", "Ċ", "5", "<|end|>", "Ċ",
    ]  # fmt: skip
    labelled = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    assert labelled == [15, 16, 17]
    assert enc.prompt_ids == enc.input_ids[:15] and enc.reference == "5"


def test_multi_turn_labels_every_reply_and_nothing_else(tok):
    enc = encode_example(tok, MULTI, max_length=128)
    assert labelled_runs(tok, enc) == ["a one<|end|>\n", "a two<|end|>\n"]
    text = tok.decode(enc.input_ids)
    assert text == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nu one<|end|>\n<|assistant|>\na one<|end|>\n"
        "<|user|>\nu two<|end|>\n<|assistant|>\na two<|end|>\n"
    )
    prompt, ref = generation_prompt(tok, MULTI)
    assert tok.decode(prompt).endswith("a one<|end|>\n<|user|>\nu two<|end|>\n<|assistant|>\n")
    assert prompt == enc.input_ids[: len(prompt)] and ref == "a two"


def test_default_template_jinja_equals_fast_path(tok):
    assert tok.chat_template == templates.DEFAULT_CHAT_TEMPLATE
    for ex in (SINGLE, MULTI):
        assert templates._template_segments(tok, ex.messages) == templates._default_segments(tok, ex.messages)
        rendered = tok.apply_chat_template([m.to_dict() for m in ex.messages], tokenize=False)
        assert templates.render_text(tok, ex.messages) == rendered


def test_plain_text_labels_everything_and_truncation(tok):
    enc = encode_example(tok, Example(text="The color of zorb is blue."), max_length=64)
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
    assert enc.labels == enc.input_ids and enc.prompt_ids is None
    assert len(encode_example(tok, Example(text="1 2 3 4 5 6 7 8 9"), max_length=6).input_ids) == 6


def test_conversation_truncation(tok):
    enc = encode_example(tok, SINGLE, max_length=16)
    assert len(enc.input_ids) == len(enc.labels) == 16
    assert [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX] == [15]
    assert encode_example(tok, SINGLE, max_length=15) is None  # the reply is cut away entirely
    full = encode_example(tok, MULTI, max_length=128)
    first_reply_end = next(
        i for i in range(1, len(full.labels)) if full.labels[i - 1] != IGNORE_INDEX == full.labels[i]
    )
    cut = encode_example(tok, MULTI, max_length=first_reply_end + 3)  # second reply cut, first kept
    assert labelled_runs(tok, cut) == ["a one<|end|>\n"]
    assert cut.input_ids == full.input_ids[: first_reply_end + 3]


def test_foreign_chat_template_masks_derived_from_prefixes(tok):
    chatml = copy.deepcopy(tok)
    chatml.chat_template = CHATML
    enc = encode_example(chatml, MULTI, max_length=256)
    runs = labelled_runs(chatml, enc)
    assert runs == ["a one<|im_end|>\n", "a two<|im_end|>\n"]
    prompt, _ = generation_prompt(chatml, MULTI)
    assert chatml.decode(prompt).endswith("<|im_start|>user\nu two<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_end|>" in stop_strings(chatml)


def test_prefix_inconsistent_template_supervises_only_the_last_reply(tok, caplog):
    weird = copy.deepcopy(tok)
    weird.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}a: (hidden)\n"
        "{% else %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}a: {% endif %}"
    )
    templates._warned_prefix = False
    with caplog.at_level(logging.WARNING, logger="moe_app.core.data"):
        enc = encode_example(weird, MULTI, max_length=256)
    assert labelled_runs(weird, enc) == ["a two\n"]
    assert "prefix-consistently" in caplog.text


def test_stop_tokens_and_answer_extraction(tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    assert stop_token_ids(tok) == [end, tok.eos_token_id]
    generated = [
        *tok("1 2 5", add_special_tokens=False).input_ids,
        end,
        *tok("junk", add_special_tokens=False).input_ids,
    ]
    assert extract_answer(tok, generated) == "1 2 5"


def test_packing_keeps_every_token_once_and_masks_boundaries():
    seqs = [
        (list(range(100 * k, 100 * k + n)), list(range(100 * k, 100 * k + n)))
        for k, n in enumerate([5, 3, 4, 2, 6])
    ]
    blocks = pack_sequences(seqs, max_length=8)
    assert len(blocks) == 3  # 20 tokens, best-fit decreasing: [6, 2], [5, 3], [4]
    assert all(len(ids) <= 8 and len(ids) == len(labels) for ids, labels in blocks)
    assert sorted(t for ids, _ in blocks for t in ids) == sorted(t for ids, _ in seqs for t in ids)
    for ids, labels in blocks:
        for pos, (t, label) in enumerate(zip(ids, labels)):
            starts_later_example = t % 100 == 0 and pos > 0
            assert label == (IGNORE_INDEX if starts_later_example else t)
    with pytest.raises(ValueError, match="max_length"):
        pack_sequences([([1] * 9, [1] * 9)], max_length=8)
