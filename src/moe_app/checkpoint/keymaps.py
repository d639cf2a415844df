"""On-disk key layouts of the standard HF MoE formats, written as data.

These are the *legacy, per-expert* names that stock checkpoints (mistralai/Mixtral-8x7B,
Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen3-30B-A3B) use and that ``transformers`` (5.x) converts into its
fused ``experts.gate_up_proj`` / ``experts.down_proj`` parameters on load (and writes back on
``save_pretrained``); vLLM and older transformers read the same names. Verified by saving tiny stock
models with transformers 5.23 (see tests/test_export_formats.py).

Placeholders: ``{i}`` decoder layer, ``{j}`` expert. Keys outside the MLP (embeddings, attention,
norms, lm_head) are identical to the dense LLaMA/Mistral/Qwen2/Qwen3 names and pass through.
"""

from __future__ import annotations

# moe-app's own key names (SparseMoeBlock under the decoder layer's `mlp`).
MOE_APP = {
    "router": "model.layers.{i}.mlp.router.weight",
    "router_noise": "model.layers.{i}.mlp.router.noise_weight",
    "gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",  # (E, 2F, d)
    "down": "model.layers.{i}.mlp.experts.down_proj",  # (E, d, F)
    "shared_gate_proj": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "shared_up_proj": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "shared_down_proj": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": "model.layers.{i}.mlp.shared_gate.weight",
    "dense_gate_proj": "model.layers.{i}.mlp.gate_proj.weight",
    "dense_up_proj": "model.layers.{i}.mlp.up_proj.weight",
    "dense_down_proj": "model.layers.{i}.mlp.down_proj.weight",
}

MIXTRAL = {
    "router": "model.layers.{i}.block_sparse_moe.gate.weight",  # (E, d)
    "expert_gate_proj": "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",  # (F, d)
    "expert_down_proj": "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",  # (d, F)
    "expert_up_proj": "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",  # (F, d)
}

QWEN_MOE = {
    "router": "model.layers.{i}.mlp.gate.weight",  # (E, d)
    "expert_gate_proj": "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",  # (F, d)
    "expert_up_proj": "model.layers.{i}.mlp.experts.{j}.up_proj.weight",  # (F, d)
    "expert_down_proj": "model.layers.{i}.mlp.experts.{j}.down_proj.weight",  # (d, F)
    # Qwen2-MoE only:
    "shared_gate_proj": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",  # (Fs, d)
    "shared_up_proj": "model.layers.{i}.mlp.shared_expert.up_proj.weight",  # (Fs, d)
    "shared_down_proj": "model.layers.{i}.mlp.shared_expert.down_proj.weight",  # (d, Fs)
    "shared_expert_gate": "model.layers.{i}.mlp.shared_expert_gate.weight",  # (1, d)
    # dense layers listed in `mlp_only_layers`:
    "dense_gate_proj": "model.layers.{i}.mlp.gate_proj.weight",
    "dense_up_proj": "model.layers.{i}.mlp.up_proj.weight",
    "dense_down_proj": "model.layers.{i}.mlp.down_proj.weight",
}

FORMAT_KEYMAPS = {"mixtral": MIXTRAL, "qwen2_moe": QWEN_MOE, "qwen3_moe": QWEN_MOE}
FORMAT_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
