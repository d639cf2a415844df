"""Loading sources: local jsonl/json/parquet/csv, hub code path on a local dir, errors, hold-out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from moe_app.core.data.sources import SourceConfig, load_examples
from moe_app.errors import ConfigError, DataError

ALPACA = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answers(examples) -> list[str]:
    return [ex.answer() for ex in examples]


def test_jsonl_json_parquet_csv_load_the_same_records(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    (tmp_path / "d.json").write_text(json.dumps(ALPACA))
    datasets.Dataset.from_list(ALPACA).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(ALPACA).to_csv(str(tmp_path / "d.csv"), index=False)
    expected = [f"a{i}" for i in range(10)]
    for suffix in ("jsonl", "json", "parquet", "csv"):
        examples = load_examples(SourceConfig(name="s", path=str(tmp_path / f"d.{suffix}")), "train")
        assert answers(examples) == expected, suffix
        assert examples[0].messages[0].content == "q0"
        assert examples[0].domain == "s"  # no domain in the record -> the source name
    assert load_examples(SourceConfig(name="s", path=str(jsonl)), "val") == []


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError) as err:
        load_examples(SourceConfig(name="s", path=str(path)), "train")
    msg = str(err.value)
    assert "broken.jsonl" in msg and "line 3" in msg and "invalid JSON" in msg


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=r"broken\.json line 3"):
        load_examples(SourceConfig(name="s", path=str(path)), "train")


def test_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], {"instruction": "q"}])
    with pytest.raises(DataError) as err:
        load_examples(SourceConfig(name="s", path=str(path), format="alpaca"), "train")
    assert "d.jsonl line 2" in str(err.value) and "missing field 'output'" in str(err.value)


def test_empty_dataset_and_missing_path(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_examples(SourceConfig(name="s", path=str(empty)), "train")
    with pytest.raises(DataError, match="not found"):
        load_examples(SourceConfig(name="s", path=str(tmp_path / "nope.jsonl")), "train")


def test_all_records_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}, {"bar": 2}])
    with pytest.raises(DataError, match="all 2 records are malformed"):
        load_examples(SourceConfig(name="s", path=str(path), on_bad_record="skip"), "train")


def test_skip_policy_on_a_file(tmp_path, caplog):
    rows = [*ALPACA[:3], {"instruction": "no output"}, {"text": 5}, ALPACA[3]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="moe_app.core.data"):
        out = load_examples(SourceConfig(name="s", path=str(path), on_bad_record="skip"), "train")
    assert answers(out) == ["a0", "a1", "a2", "a3"]
    assert "skipped 2 malformed record(s) of 6" in caplog.text


def test_unknown_format_and_bad_configs():
    with pytest.raises(ConfigError, match="unknown format 'xml'"):
        SourceConfig(name="s", path="x.jsonl", format="xml")
    with pytest.raises(ConfigError, match="exactly one of path/hub/builtin"):
        SourceConfig(name="s", path="x.jsonl", hub="a/b")
    with pytest.raises(ConfigError, match="exactly one of path/hub/builtin"):
        SourceConfig(name="s")
    with pytest.raises(ConfigError, match="dev_fraction"):
        SourceConfig(name="s", path="x.jsonl", dev_fraction=1.5)
    with pytest.raises(ConfigError, match="unknown builtin"):
        SourceConfig(name="s", builtin="poetry")
    with pytest.raises(ConfigError, match="on_bad_record"):
        SourceConfig(name="s", path="x.jsonl", on_bad_record="ignore")


def test_dev_fraction_holdout_is_fixed_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = SourceConfig(name="s", path=str(path), dev_fraction=0.2, test_fraction=0.1, seed=3)
    train, val, test = (answers(load_examples(cfg, s)) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (7, 2, 1)
    assert sorted(train + val + test) == sorted(f"a{i}" for i in range(10))
    assert answers(load_examples(cfg, "dev")) == val  # alias, and the same records again


def test_dev_path_and_split_named_files_in_a_dir(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", ALPACA[:6])
    write_jsonl(tmp_path / "ds" / "validation.jsonl", ALPACA[6:8])
    write_jsonl(tmp_path / "ds" / "test.jsonl", ALPACA[8:])
    cfg = SourceConfig(name="s", path=str(tmp_path / "ds"))
    assert len(load_examples(cfg, "train")) == 6
    assert answers(load_examples(cfg, "val")) == ["a6", "a7"]
    assert answers(load_examples(cfg, "test")) == ["a8", "a9"]
    # A single file plus an explicit dev file; max_records caps every split.
    cfg = SourceConfig(
        name="s",
        path=str(tmp_path / "ds" / "train.jsonl"),
        dev_path=str(tmp_path / "ds" / "test.jsonl"),
        max_records=1,
    )
    assert answers(load_examples(cfg, "train")) == ["a0"]
    assert answers(load_examples(cfg, "val")) == ["a8"]


def test_hub_code_path_on_a_local_dataset_dir(tmp_path):
    write_jsonl(tmp_path / "hubds" / "train.jsonl", ALPACA[:8])
    write_jsonl(tmp_path / "hubds" / "test.jsonl", ALPACA[8:])
    cfg = SourceConfig(name="h", hub=str(tmp_path / "hubds"), dev_fraction=0.25)
    train = load_examples(cfg, "train")
    val = load_examples(cfg, "val")  # no validation split on the "hub": held out of train
    assert len(train) == 6 and len(val) == 2
    assert answers(load_examples(cfg, "test")) == ["a8", "a9"]
    bad = SourceConfig(name="h", hub=str(tmp_path / "hubds"), train_split="nope")
    with pytest.raises(DataError, match="split 'nope' not found"):
        load_examples(bad, "train")
    with pytest.raises(DataError, match="could not load the hub dataset"):
        load_examples(SourceConfig(name="h", hub=str(tmp_path / "missing_ds")), "train")


def test_builtin_sources():
    cfg = SourceConfig(name="arith", builtin="arithmetic", builtin_train_size=20, builtin_eval_size=5)
    train = load_examples(cfg, "train")
    assert len(train) == 20 and {ex.domain for ex in train} == {"arithmetic"}
    assert len(load_examples(cfg, "test")) == 5
    every = load_examples(SourceConfig(name="all", builtin="all", builtin_eval_size=3), "val")
    assert len({ex.domain for ex in every}) == 6 and len(every) == 18
    text = load_examples(SourceConfig(name="pt", builtin="pretrain", builtin_eval_size=4), "val")
    assert len(text) == 4 and all(ex.text for ex in text)
