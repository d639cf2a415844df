"""The built-in suite: determinism, disjoint splits, correct answers, checkers, `moe-app suite`."""

from __future__ import annotations

import argparse
import ast
import json
import re

import pytest

from moe_app.core.data.sources import SourceConfig, load_examples
from moe_app.core.data.synthetic import (
    ATTRIBUTES,
    NEAR_DUPLICATES,
    PRETRAIN,
    SUITE_DOMAINS,
    WORLD,
    check,
    generate_domain,
    generate_pretrain,
)
from moe_app.errors import ConfigError


def prompts(examples) -> list[str]:
    return [ex.messages[0].content for ex in examples]


def test_domains_and_near_duplicates():
    assert len(SUITE_DOMAINS) >= 5
    assert NEAR_DUPLICATES == {"arithmetic_alt": "arithmetic"}
    assert len(WORLD) == 40


@pytest.mark.parametrize("domain", SUITE_DOMAINS)
def test_same_seed_same_records_other_seed_other_records(domain):
    a = generate_domain(domain, "train", 60, seed=1)
    b = generate_domain(domain, "train", 60, seed=1)
    c = generate_domain(domain, "train", 60, seed=2)
    assert [e.to_record() for e in a] == [e.to_record() for e in b]
    assert prompts(a) != prompts(c)
    assert all(ex.domain == domain and ex.reference == ex.answer() for ex in a)


@pytest.mark.parametrize("domain", SUITE_DOMAINS)
def test_splits_are_disjoint(domain):
    splits = {
        s: set(prompts(generate_domain(domain, s, n, seed=0)))
        for s, n in (("train", 2000), ("val", 100), ("test", 100))
    }
    assert not splits["train"] & splits["val"]
    assert not splits["train"] & splits["test"]
    assert not splits["val"] & splits["test"]
    assert len(splits["test"]) == 100  # eval records are distinct


def test_near_duplicate_shares_splits_with_its_original():
    """A test sum of arithmetic_alt never appears as a training sum of arithmetic (no leakage)."""

    def sums(examples):
        return {
            tuple(
                int(t)
                for t in ex.messages[0].content.replace("?", " ").replace(".", " ").split()
                if t.isdigit()
            )
            for ex in examples
        }

    train = sums(generate_domain("arithmetic", "train", 2000))
    test_alt = sums(generate_domain("arithmetic_alt", "test", 100))
    assert not train & test_alt


def test_answers_are_correct():
    for ex in generate_domain("arithmetic", "test", 50):
        a, b = (int(t) for t in ex.messages[0].content[len("What is ") : -1].split(" + "))
        assert ex.reference == str(a + b)
    for ex in generate_domain("expressions", "test", 50):
        expr = ex.messages[0].content[len("Evaluate: ") :]
        node = ast.parse(expr, mode="eval")  # only digits, + - *, (), max/min: safe to evaluate
        assert ex.reference == str(eval(compile(node, "<expr>", "eval"), {"max": max, "min": min}))
    for ex in generate_domain("sorting", "test", 50):
        nums = [int(t) for t in ex.messages[0].content.split(":")[1].split()]
        assert ex.reference == " ".join(map(str, sorted(nums)))
    for ex in generate_domain("strings", "test", 50):
        letters = ex.messages[0].content.split(": ")[1].split()
        expected = (
            letters[::-1] if ex.messages[0].content.startswith("Reverse") else [c.upper() for c in letters]
        )
        assert ex.reference == " ".join(expected)
    for ex in generate_domain("lookup", "test", 50):
        name = next(n for n in WORLD if re.search(rf"\b{n}\b", ex.messages[0].content))
        assert ex.reference in WORLD[name].values()


def test_lookup_eval_facts_are_taught_in_training():
    def fact(ex):
        name = next(n for n in WORLD if re.search(rf"\b{n}\b", ex.messages[0].content))
        attr = next(a for a in ATTRIBUTES if re.search(rf"\b{a}\b", ex.messages[0].content))
        return name, attr

    train = {fact(ex) for ex in generate_domain("lookup", "train")}
    assert len(train) == len(WORLD) * len(ATTRIBUTES)
    for split in ("val", "test"):
        assert {fact(ex) for ex in generate_domain("lookup", split)} <= train


def test_pretrain_corpus():
    docs = generate_pretrain("train", 20)
    assert len(docs) == 20 and all(ex.text and ex.domain == PRETRAIN for ex in docs)
    assert [d.text for d in docs] == [d.text for d in generate_pretrain("train", 20)]
    assert not {d.text for d in docs} & {d.text for d in generate_pretrain("val", 20)}


def test_generate_domain_errors():
    with pytest.raises(ConfigError, match="unknown built-in suite domain"):
        generate_domain("poetry", "train", 1)
    with pytest.raises(ConfigError, match="unknown suite split"):
        generate_domain("arithmetic", "dev", 1)


@pytest.mark.parametrize(
    ("domain", "pred", "ref", "ok"),
    [
        ("arithmetic", " 85 ", "85", True),
        ("arithmetic", "85.", "85", True),
        ("arithmetic", "86", "85", False),
        ("arithmetic", "eighty", "85", False),
        ("expressions", "-3", "-3", True),
        ("sorting", "1  2 5\n9", "1 2 5 9", True),
        ("sorting", "1 2 9 5", "1 2 5 9", False),
        ("strings", "O M A K", "o m a k", False),
        ("strings", "o  m a k", "o m a k", True),
        ("lookup", "Blue", "blue", True),
        ("lookup", "green", "blue", False),
        ("my_dataset", "Paris ", "Paris", True),
        (None, "paris", "Paris", False),
    ],
)
def test_checkers(domain, pred, ref, ok):
    assert check(domain, pred, ref) is ok


def test_suite_command_writes_loadable_jsonl(tmp_path):
    from moe_app.cli.commands import suite

    parser = argparse.ArgumentParser()
    suite.build_parser(parser)
    out = tmp_path / "suite"
    args = parser.parse_args(["--out", str(out), "--train_size", "30", "--eval_size", "5"])
    assert suite.run(args) == 0
    for domain in (*SUITE_DOMAINS, PRETRAIN):
        for split in ("train", "val", "test"):
            assert (out / domain / f"{split}.jsonl").is_file()
    first = json.loads((out / "lookup" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"messages", "domain", "reference"}
    # A domain directory is a file source as is; records equal the generator's.
    cfg = SourceConfig(name="arithmetic", path=str(out / "arithmetic"))
    loaded = load_examples(cfg, "test")
    assert [e.to_record() for e in loaded] == [
        e.to_record() for e in generate_domain("arithmetic", "test", 5)
    ]
    assert len(load_examples(cfg, "train")) == 30
    with pytest.raises(ConfigError, match="unknown suite domain"):
        suite.run(parser.parse_args(["--out", str(out), "--domains", "poetry"]))
