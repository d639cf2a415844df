"""The dynamic-mixing paper's baselines (Zhu et al., arXiv 2406.11256; ALGORITHMS.md section 7b) as
MixtureDataModule strategies: ``static_gate_load``, ``sentence_embedding``, ``random`` and
``sequential``. Unit tests of the pure rules against hand-computed numbers, the data module without
a Trainer, and short real fits through the CLI (tiny 2-layer MoE, a few steps each)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from moe_app.core.data.sources import SourceConfig
from moe_app.core.mixing.config import MixtureConfig
from moe_app.core.mixing.probe import ProbeStats, probe_model
from moe_app.core.mixing.rules import (
    STRATEGIES,
    embedding_redundancy_scores,
    gate_load_weights,
    initial_weights,
    layered_redundancy_scores,
    mean_embeddings,
    random_weights,
    sequential_plan,
    update_weights,
)
from moe_app.core.mixing.sampler import MixtureSampler, WeightSchedule
from moe_app.errors import ConfigError
from moe_app.lightning.data.mixture import MixtureDataModule

NEW = ("static_gate_load", "sentence_embedding", "random", "sequential")


# ------------------------------------------------------------------------------------------------
# Pure rules.


def test_all_strategies_are_known_and_an_unknown_one_lists_them():
    assert set(NEW) <= set(STRATEGIES)
    with pytest.raises(ConfigError) as err:
        MixtureConfig(strategy="curriculum")
    for name in STRATEGIES:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize("strategy", ["random", "sequential"])
def test_weights_are_refused_where_they_would_be_ignored(strategy):
    with pytest.raises(ConfigError, match="ignores them"):
        MixtureConfig(strategy=strategy, weights={"a": 1.0})


def test_measured_baselines_use_the_dynamic_defaults():
    for strategy in ("static_gate_load", "sentence_embedding"):
        m = MixtureConfig(strategy=strategy)
        assert (m.resolved_eta, m.resolved_c) == (10.0, 0.05) and m.measured
    assert MixtureConfig(strategy="sentence_embedding").adaptive
    assert MixtureConfig(strategy="static_gate_load").one_shot
    assert not MixtureConfig(strategy="static_gate_load").adaptive
    for strategy in ("random", "sequential"):
        assert not MixtureConfig(strategy=strategy).measured


def test_static_gate_load_is_one_dynamic_update_of_the_start():
    # The hand example of test_mixture_rules: O = [[.75,.25],[.75,.25],[.25,.75]],
    # Delta = [s/3, s/3, 2s/3] with s = sqrt(0.5).
    counts = torch.tensor([[[3.0, 1.0], [6.0, 2.0], [1.0, 3.0]]])  # (L=1, n=3, E=2)
    w, delta = gate_load_weights([1 / 3] * 3, counts, eta=2.0, c=0.1)
    s = math.sqrt(0.5)
    assert delta.tolist() == pytest.approx([s / 3, s / 3, 2 * s / 3], abs=1e-12)
    z = 2 * math.exp(2 * s / 3) + math.exp(4 * s / 3)
    alpha = [math.exp(2 * s / 3) / z, math.exp(2 * s / 3) / z, math.exp(4 * s / 3) / z]
    assert w.tolist() == pytest.approx([0.9 * a + 0.1 / 3 for a in alpha], abs=1e-12)
    assert w.tolist() == update_weights([1 / 3] * 3, layered_redundancy_scores(counts), 2.0, 0.1).tolist()


def test_sentence_embedding_scores_by_hand():
    # E_0 and E_1 point the same way (cos 1, scale does not matter), E_2 is orthogonal (cos 0):
    # Delta = (1/3) [0 + 0 + 1, 0 + 0 + 1, 1 + 1 + 0] = [1/3, 1/3, 2/3].
    e = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    delta = embedding_redundancy_scores(e)
    assert delta.dtype == torch.float64
    assert delta.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3], abs=1e-15)
    # With eta = 3, c = 0 from uniform: alpha ∝ exp(3 Delta) = [e, e, e^2] -> [1, 1, e] / (2 + e).
    w = update_weights([1 / 3] * 3, delta, eta=3.0, c=0.0)
    assert w.tolist() == pytest.approx([1 / (2 + math.e), 1 / (2 + math.e), math.e / (2 + math.e)], abs=1e-12)
    # 45 degrees apart: Delta_i = (1 - 1/sqrt 2) / 2 for both.
    d45 = embedding_redundancy_scores(torch.tensor([[1.0, 0.0], [3.0, 3.0]]))
    assert d45.tolist() == pytest.approx([(1 - 1 / math.sqrt(2)) / 2] * 2, abs=1e-15)
    # identical embeddings: nothing is distinct, Delta = 0, uniform stays uniform
    assert embedding_redundancy_scores(torch.ones(3, 4)).tolist() == [0.0, 0.0, 0.0]


def test_mean_embeddings_divide_the_row_sums():
    sums = torch.tensor([[2.0, 4.0], [3.0, 3.0]])
    assert mean_embeddings(sums, torch.tensor([2.0, 3.0])).tolist() == [[1.0, 2.0], [1.0, 1.0]]


def test_random_weights_are_seeded_dirichlet_one():
    a, b = random_weights(4, 7), random_weights(4, 7)
    assert torch.equal(a, b) and a.dtype == torch.float64
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-15) and bool((a > 0).all())
    assert not torch.equal(a, random_weights(4, 8))
    assert torch.equal(initial_weights("random", ["a", "b", "c", "d"], seed=7), a)
    # Dirichlet(1) with n = 3: E[w_i] = 1/3, E[w_i^2] = 2 / (n (n + 1)) = 1/6 (a normalised uniform
    # vector would give about 0.146 instead).
    draws = torch.stack([random_weights(3, s) for s in range(4000)])  # (4000, 3)
    assert draws.mean(0).tolist() == pytest.approx([1 / 3] * 3, abs=0.015)
    assert float(draws.pow(2).mean()) == pytest.approx(1 / 6, abs=0.006)


def test_sequential_plan_by_hand():
    # equal sizes, 10 batches: bounds round(0, 10/3, 20/3, 10) = 0, 3, 7, 10
    assert sequential_plan([64, 64, 64], 10) == [(0, 0), (3, 1), (7, 2)]
    # proportional to sizes: 1:3 of 8 batches
    assert sequential_plan([1, 3], 8) == [(0, 0), (2, 1)]
    # a budget too short for every source: the empty stage (round(2/3) = round(4/3) = 1) is left out
    assert sequential_plan([1, 1, 1], 2) == [(0, 0), (1, 2)]
    # ties round half to even, exactly: 5 * 1/2 = 2.5 -> 2
    assert sequential_plan([1, 1], 5) == [(0, 0), (2, 1)]
    with pytest.raises(ValueError):
        sequential_plan([1, 1], 0)
    assert initial_weights("sequential", ["a", "b"]).tolist() == [1.0, 0.0]


def test_sampler_on_a_sequential_schedule_draws_only_the_stage_source():
    sched = WeightSchedule([1.0, 0.0, 0.0])
    for start, src in sequential_plan([5, 7, 9], 9):
        sched.add(start, torch.nn.functional.one_hot(torch.tensor(src), 3).double())
    sampler = MixtureSampler([5, 7, 9], 16, sched, seed=3)
    stages = [0, 0, 1, 1, 1, 2, 2, 2, 2]  # bounds round(0, 45/21, 108/21, 9) = 0, 2, 5, 9
    for b, src in enumerate([*stages, 2, 2]):
        assert set(sampler.sources_of(sampler.batch_indices(b))) == {src}, b


def test_probe_stats_round_trip_with_embeddings():
    stats = ProbeStats([torch.ones(2, 3)], torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    stats.embedding_sum = torch.arange(8, dtype=torch.float64).reshape(2, 4)
    stats.embedding_rows = torch.tensor([5.0, 6.0])
    back = stats.with_flat(stats.flat() * 2)
    assert torch.equal(back.embedding_sum, stats.embedding_sum * 2)
    assert torch.equal(back.embedding_rows, stats.embedding_rows * 2)
    assert torch.equal(back.tokens, stats.tokens * 2) and torch.equal(back.counts[0], stats.counts[0] * 2)


# ------------------------------------------------------------------------------------------------
# The data module without a Trainer.


def _src(name, builtin=None, n=48, m=12):
    return SourceConfig(name=name, builtin=builtin or name, builtin_train_size=n, builtin_eval_size=m)


def _dm(sources=None, **mixture):
    sources = sources or [_src("arithmetic"), _src("arithmetic_alt"), _src("strings")]
    dm = MixtureDataModule(
        sources=sources, tokenizer="builtin", max_length=48, batch_size=4, mixture=MixtureConfig(**mixture)
    )
    dm.setup("fit")
    return dm


def test_probe_embeddings_are_mean_last_hidden_states_over_real_tokens():
    from transformers import AutoModelForCausalLM

    from conftest import suite_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(suite_llama_config())  # dense: no gate load needed
    dm = _dm(strategy="sentence_embedding", probe_size=3)
    batches = dm.probe_batches(0, 2)  # includes a padding row of weight 0
    stats = probe_model(model, batches, 3, need_counts=False, need_loss=False, need_embeddings=True)
    expected = torch.zeros(3, model.config.hidden_size, dtype=torch.float64)
    rows = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            for r in range(h.shape[0]):
                if b["row_weight"][r] == 0:
                    continue
                real = b["attention_mask"][r].bool()
                expected[b["source_ids"][r]] += h[r][real].double().mean(0)
                rows[b["source_ids"][r]] += 1
    assert stats.counts == [] and torch.equal(stats.embedding_rows, rows)
    assert torch.allclose(stats.embedding_sum, expected, atol=1e-5)
    new, delta = dm.compute_update([], None, mean_embeddings(stats.embedding_sum, stats.embedding_rows))
    assert delta.tolist() == pytest.approx(
        embedding_redundancy_scores(expected / rows[:, None]).tolist(), abs=1e-6
    )
    assert float(new.sum()) == pytest.approx(1.0)


def test_sequential_datamodule_schedule_and_state_round_trip():
    dm = _dm(strategy="sequential")  # no trainer: the budget is one epoch = 144 rows / 4 = 36 batches
    assert dm.sequential_budget() == 36
    assert [(h["from_batch"], max(h["weights"], key=h["weights"].get)) for h in dm.history] == [
        (0, "arithmetic"),
        (12, "arithmetic_alt"),
        (24, "strings"),
    ]
    sampler = dm.sampler()
    assert {s for b in range(12) for s in sampler.sources_of(sampler.batch_indices(b))} == {0}
    assert {s for b in range(24, 40) for s in sampler.sources_of(sampler.batch_indices(b))} == {2}
    assert dm.named_weights() == {"arithmetic": 1.0, "arithmetic_alt": 0.0, "strings": 0.0}
    dm.started_batches = 13
    assert dm.named_weights()["arithmetic_alt"] == 1.0  # the stage in force, not the last planned
    state = dm.state_dict()
    other = _dm(strategy="sequential", samples_per_epoch=8)  # a different budget...
    other.load_state_dict(state)  # ...but the checkpoint's plan wins
    assert other.schedule.state_dict() == dm.schedule.state_dict() and other.started_batches == 13
    assert other.sampler().batch_indices(20) == sampler.batch_indices(20)


def test_random_datamodule_weights_follow_the_data_seed():
    dm = _dm(strategy="random")
    assert dm.weights.tolist() == random_weights(3, 0).tolist()
    again = _dm(strategy="random")
    assert again.weights.tolist() == dm.weights.tolist()


# ------------------------------------------------------------------------------------------------
# Short real fits through the CLI.

SOURCES = [  # `a` and `b` are the same data under two names: maximally redundant
    {"name": "a", "builtin": "arithmetic", "builtin_train_size": 32, "builtin_eval_size": 8},
    {"name": "b", "builtin": "arithmetic", "builtin_train_size": 32, "builtin_eval_size": 8},
    {"name": "strings", "builtin": "strings", "builtin_train_size": 32, "builtin_eval_size": 8},
]


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A moe-app checkpoint: 2-layer LLaMA (hidden 32) upcycled to 4 experts top-2, suite tokenizer."""
    from transformers import AutoModelForCausalLM

    from conftest import suite_llama_config
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.core.data.tokenizer import suite_tokenizer
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig

    tok = suite_tokenizer()
    torch.manual_seed(0)
    model = upcycle(
        AutoModelForCausalLM.from_config(suite_llama_config(tie_word_embeddings=True)),
        UpcycleConfig(method="copy", num_experts=4, top_k=2, router_std=0.5),
    )
    return save_moe_checkpoint(model, tmp_path_factory.mktemp("mixb") / "tiny-moe", tokenizer=tok)


