"""Expert slimming and trimming combined: loss, non-zero parameters and bytes on disk per recipe.

Claim measured: He et al. 2024 (arXiv 2406.02500) compress MoEs by combining *expert trimming*
(``--keep``, ``--layer_drop``, ``--block_drop``) with *expert slimming* (Wanda / SparseGPT / 2:4 inside
every expert, 4-bit experts). This script runs each recipe through the real ``moe-app prune`` job
(:func:`moe_app.checkpoint.pruning.prune_checkpoint`) on one source checkpoint and reports, as
ratios to the unpruned source measured in the same run:

* ``loss``: next-token cross-entropy on built-in suite text drawn with another seed than the
  calibration text, the output loaded back by stock transformers (quantised ones included);
* ``nonzero``: non-zero parameters (a quantised linear counts its logical weight size);
* ``disk``: bytes of the safetensors files written (unstructured zeros do *not* shrink a dense
  checkpoint; only quantisation and trimming do).

Source: a tiny stock Qwen2-MoE (the stock family whose experts include nn.Linear modules -- its
shared expert -- so the nf4 rows exist; transformers 5.24 cannot quantise fused routed experts,
see :mod:`moe_app.checkpoint.quantized`), sized for the built-in suite tokenizer and briefly trained
on the suite's text so that the losses mean something. Everything is deterministic (fixed seeds, no
timing), so one run is the measurement; absolute losses depend on the short training.

    python benchmarks/slimming.py               # 4 layers, d=64, E=8 (k=2), 150 training steps
    python benchmarks/slimming.py --quick       # smoke configuration
    python benchmarks/slimming.py --json out.json
    python benchmarks/slimming.py --source runs/real/post2/model --keep 6 --max_length 128
        # a trained real MoE (moe-app or stock dir with its tokenizer), e.g. make demo-real's
        # SmolLM2 8x top-2; recipes the checkpoint cannot take (nf4 on fused experts) are
        # listed with the reason moe-app refused them; each output is deleted once measured
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from _common import cpu_model, peak_rss_mb
from moe_app.checkpoint.pruning import PruneJob, prune_checkpoint
from moe_app.core.pruning.calibration import CalibrationConfig, calibration_batches, eval_loss
from moe_app.core.pruning.experts import ExpertPruneConfig
from moe_app.core.pruning.slim import SlimConfig


def build_source(args: argparse.Namespace, out: Path, tok) -> Path:
    """A tiny Qwen2-MoE trained for ``args.steps`` AdamW steps on built-in suite text, saved to ``out``."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    cfg = Qwen2MoeConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.hidden,
        shared_expert_intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    train = calibration_batches(
        tok,
        CalibrationConfig(
            data="builtin", num_samples=args.train_samples, max_length=64, batch_size=16, seed=7
        ),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(args.steps):
        b = train[step % len(train)]
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def nonzero_params(model: torch.nn.Module) -> int:
    """Non-zero parameters; a bitsandbytes weight counts its logical size (its packed bytes are not weights)."""
    total = 0
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                total += int(torch.Size(qs.shape).numel())
            elif type(mod).__name__ == "Linear8bitLt" and name == "weight":
                total += p.numel()
            else:
                total += int((p != 0).sum())
    return total


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(path: Path, held_out) -> dict[str, float]:
    """Loss, non-zero parameters and bytes on disk of one output, loaded as users load it
    (``moe_app.load_model``: stock transformers for stock dirs, quantised ones included)."""
    from moe_app import load_model

    model = load_model(path).eval()
    out = {"loss": eval_loss(model, held_out), "nonzero": nonzero_params(model), "disk": disk_bytes(path)}
    del model
    return out


def recipes(keep: int) -> dict[str, PruneJob | None]:
    def slim(method: str, s: float | None = 0.5) -> SlimConfig:
        return SlimConfig(method=method, sparsity=None if method == "2:4" else s)

    def keep_r() -> ExpertPruneConfig:
        return ExpertPruneConfig(keep=keep, method="enumerate")

    return {
        "none": None,
        "wanda 0.5": PruneJob(slim=slim("wanda")),
        "sparsegpt 0.5": PruneJob(slim=slim("sparsegpt")),
        "2:4": PruneJob(slim=slim("2:4")),
        "nf4": PruneJob(quantize="nf4"),
        f"keep {keep}": PruneJob(experts=keep_r()),
        f"keep {keep} + wanda 0.5": PruneJob(experts=keep_r(), slim=slim("wanda")),
        f"keep {keep} + sparsegpt 0.5": PruneJob(experts=keep_r(), slim=slim("sparsegpt")),
        f"keep {keep} + layer drop 1": PruneJob(experts=keep_r(), layer_drop=1),
        f"keep {keep} + layer drop 1 + nf4": PruneJob(experts=keep_r(), layer_drop=1, quantize="nf4"),
        f"keep {keep} + wanda 0.5 + nf4": PruneJob(experts=keep_r(), slim=slim("wanda"), quantize="nf4"),
        "block drop 1": PruneJob(block_drop=1),
        "block drop 1 + nf4": PruneJob(block_drop=1, quantize="nf4"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--keep", type=int, default=4)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--train_samples", type=int, default=512)
    p.add_argument("--calib_samples", type=int, default=32)
    p.add_argument("--source", type=str, default=None, help="a trained MoE dir with its tokenizer")
    p.add_argument("--max_length", type=int, default=64, help="tokens per calibration / eval sequence")
    p.add_argument(
        "--recipes",
        nargs="+",
        default=None,
        help="only these recipes (names as printed, e.g. 'wanda 0.5' '2:4' 'keep 6'); 'none' is always measured",
    )
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()
    if args.quick:
        args.layers, args.steps, args.train_samples, args.calib_samples = 2, 30, 64, 16
    logging.disable(logging.WARNING)
    from moe_app.errors import MoeAppError

    if args.source:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.source)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    else:
        from moe_app.core.data.tokenizer import suite_tokenizer

        tok = suite_tokenizer()
    calib = CalibrationConfig(
        data="builtin", num_samples=args.calib_samples, max_length=args.max_length, batch_size=8, seed=0
    )
    # evaluation text: another seed's draw from the same pool (it may share a few examples with calibration)
    held_out = calibration_batches(
        tok,
        CalibrationConfig(
            data="builtin", num_samples=args.calib_samples, max_length=args.max_length, batch_size=8, seed=123
        ),
    )
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(
        prefix="moe-slim-bench-", dir=Path(args.source).parent if args.source else None
    ) as tmp:
        src = Path(args.source) if args.source else build_source(args, Path(tmp) / "src", tok)
        for name, job in recipes(args.keep).items():
            if job is not None and args.recipes and name not in args.recipes:
                continue
            if job is None:
                rows[name] = measure(src, held_out)
                continue
            job.calibration = calib
            job.eval_before_after = False
            out = Path(tmp) / name.replace(" ", "_").replace(":", "-").replace("+", "")
            try:
                prune_checkpoint(src, out, job)
            except MoeAppError as exc:  # a recipe this checkpoint cannot take: say why
                rows[name] = {"refused": str(exc).splitlines()[0]}
                print(f"# refused: {name}: {rows[name]['refused']}", flush=True)
                continue
            rows[name] = measure(out, held_out)
            shutil.rmtree(out)  # a real model's outputs are GBs each: keep only the figures
            print(f"# done: {name}", flush=True)
    base = rows["none"]
    what = args.source or f"a tiny Qwen2-MoE ({args.layers} layers, d={args.hidden}, E={args.experts}, k=2)"
    print(f"# expert slimming x trimming on {what}")
    print(f"# machine: {cpu_model()}; peak RSS {peak_rss_mb():.0f} MB")
    print(
        f"{'recipe':34s} {'loss':>8s} {'x loss':>7s} {'nonzero':>11s} {'x nz':>6s} {'disk MB':>9s} {'x disk':>7s}"
    )
    for name, r in rows.items():
        if "refused" in r:
            print(f"{name:34s} refused: {r['refused']}")
            continue
        print(
            f"{name:34s} {r['loss']:8.4f} {r['loss'] / base['loss']:7.3f} {r['nonzero']:11d} "
            f"{r['nonzero'] / base['nonzero']:6.3f} {r['disk'] / 2**20:9.1f} {r['disk'] / base['disk']:7.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
