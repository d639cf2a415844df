"""The lm-eval harness (``moe-app[eval]``) on a dense model, its exact copy-upcycle exported as stock
Mixtral, and the moe-app checkpoint itself (via ``moe_app.load_model`` wrapped in ``HFLM``).

Everything is local: a tiny LLaMA saved with the suite tokenizer, a multiple-choice task whose YAML
and JSONL data the test writes, and the harness forced offline (no hub, no dataset downloads).
Copy-upcycling with the renormalised top-k rule reproduces the dense model exactly, so the harness
must score all three identically: same accuracy, same per-choice loglikelihoods.
"""

from __future__ import annotations

import json
import math
import random
import socket
from pathlib import Path

import pytest
import torch

from conftest import suite_llama_config

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'moe-app[eval]'")

TASK = "moe_app_tiny_sums"
N_DOCS = 32
LL_TOL = 1e-4
BATCH = 32


def _write_task(root: Path, n: int = N_DOCS) -> Path:
    """A 4-way multiple-choice task over the suite's arithmetic test prompts (YAML + JSONL in ``root``)."""
    from moe_app.core.data.synthetic import generate_domain

    rng = random.Random(0)
    rows = []
    for ex in generate_domain("arithmetic", "test", n, seed=0):
        answer = int(ex.reference)
        wrong = rng.sample([d for d in range(-12, 13) if d], 3)
        choices = [str(answer), *(str(answer + d) for d in wrong)]
        rng.shuffle(choices)
        rows.append(
            {"question": ex.messages[0].content, "choices": choices, "label": choices.index(str(answer))}
        )
    data = root / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{TASK}.yaml").write_text(
        "\n".join(
            [
                f"task: {TASK}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(data))}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "Question: {{question}}\\nAnswer:"',
                "doc_to_choice: choices",
                "doc_to_target: label",
                'target_delimiter: " "',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "metadata:",
                "  version: 1.0",
                "",
            ]
        )
    )
    return root


def _evaluate(model, task_dir: Path, **kw) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=BATCH,
        device="cpu",
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kw,
    )


def _hf(path: Path) -> dict:
    return {"model": "hf", "model_args": f"pretrained={path},dtype=float32"}


def _acc(res: dict) -> float:
    return res["results"][TASK]["acc,none"]


def _loglikelihoods(res: dict) -> dict[int, list[float]]:
    """doc_id -> the loglikelihood of each choice, from the logged samples."""
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in res["samples"][TASK]}


def _max_diff(a: dict[int, list[float]], b: dict[int, list[float]]) -> float:
    assert a.keys() == b.keys()
    return max(abs(x - y) for d in a for x, y in zip(a[d], b[d], strict=True))


@pytest.fixture
def offline(monkeypatch):
    """Hub and datasets offline, and any attempt to open a network connection fails loudly."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    def refuse(sock, address, *args):
        raise OSError(f"test_lm_eval is offline: connection to {address!r} refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_lm_eval_scores_export_and_checkpoint_like_dense(offline, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moe_app
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.cli.main import main
    from moe_app.core.data.tokenizer import suite_tokenizer
    from moe_app.core.upcycling import UpcycleConfig, upcycle

    dense_dir, ckpt, hf_dir = tmp_path / "dense", tmp_path / "ckpt", tmp_path / "mixtral"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(suite_llama_config()).save_pretrained(dense_dir)
    suite_tokenizer().save_pretrained(dense_dir)

    moe = upcycle(
        AutoModelForCausalLM.from_pretrained(dense_dir).eval(),
        UpcycleConfig(method="copy", num_experts=8, top_k=2, rule="softmax_topk_renorm", seed=3),
    )
    save_moe_checkpoint(moe, ckpt, tokenizer_dir=dense_dir)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(hf_dir), "--format", "mixtral"]) == 0
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2

    task_dir = _write_task(tmp_path)
    dense = _evaluate(**_hf(dense_dir), task_dir=task_dir)
    export = _evaluate(**_hf(hf_dir), task_dir=task_dir)
    native = _evaluate(
        HFLM(
            pretrained=moe_app.load_model(ckpt, dtype=torch.float32),
            tokenizer=AutoTokenizer.from_pretrained(ckpt),
            batch_size=BATCH,
            device="cpu",
        ),
        task_dir,
    )

    for res in (dense, export, native):
        assert not math.isnan(_acc(res)) and 0.0 <= _acc(res) <= 1.0
        assert res["n-samples"][TASK] == {"original": N_DOCS, "effective": N_DOCS}
        assert len(res["samples"][TASK]) == N_DOCS
    assert _acc(export) == _acc(dense) and _acc(native) == _acc(dense)
    ll = _loglikelihoods(dense)
    assert all(len(v) == 4 for v in ll.values())
    assert _max_diff(_loglikelihoods(export), ll) < LL_TOL
    assert _max_diff(_loglikelihoods(native), ll) < LL_TOL
