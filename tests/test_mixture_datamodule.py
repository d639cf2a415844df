"""MixtureDataModule without a Trainer: probe sets and gate loads, the controlled redundancy setup,
worker processes seeing new weights, exact state round trips, and config errors before training."""

from __future__ import annotations

import io
import json

import pytest
import torch

from moe_app.core.data.sources import SourceConfig
from moe_app.core.mixing.config import MixtureConfig
from moe_app.core.mixing.probe import probe_model, router_kind
from moe_app.core.mixing.rules import redundancy_scores, update_weights
from moe_app.errors import ConfigError, UnsupportedModelError
from moe_app.lightning.data.mixture import MixtureDataModule


def _src(name, builtin=None, n=48, m=12):
    return SourceConfig(name=name, builtin=builtin or name, builtin_train_size=n, builtin_eval_size=m)


def _dm(sources=None, num_workers=0, **mixture):
    sources = sources or [_src("arithmetic"), _src("arithmetic_alt"), _src("strings")]
    dm = MixtureDataModule(
        sources=sources,
        tokenizer="builtin",
        max_length=48,
        batch_size=4,
        num_workers=num_workers,
        mixture=MixtureConfig(**mixture),
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def tiny_moe():
    """A 2-layer LLaMA upcycled to 4 experts top-2 with a strong random router, suite vocabulary."""
    from transformers import AutoModelForCausalLM

    from conftest import suite_llama_config
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(suite_llama_config())
    return upcycle(model, UpcycleConfig(method="copy", num_experts=4, top_k=2, router_std=0.5))


def test_probe_set_is_the_first_dev_rows_of_each_source():
    dm = _dm(strategy="dynamic", probe_size=5)
    rows = dm.probe_rows()
    assert [s for s, _ in rows] == [0] * 5 + [1] * 5 + [2] * 5
    val = dm._build("val")
    assert [r["input_ids"] for _, r in rows[:5]] == [r["input_ids"] for r in val[:5]]
    # sharded over 2 ranks: equal batch counts, padding rows weigh 0, every real row exactly once
    b0, b1 = dm.probe_batches(0, 2), dm.probe_batches(1, 2)
    assert len(b0) == len(b1)
    w0 = torch.cat([b["row_weight"] for b in b0])
    w1 = torch.cat([b["row_weight"] for b in b1])
    assert float(w0.sum() + w1.sum()) == 15.0 and len(w0) == len(w1) == 8


def test_gate_load_counts_every_real_token_k_times(tiny_moe):
    dm = _dm(strategy="dynamic", probe_size=6)
    batches = dm.probe_batches()
    stats = probe_model(tiny_moe, batches, 3, layer="all")
    real = torch.zeros(3, dtype=torch.float64)
    for b in batches:
        real.index_add_(0, b["source_ids"], b["attention_mask"].sum(1).double())
    assert len(stats.counts) == 2
    for c in stats.counts:  # (n, E), top-2 over every non-padding token
        assert c.shape == (3, 4)
        assert c.sum(1).tolist() == (2 * real).tolist()
    assert tiny_moe.training  # mode restored


def test_controlled_redundancy_moves_weight_to_the_distinct_source(tiny_moe):
    # `a` and `b` are the same data under two names (identical router loads), `strings` differs.
    dm = _dm(
        [_src("a", "arithmetic"), _src("b", "arithmetic"), _src("strings")], strategy="dynamic", probe_size=8
    )
    stats = probe_model(tiny_moe, dm.probe_batches(), 3, layer=-1)
    last = stats.counts[0]
    assert torch.equal(last[0], last[1]) and not torch.equal(last[0], last[2])
    new, delta = dm.compute_update(stats.counts, None)
    assert delta[0] == delta[1] < delta[2]
    assert new[0] == new[1] < 1 / 3 < new[2]
    assert new.tolist() == update_weights([1 / 3] * 3, redundancy_scores(last), 10.0, 0.05).tolist()


def test_stock_hf_moe_router_logits_are_counted():
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moe_app.core.data.tokenizer import suite_tokenizer

    cfg = MixtralConfig(
        vocab_size=len(suite_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert router_kind(model) == "hf"
    dm = _dm(strategy="dynamic", probe_size=4)
    batches = dm.probe_batches()
    stats = probe_model(model, batches, 3, layer="all")
    real = sum(float(b["attention_mask"].sum()) for b in batches)
    assert len(stats.counts) == 2 and all(float(c.sum()) == 2 * real for c in stats.counts)
    assert float(stats.tokens.sum()) > 0 and torch.isfinite(stats.dev_losses()).all()


def test_dense_model_is_refused_for_dynamic():
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=700, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    dm = _dm(strategy="dynamic", probe_size=2)
    with pytest.raises(UnsupportedModelError, match=r"no Mixture-of-Experts layer.*Fix: train an MoE"):
        probe_model(model, dm.probe_batches(), 3)
    # the reference-loss baseline needs only losses: fine on a dense model
    assert probe_model(model, dm.probe_batches(), 3, need_counts=False).counts == []


def test_bad_layer_is_refused(tiny_moe):
    dm = _dm(strategy="dynamic", probe_size=2)
    with pytest.raises(
        ConfigError, match=r"layer 5 does not name one of the model's 2 MoE layers.*Fix: use an index"
    ):
        probe_model(tiny_moe, dm.probe_batches(), 3, layer=5)


def _apply(dm, weights):
    dm.apply_update(step=dm.started_batches, weights=torch.tensor(weights, dtype=torch.float64))


def test_worker_processes_see_updated_weights():
    dm = _dm(strategy="dynamic", num_workers=1)
    assert dm.apply_delay == 4  # 2 + prefetch_factor 2 * 1 worker
    sampler = dm.sampler()
    sampler.record = True
    loader = dm.train_dataloader()
    dm.start_tracking()
    rows = dm._build("train")
    seen = []
    for b, batch in enumerate(loader):
        if b == 2:
            _apply(dm, [0.0, 0.0, 1.0])  # in force from batch 2 + 4 = 6
        # the worker materialised exactly the rows the (main-process) sampler chose
        expected = [rows[i]["input_ids"] for i in sampler.drawn[b]]
        assert [
            row[row_mask.bool()].tolist()
            for row, row_mask in zip(batch["input_ids"], batch["attention_mask"])
        ] == expected
        seen.append(set(sampler.sources_of(sampler.drawn[b])))
        dm.note_batch_started()
        if b == 10:
            break
    assert all(s == {2} for s in seen[6:])
    assert set().union(*seen[:6]) != {2}


def _draws(dm, n):
    it = iter(dm.train_dataloader().sampler)
    return [[next(it) for _ in range(dm.batch_size)] for _ in range(n)]


def test_state_dict_round_trip_reproduces_the_same_subsequent_draws():
    dm = _dm(strategy="dynamic", update_every=2)
    for b in range(5):
        if b == 2:
            _apply(dm, [0.2, 0.3, 0.5])
        if b == 4:
            _apply(dm, [0.6, 0.1, 0.3])
        dm.note_batch_started()
    buf = io.BytesIO()
    torch.save({"dm": dm.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["dm"]  # what Lightning's resume does
    json.dumps(state)  # plain types only

    resumed = _dm(strategy="dynamic", update_every=2)
    resumed.load_state_dict(state)
    assert resumed.started_batches == 5 and resumed.history == dm.history
    assert resumed.weights.tolist() == [0.6, 0.1, 0.3]
    uninterrupted = _dm(strategy="dynamic", update_every=2)
    uninterrupted.schedule = type(dm.schedule).from_state(dm.schedule.state_dict())
    full = _draws(uninterrupted, 12)
    assert _draws(resumed, 7) == full[5:]
    assert _draws(dm, 7) == full[5:]


def test_state_loaded_before_setup_is_applied_in_setup():
    dm = _dm(strategy="dynamic")
    _apply(dm, [0.1, 0.1, 0.8])
    dm.note_batch_started()
    fresh = MixtureDataModule(
        sources=[_src("arithmetic"), _src("arithmetic_alt"), _src("strings")],
        tokenizer="builtin",
        max_length=48,
        batch_size=4,
        mixture=MixtureConfig(strategy="dynamic"),
    )
    fresh.load_state_dict(dm.state_dict())
    fresh.setup("fit")
    assert fresh.started_batches == 1 and fresh.weights.tolist() == [0.1, 0.1, 0.8]


def test_resume_with_other_sources_is_refused():
    dm = _dm(strategy="dynamic")
    other = _dm([_src("arithmetic"), _src("strings")], strategy="dynamic")
    with pytest.raises(
        ConfigError, match=r"the checkpoint's mixture has sources.*Fix: resume with the same data sources"
    ):
        other.load_state_dict(dm.state_dict())


@pytest.mark.parametrize(
    ("mixture", "message"),
    [
        (
            {"strategy": "dynamic", "weights": {"arithmetic": 1, "strngs": 1, "arithmetic_alt": 1}},
            r"unknown source name\(s\) \['strngs'\]",
        ),
        (
            {"strategy": "static", "weights": {"arithmetic": 0, "arithmetic_alt": 0, "strings": 0}},
            "all weights are 0",
        ),
        (
            {"strategy": "static", "weights": {"arithmetic": -1, "arithmetic_alt": 1, "strings": 1}},
            "weight of source 'arithmetic' is -1",
        ),
        ({"strategy": "static"}, r"strategy static needs weights.*Fix: add weights"),
        (
            {"strategy": "uniform", "weights": {"arithmetic": 1}},
            "weights are given but strategy is 'uniform'",
        ),
        ({"strategy": "dynamic", "eta": 0}, "eta must be a finite number > 0"),
        ({"strategy": "dynamic", "c": 1.5}, r"c \(uniform smoothing\) must be in \[0, 1\)"),
        ({"strategy": "dynamic", "update_every": 0}, "update_every must be an integer >= 1"),
        ({"strategy": "dynamic", "layer": "last"}, "layer must be an integer index or 'all'"),
        ({"strategy": "greedy"}, r"unknown strategy 'greedy'.*Fix: use one of"),
    ],
)
def test_config_errors_at_construction(mixture, message):
    with pytest.raises(ConfigError, match=message):
        MixtureDataModule(
            sources=[_src("arithmetic"), _src("arithmetic_alt"), _src("strings")],
            mixture=MixtureConfig(**mixture),
        )


def test_source_without_dev_split_is_refused_for_adaptive_strategies(tmp_path):
    data = tmp_path / "extra.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Say {i}", "output": str(i)}) + "\n" for i in range(20))
    )
    sources = [_src("arithmetic"), SourceConfig(name="extra", path=str(data))]
    for strategy in ("dynamic", "reference_loss"):
        with pytest.raises(
            ConfigError, match=r"source\(s\) \['extra'\] have no validation rows.*Fix: give those"
        ):
            _dm(sources, strategy=strategy)
    assert _dm(sources, strategy="size").weights.tolist() == pytest.approx([48 / 68, 20 / 68])