def _fit(
    tmp_path: Path, model_dir: Path, *, max_steps: int, ckpt_path: Path | None = None, **mixture
) -> Path:
    from moe_app.cli.main import cli_main

    root = tmp_path / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
        },
        "model": {
            "class_path": "moe_app.lightning.modules.moe.MoeLMModule",
            "init_args": {
                "source": {"pretrained": str(model_dir)},
                "upcycle": None,
                "log_load_every_n_steps": 0,
                "optim": {"lr": 3.0e-3, "warmup_steps": 0, "schedule": "constant"},
            },
        },
        "data": {
            "class_path": "moe_app.lightning.data.mixture.MixtureDataModule",
            "init_args": {
                "sources": SOURCES,
                "max_length": 48,
                "batch_size": 4,
                "mixture": {"probe_size": 8, "plot": False, "dump_rank_files": True, **mixture},
            },
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{mixture['strategy']}-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if ckpt_path is None:
        cli_main(["fit", "-c", str(path)])
    else:  # as tests/test_mixture_training.py: resume through the same objects
        cli = cli_main(["-c", str(path)], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt_path))
    return root


def _dump(root: Path) -> dict:
    return json.loads((root / "mixture_rank0.json").read_text())


def _draw_sources(dump: dict, size: int = 32) -> dict[int, set[int]]:
    return {int(b): {i // size for i in idx} for b, idx in dump["draws"].items()}


def test_fit_sequential_draws_the_sources_one_after_another(tiny_moe_dir, tmp_path):
    root = _fit(tmp_path, tiny_moe_dir, max_steps=6, strategy="sequential")
    # budget 6 batches, equal sizes: stages [0, 2), [2, 4), [4, 6)
    assert _draw_sources(_dump(root)) == {0: {0}, 1: {0}, 2: {1}, 3: {1}, 4: {2}, 5: {2}}
    payload = json.loads((root / "mixture_weights.json").read_text())
    assert [(h["step"], h["from_batch"]) for h in payload["history"]] == [(0, 0), (2, 2), (4, 4)]
    assert payload["final"] == {"a": 0.0, "b": 0.0, "strings": 1.0}
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["MixtureDataModule"]
    assert state["started_batches"] == 6 and [s for s, _ in state["schedule"]] == [0, 2, 4]


@pytest.mark.slow
def test_fit_sequential_resume_keeps_the_checkpoint_plan(tiny_moe_dir, tmp_path):
    part = _fit(tmp_path / "p", tiny_moe_dir, max_steps=3, strategy="sequential")  # stages 0 | 1 | 2
    resumed = _fit(
        tmp_path / "p",
        tiny_moe_dir,
        max_steps=5,
        strategy="sequential",
        ckpt_path=part / "checkpoints" / "last.ckpt",
    )
    dump = _dump(resumed)
    assert dump["started_batches"] == 5
    assert _draw_sources(dump) == {3: {2}, 4: {2}}  # the 3-step plan's last source continues


def test_fit_static_gate_load_weights_are_the_one_shot_redundancy_weights(tiny_moe_dir, tmp_path):
    from moe_app import load_model

    root = _fit(tmp_path, tiny_moe_dir, max_steps=4, strategy="static_gate_load", update_every=2, eta=10.0)
    payload = json.loads((root / "mixture_weights.json").read_text())
    assert len(payload["history"]) == 1  # measured once, never updated (update_every is ignored)
    (entry,) = payload["history"]
    assert (
        entry["step"] == 0
        and entry["from_batch"] == 0
        and entry["start"] == {n: 1 / 3 for n in "ab"} | {"strings": 1 / 3}
    )
    assert payload["final"] == entry["weights"]
    w = entry["weights"]
    assert w["a"] == w["b"] < 1 / 3 < w["strings"]  # the duplicated pair is redundant
    # The same computation, once, on the model before training.
    dm = MixtureDataModule(
        sources=[SourceConfig(**s) for s in SOURCES],
        tokenizer=str(tiny_moe_dir),
        max_length=48,
        batch_size=4,
        mixture=MixtureConfig(strategy="static_gate_load", probe_size=8),
    )
    dm.setup("fit")
    model = load_model(tiny_moe_dir)
    stats = probe_model(model, dm.probe_batches(), 3, layer=-1, need_loss=False)
    expected, delta = gate_load_weights([1 / 3] * 3, torch.stack(stats.counts), 10.0, 0.05)
    assert list(w.values()) == pytest.approx(expected.tolist(), abs=1e-12)
    assert list(entry["delta"].values()) == pytest.approx(delta.tolist(), abs=1e-12)
    # Every batch, the first included, was drawn with those weights.
    dump = _dump(root)
    sampler = MixtureSampler([32, 32, 32], 4, WeightSchedule(dump["weights"]), seed=0)
    assert dump["draws"] == {str(b): sampler.batch_indices(b) for b in range(4)}


def test_fit_random_weights_are_seeded_and_fixed(tiny_moe_dir, tmp_path):
    root = _fit(tmp_path, tiny_moe_dir, max_steps=3, strategy="random")
    dump = _dump(root)
    assert dump["weights"] == random_weights(3, 0).tolist()  # data.seed 0, reproducible anywhere
    assert [h["step"] for h in dump["history"]] == [0]
    sampler = MixtureSampler([32, 32, 32], 4, WeightSchedule(random_weights(3, 0)), seed=0)
    assert dump["draws"] == {str(b): sampler.batch_indices(b) for b in range(3)}


def test_fit_sentence_embedding_updates_like_dynamic(tiny_moe_dir, tmp_path):
    root = _fit(tmp_path, tiny_moe_dir, max_steps=5, strategy="sentence_embedding", update_every=2)
    payload = json.loads((root / "mixture_weights.json").read_text())
    hist = payload["history"]
    assert [h["step"] for h in hist] == [0, 2, 4]
    assert payload["eta"] == 10.0 and payload["c"] == 0.05 and payload["layer"] is None
    for prev, cur in itertools.pairwise(hist):
        d = cur["delta"]
        assert d["a"] == d["b"] < d["strings"]  # identical data, identical embeddings
        expected = update_weights(list(prev["weights"].values()), list(d.values()), 10.0, 0.05)
        assert list(cur["weights"].values()) == pytest.approx(expected.tolist(), abs=1e-12)
    assert hist[-1]["weights"]["strings"] > 1 / 3 > hist[-1]["weights"]["a"]
