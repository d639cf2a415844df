"""InstructionDataModule: batch contract (shapes, padding, labels), determinism, stages, errors."""

from __future__ import annotations

import json

import pytest
import torch

from moe_app.core.data.collate import SeededShuffleSampler
from moe_app.core.data.sources import SourceConfig
from moe_app.core.data.synthetic import SUITE_DOMAINS
from moe_app.core.data.templates import IGNORE_INDEX
from moe_app.core.data.tokenizer import suite_tokenizer
from moe_app.errors import ConfigError
from moe_app.lightning.data.instruction import InstructionDataModule


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return suite_tokenizer(str(tmp_path_factory.getbasetemp() / "suite-tokenizer-cache"))


def small_suite(**kw) -> list[SourceConfig]:
    return [
        SourceConfig(name=d, builtin=d, builtin_train_size=24, builtin_eval_size=6, **kw)
        for d in SUITE_DOMAINS
    ]


def make_dm(tok, **kw) -> InstructionDataModule:
    dm = InstructionDataModule(**{"sources": small_suite(), "batch_size": 8, "max_length": 64, **kw})
    dm.set_tokenizer(tok)
    return dm


def check_lm_keys(batch, pad_id):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == labels.shape and ids.dim() == 2
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert (ids[row, n:] == pad_id).all() and (labels[row, n:] == IGNORE_INDEX).all()
        assert (labels[row, :n] != IGNORE_INDEX).any()
        kept = labels[row] != IGNORE_INDEX
        assert (labels[row][kept] == ids[row][kept]).all()
    assert int(mask.sum(1).max()) == ids.shape[1]  # padded to the longest row only


def test_train_and_val_batches(tok):
    dm = make_dm(tok)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 8
    check_lm_keys(batch, tok.pad_token_id)
    val = list(dm.val_dataloader())
    assert sum(b["input_ids"].shape[0] for b in val) == 6 * len(SUITE_DOMAINS)
    assert set(val[0]) == {"input_ids", "attention_mask", "labels", "source", "domain"}
    check_lm_keys(val[0], tok.pad_token_id)
    assert val[0]["source"][0] == SUITE_DOMAINS[0] and len(val[0]["source"]) == val[0]["input_ids"].shape[0]
    assert dm.source_sizes() == dict.fromkeys(SUITE_DOMAINS, 24)


def test_test_and_predict_batches_carry_prompts(tok):
    dm = make_dm(tok, eval_batch_size=5, max_eval_examples_per_source=4)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert sum(len(b["reference"]) for b in batches) == 4 * len(SUITE_DOMAINS)
    b = batches[0]
    check_lm_keys(b, tok.pad_token_id)
    for i, prompt in enumerate(b["prompt_ids"]):
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, : len(prompt)].tolist() == prompt  # prompt = training prefix
        assert tok.decode(prompt).endswith("<|assistant|>\n")
        labelled = b["labels"][i][b["labels"][i] != IGNORE_INDEX].tolist()
        assert tok.decode(labelled) == b["reference"][i] + "<|end|>\n"
        assert n > len(prompt)
        # Left-padded prompt tensor for batched generate().
        p_len = int(b["prompt_attention_mask"][i].sum())
        assert p_len == len(prompt) and b["prompt_input_ids"][i, -p_len:].tolist() == prompt
        assert not b["prompt_attention_mask"][i, : b["prompt_input_ids"].shape[1] - p_len].any()
    assert b["domain"] == ["arithmetic"] * 4 + ["arithmetic_alt"]
    dm.setup("predict")
    p = next(iter(dm.predict_dataloader()))
    assert set(p) == {
        "prompt_ids",
        "prompt_input_ids",
        "prompt_attention_mask",
        "reference",
        "domain",
        "source",
    }
    assert p["prompt_ids"] == b["prompt_ids"]


