"""HC-SMoE expert merging (arXiv 2410.08589): clustering, frequency weighting, exactness, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.cli.main import main
from moe_app.core.models.views import clone_model
from moe_app.core.pruning import (
    CalibrationConfig,
    ExpertPruneConfig,
    MergeConfig,
    agglomerative_clusters,
    merge_clusters,
    moe_layer_views,
    prune_experts,
    saliency_scores,
)
from moe_app.core.pruning.calibration import capture_block_io, normalize_batches
from moe_app.core.pruning.merge import expert_statistics, merge_weights, pairwise_distances, representative
from moe_app.core.spec import SPEC_FILE
from moe_app.core.upcycling import UpcycleConfig
from upcycling_helpers import build, logits, tokens, upcycled


def _moe(num_experts=6, top_k=2, dtype=torch.float64, method="noise", seed=0):
    dense = build(tiny_llama_config(), seed=seed).to(dtype)
    cfg = UpcycleConfig(method=method, num_experts=num_experts, top_k=top_k, noise_std=0.5, seed=seed)
    return dense, upcycled(dense, cfg)


def _batches(n=2, seq=16):
    return normalize_batches([tokens(seq=seq, seed=s) for s in range(n)])


# ------------------------------------------------------------------------------------ clustering
def test_clustering_recovers_well_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    labels = [2, 0, 1, 0, 2, 1, 1, 0, 2, 2]
    points = centres[labels] + 0.1 * torch.randn(len(labels), 3, generator=g)
    clusters = agglomerative_clusters(points, 3)
    expected = sorted(
        (sorted(i for i, lab in enumerate(labels) if lab == c) for c in range(3)), key=lambda m: m[0]
    )
    assert clusters == expected
    assert agglomerative_clusters(points, len(labels)) == [[i] for i in range(len(labels))]
    assert agglomerative_clusters(points, 1) == [list(range(len(labels)))]


def test_average_linkage_on_a_line():
    # 0, 1, 3, 7: {0,1} (d=1); then d({0,1},3)=2.5 < d(3,7)=4 -> {0,1,3}; average, not single linkage
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert agglomerative_clusters(pts, 3) == [[0, 1], [2], [3]]
    assert agglomerative_clusters(pts, 2) == [[0, 1, 2], [3]]
    # 0, 2, 3, 5.4: single linkage would join 5.4 to {2,3} (2.4 < 2); average: d({0},{2,3}) = 2.5,
    # d({2,3},{5.4}) = 2.9 -> {0,2,3}
    pts = torch.tensor([[0.0], [2.0], [3.0], [5.4]])
    assert agglomerative_clusters(pts, 2) == [[0, 1, 2], [3]]


def test_clustering_matches_scipy_average_linkage():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    g = torch.Generator().manual_seed(3)
    for n, r in ((8, 4), (16, 5), (64, 16)):
        pts = torch.randn(n, 12, generator=g, dtype=torch.float64)
        for metric in ("euclidean", "cosine"):
            z = hierarchy.linkage(pts.numpy(), method="average", metric=metric)
            lab = hierarchy.fcluster(z, r, criterion="maxclust")
            ref = sorted(
                (sorted(int(i) for i in range(n) if lab[i] == c) for c in set(lab.tolist())),
                key=lambda m: m[0],
            )
            assert agglomerative_clusters(pts, r, metric) == ref, (n, r, metric)


def test_cosine_ignores_norms_euclidean_does_not():
    pts = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    assert agglomerative_clusters(pts, 2, "cosine") == [[0, 1], [2, 3]]
    # euclidean: the two unit vectors first (sqrt 2), then the tie at 4.55 goes to the lowest pair
    assert agglomerative_clusters(pts, 2, "euclidean") == [[0, 1, 2], [3]]
    d = pairwise_distances(pts, "cosine")
    assert float(d[0, 1]) == pytest.approx(0.0, abs=1e-12) and float(d[0, 2]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ statistics and weights
def test_expert_statistics_average_every_expert_over_every_token():
    _, model = _moe()
    batches = _batches()
    views = moe_layer_views(model)
    io = capture_block_io(model, {lay: v.module for lay, v in views}, batches)
    _, view = views[0]
    xs = io[0][0]
    means, counts = expert_statistics(view, xs, chunk_tokens=7)
    x = torch.cat(xs)
    with torch.no_grad():
        assert_close(means, view.expert_outputs(x).double().mean(1), rtol=1e-10, atol=1e-12)
    tokens_ = x.shape[0]
    assert_close(counts / tokens_, saliency_scores(view, xs, "frequency"))
    assert float(counts.sum()) == tokens_ * view.top_k


def test_frequency_weighting_by_hand():
    _, model = _moe(num_experts=4)
    _, view = moe_layer_views(model)[0]
    ex, router = view.module.experts, view.module.router
    gu, dn, rw = (
        ex.gate_up_proj.detach().clone(),
        ex.down_proj.detach().clone(),
        router.weight.detach().clone(),
    )
    counts = torch.tensor([1.0, 3.0, 0.0, 0.0])
    assert merge_weights(counts, [0, 1]).tolist() == [0.25, 0.75]
    assert merge_weights(counts, [2, 3]).tolist() == [0.5, 0.5]  # never selected: uniform
    assert representative(counts, [0, 1]) == 1 and representative(counts, [2, 3]) == 2
    kept = merge_clusters(view, [[0, 1], [2, 3]], counts, router="average")
    assert kept == [1, 2] and view.num_experts == 2 and ex.gate_up_proj.shape[0] == 2
    assert_close(ex.gate_up_proj[0], 0.25 * gu[0] + 0.75 * gu[1], rtol=0, atol=1e-15)
    assert_close(ex.down_proj[0], 0.25 * dn[0] + 0.75 * dn[1], rtol=0, atol=1e-15)
    assert_close(ex.gate_up_proj[1], 0.5 * gu[2] + 0.5 * gu[3], rtol=0, atol=1e-15)
    assert_close(router.weight[0], 0.25 * rw[0] + 0.75 * rw[1], rtol=0, atol=1e-15)
    assert_close(router.weight[1], 0.5 * rw[2] + 0.5 * rw[3], rtol=0, atol=1e-15)
    assert router.num_experts == 2 and router.top_k == 2


def test_dominant_router_and_singletons_are_kept_exactly():
    _, model = _moe(num_experts=4)
    _, view = moe_layer_views(model)[0]
    ex, router = view.module.experts, view.module.router
    gu, rw = ex.gate_up_proj.detach().clone(), router.weight.detach().clone()
    counts = torch.tensor([5.0, 1.0, 2.0, 0.0])
    kept = merge_clusters(view, [[0, 3], [1], [2]], counts, router="dominant")
    assert kept == [0, 1, 2]
    assert torch.equal(ex.gate_up_proj[0], 1.0 * gu[0] + 0.0 * gu[3])
    assert torch.equal(ex.gate_up_proj[1], gu[1]) and torch.equal(ex.gate_up_proj[2], gu[2])
    assert torch.equal(router.weight, rw[:3])


def test_merging_below_top_k_lowers_top_k():
    _, model = _moe(num_experts=4, top_k=2)
    _, view = moe_layer_views(model)[0]
    merge_clusters(view, [[0, 1, 2, 3]], torch.ones(4))
    assert view.num_experts == 1 and view.top_k == 1


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("r", (2, 1))
def test_merging_identical_experts_gives_the_dense_model(r):
    dense, moe = _moe(num_experts=4, top_k=2, dtype=torch.float32, method="copy")
    ids = tokens()
    before = logits(moe, ids)
    assert_close(before, logits(dense, ids), rtol=1e-5, atol=1e-5)
    w0 = moe_layer_views(moe)[0][1].module.experts.gate_up_proj[0].detach().clone()
    report = prune_experts(moe, _batches(), ExpertPruneConfig(keep=r, method="merge"))
    for _, view in moe_layer_views(moe):
        assert view.num_experts == r and view.top_k == min(2, r)
    # frequency-weighted average of identical weights, summed in float64: exactly the same weights
    assert torch.equal(moe_layer_views(moe)[0][1].module.experts.gate_up_proj[0], w0)
    after = logits(moe, ids)
    assert_close(after, before, rtol=1e-6, atol=1e-6)  # renormalised routing over equal experts
    assert_close(after, logits(dense, ids), rtol=1e-5, atol=1e-5)
    assert all(layer.loss < 1e-4 for layer in report.layers)
    assert sorted(e for c in report.layers[0].clusters for e in c) == [0, 1, 2, 3]


def test_prune_experts_merge_report_and_spec():
    _, model = _moe(num_experts=6, top_k=2)
    report = prune_experts(model, _batches(), ExpertPruneConfig(keep=3, method="merge"))
    d = report.to_dict()
    assert d["method"] == "merge" and set(d["clusters"]) == {"0", "1"}
    for lay in ("0", "1"):
        clusters = d["clusters"][lay]
        assert len(clusters) == 3 and sorted(e for c in clusters for e in c) == list(range(6))
        assert all(k in c for k, c in zip(d["kept"][lay], clusters))
        assert math.isfinite(d["reconstruction_loss"][lay])
    entry = moe_app.core.spec.spec_of(model).pruning["experts"][-1]
    assert entry["merge"] == {"distance": "euclidean", "router": "average", "chunk_tokens": 2048}


@pytest.mark.parametrize("kind", ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"))
def test_stock_hf_merge_in_memory(kind):
    from test_pruning_enumerate import _hf_moe

    model = _hf_moe(kind)
    ids = tokens()
    report = prune_experts(model, _batches(), ExpertPruneConfig(keep=1, method="merge"))
    cfg = model.config
    assert getattr(cfg, "num_local_experts", getattr(cfg, "num_experts", None)) == 1
    assert cfg.num_experts_per_tok == 1
    assert all(v.num_experts == 1 and v.top_k == 1 for _, v in moe_layer_views(model))
    assert torch.isfinite(logits(model, ids)).all() and math.isfinite(report.total_loss)


# ------------------------------------------------------------------------------------ checkpoints via the CLI
@pytest.fixture(scope="module")
def tok():
    from moe_app.core.data.tokenizer import suite_tokenizer

    return suite_tokenizer()


def _cli(src: Path, out: Path, keep: int, *extra: str) -> int:
    args = ["prune", "--ckpt", str(src), "--out", str(out), "--keep", str(keep), "--method", "merge"]
    args += ["--data", "builtin:arithmetic", "--calib_samples", "8", "--max_length", "32", "--no_eval"]
    return main([*args, *extra])


def test_moe_app_checkpoint_merged_via_cli_reloads(tmp_path, tok):
    dense = build(tiny_llama_config(vocab_size=len(tok)))
    moe = upcycled(dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5))
    src = save_moe_checkpoint(moe, tmp_path / "src", tokenizer=tok)
    out = tmp_path / "merged"
    assert _cli(src, out, 2, "--merge_router", "dominant") == 0
    loaded = moe_app.load_model(out)
    assert all(v.num_experts == 2 and v.top_k == 2 for _, v in moe_layer_views(loaded))
    spec = json.loads((out / SPEC_FILE).read_text())
    assert [lay["mlp"]["num_experts"] for lay in spec["layers"]] == [2, 2]
    entry = spec["pruning"]["experts"][-1]
    assert entry["method"] == "merge" and entry["merge"]["router"] == "dominant"
    assert len(entry["clusters"]["0"]) == 2
    ids = torch.tensor([tok("12+35=47").input_ids])
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_stock_mixtral_merged_via_cli_reloads_in_transformers(tmp_path, tok):
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, num_experts_per_tok=2, num_local_experts=6,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "merged"
    assert _cli(src, out, 2) == 0
    assert not (out / SPEC_FILE).exists()
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.num_local_experts == 2 and stock.config.num_experts_per_tok == 2
    assert all(v.num_experts == 2 for _, v in moe_layer_views(stock))
    # the same merge in memory gives the same logits as the reloaded checkpoint
    mem = moe_app.load_model(src)
    from moe_app.core.pruning import calibration_batches

    calib = CalibrationConfig(data="builtin:arithmetic", num_samples=8, max_length=32, batch_size=8)
    prune_experts(mem, calibration_batches(tok, calib), ExpertPruneConfig(keep=2, method="merge"))
    ids = torch.tensor([tok("12+35=47 and 8*3=24").input_ids])
    with torch.no_grad():
        assert_close(stock(input_ids=ids).logits, mem(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ comparison
def test_reconstruction_loss_comparison_at_the_same_r(capsys):
    _, base = _moe(num_experts=8, top_k=2, seed=1)
    batches = _batches(n=4, seq=32)
    runs = {
        "enumerate": ExpertPruneConfig(keep=4, method="enumerate"),
        "frequency": ExpertPruneConfig(keep=4, method="frequency"),
        "reap": ExpertPruneConfig(keep=4, method="reap"),
        "expert_drop": ExpertPruneConfig(keep=4, method="expert_drop"),
        "merge (euclidean, average router)": ExpertPruneConfig(keep=4, method="merge"),
        "merge (euclidean, dominant router)": ExpertPruneConfig(
            keep=4, method="merge", merge=MergeConfig(router="dominant")
        ),
        "merge (cosine, average router)": ExpertPruneConfig(
            keep=4, method="merge", merge=MergeConfig(distance="cosine")
        ),
    }
    losses = {}
    for name, cfg in runs.items():
        model = clone_model(base)
        losses[name] = prune_experts(model, batches, cfg).total_loss
    with capsys.disabled():
        print("\nreconstruction loss sum_l sum_b ||Z - Z'||_F, E=8 -> r=4, top-2, 2 layers:")
        for name, loss in losses.items():
            print(f"  {name:40s} {loss:.6f}")
    assert all(math.isfinite(v) and v >= 0 for v in losses.values())
    assert losses["enumerate"] <= min(losses["frequency"], losses["reap"], losses["expert_drop"]) + 1e-9


def _pesc(variant: str):
    from moe_app.core.pesc.config import PescConfig
    from moe_app.core.pesc.surgery import build_pesc

    model = build_pesc(
        build(tiny_llama_config()).double(), PescConfig(variant=variant, num_experts=4, top_k=2)
    ).eval()
    with torch.no_grad():  # adapters / LoRA B start at zero (dense function): give the experts content
        for p in model.parameters():
            if p.requires_grad and p.dim() >= 2 and float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.05)
    return model


def test_pesc_adapters_merge_and_lora_experts_are_refused():
    from moe_app.errors import UnsupportedModelError

    model = _pesc("adapter")
    report = prune_experts(model, _batches(), ExpertPruneConfig(keep=2, method="merge"))
    assert all(v.num_experts == 2 and v.kind == "pesc" for _, v in moe_layer_views(model))
    assert math.isfinite(report.total_loss) and torch.isfinite(logits(model, tokens())).all()
    lora = _pesc("lora")
    with pytest.raises(UnsupportedModelError, match="LoRA"):
        prune_experts(lora, _batches(), ExpertPruneConfig(keep=2, method="merge"))
    assert all(v.num_experts == 4 for _, v in moe_layer_views(lora))  # refused before any change
