"""The suite tokenizer: deterministic builds, digits split, cache reuse, save_pretrained round trip."""

from __future__ import annotations

from moe_app.core.data import tokenizer as suite_tok
from moe_app.core.data.templates import CHAT_MARKERS, DEFAULT_CHAT_TEMPLATE


def test_two_builds_in_separate_caches_are_identical(tmp_path):
    a = suite_tok.suite_tokenizer(str(tmp_path / "a"))
    b = suite_tok.suite_tokenizer(str(tmp_path / "b"))
    assert a.get_vocab() == b.get_vocab()
    files = sorted(p.name for p in next((tmp_path / "a").iterdir()).iterdir())
    assert "tokenizer.json" in files
    for name in files:
        pa = next((tmp_path / "a").iterdir()) / name
        pb = next((tmp_path / "b").iterdir()) / name
        assert pa.read_bytes() == pb.read_bytes(), name
    # Special tokens at fixed ids; the vocabulary stays within the cap.
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id, a.unk_token_id) == (0, 1, 2, 3)
    assert [a.convert_tokens_to_ids(m) for m in CHAT_MARKERS] == [4, 5, 6, 7]
    assert 512 <= len(a) <= suite_tok.SUITE_VOCAB_SIZE


def test_cache_is_reused_and_saving_round_trips(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = suite_tok.suite_tokenizer(str(tmp_path))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(suite_tok, "build_suite_tokenizer", no_rebuild)
    again = suite_tok.suite_tokenizer(str(tmp_path))
    assert again.get_vocab() == tok.get_vocab()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    tok.save_pretrained(tmp_path / "model")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    text = "<|user|>\nWhat is 47 + 38?<|end|>\n"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    assert loaded.decode(loaded(text, add_special_tokens=False).input_ids) == text


def test_default_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_APP_CACHE", str(tmp_path / "c"))
    assert suite_tok.default_cache_dir() == tmp_path / "c"


def test_digits_are_single_tokens(tmp_path_factory):
    tok = suite_tok.suite_tokenizer(str(tmp_path_factory.getbasetemp() / "suite-tokenizer-cache"))
    tokens = tok.convert_ids_to_tokens(tok("12345 + 678 = 13023", add_special_tokens=False).input_ids)
    digits = [t.lstrip("Ġ") for t in tokens if any(c.isdigit() for c in t)]
    assert digits == list("12345678") + list("13023")
    assert all(len(d) == 1 for d in digits)
    # Byte-level: arbitrary text round-trips.
    text = "naïve  tabs\tand\nnewlines 42"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