def test_shuffle_is_deterministic_per_seed_and_epoch(tok):
    def first_batches(seed, epoch):
        dm = make_dm(tok, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [b["input_ids"].tolist() for b in loader][:3]

    assert first_batches(0, 0) == first_batches(0, 0)
    assert first_batches(0, 0) != first_batches(0, 1)
    assert first_batches(0, 0) != first_batches(1, 0)
    s = SeededShuffleSampler(10, seed=4)
    assert sorted(s) == list(range(10)) and list(s) == list(s)


def test_packing_fills_blocks_per_source(tok):
    dm = make_dm(tok, packing=True, max_length=64)
    dm.setup("fit")
    sizes = dm.source_sizes()
    assert all(0 < n < 24 for n in sizes.values())
    rows = dm._build("train")
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    batch = next(iter(dm.train_dataloader()))
    check_lm_keys(batch, tok.pad_token_id)
    # Validation rows are never packed.
    assert len(dm._build("val")) == 6 * len(SUITE_DOMAINS)


def test_file_source_mixed_with_builtin_and_text(tok, tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"instruction": f"say {i}", "output": f"{i}", "domain": "echo"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = [
        SourceConfig(name="mine", path=str(path), dev_fraction=0.25),
        SourceConfig(name="pt", builtin="pretrain", builtin_train_size=10, builtin_eval_size=2),
    ]
    dm = make_dm(tok, sources=sources)
    dm.setup("fit")
    assert dm.source_sizes() == {"mine": 9, "pt": 10}
    val = [b for b in dm.val_dataloader()]
    assert sorted(set(s for b in val for s in b["source"])) == ["mine", "pt"]
    assert "echo" in {d for b in val for d in b["domain"]}
    dm.setup("test")
    test_rows = [r for b in dm.test_dataloader() for r in b["reference"]]
    assert test_rows == ["", ""]  # only the text source has a test split; text rows have no reference


def test_no_test_split_gives_no_loader(tok, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    dm = make_dm(tok, sources=[SourceConfig(name="mine", path=str(path))])
    dm.setup("test")
    assert dm.test_dataloader() == [] and dm.val_dataloader() == []


def test_tokenizer_resolution_and_config_errors(tok):
    dm = InstructionDataModule(sources=small_suite())
    with pytest.raises(ConfigError, match="no tokenizer"):
        dm.setup("fit")

    class Module:
        tokenizer = tok

    class Trainer:
        lightning_module = Module()

    dm.trainer = Trainer()
    dm.setup("validate")
    assert dm.tokenizer is tok
    with pytest.raises(ConfigError, match="batch_size"):
        InstructionDataModule(batch_size=0)
    with pytest.raises(ConfigError, match="duplicate names"):
        InstructionDataModule(
            sources=[SourceConfig(name="a", builtin="lookup"), SourceConfig(name="a", builtin="sorting")]
        )
    with pytest.raises(ConfigError, match="could not load tokenizer"):
        InstructionDataModule(tokenizer="/nonexistent/tokenizer").setup("fit")


def test_default_sources_are_the_suite():
    dm = InstructionDataModule()
    assert [s.name for s in dm.sources] == list(SUITE_DOMAINS)
    assert dm.eval_batch_size == dm.batch_size == 16


def test_runs_under_a_lightning_trainer(tok, tmp_path):
    """The tokenizer comes from the LightningModule; a source without val data skips validation."""
    import lightning as L

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tok
            self.emb = torch.nn.Embedding(len(tok), 8)
            self.head = torch.nn.Linear(8, len(tok))
            self.seen: list[str] = []

        def _loss(self, batch):
            logits = self.head(self.emb(batch["input_ids"]))  # (B, S, V)
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )

        def training_step(self, batch, batch_idx):
            return self._loss(batch)

        def validation_step(self, batch, batch_idx):
            self.seen += batch["source"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    kw = dict(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    kw |= dict(enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=1)
    model = Tiny()
    dm = InstructionDataModule(sources=[SourceConfig(name="mine", path=str(path))], batch_size=4)
    L.Trainer(**kw).fit(model, datamodule=dm)
    assert dm.tokenizer is tok and model.seen == []
    model = Tiny()
    dm = InstructionDataModule(sources=small_suite()[:1], batch_size=4)
    L.Trainer(**kw, val_check_interval=2).fit(model, datamodule=dm)
    assert set(model.seen) == {SUITE_DOMAINS[0]}
