"""Weight names of a dense decoder layer in Hugging Face's Llama-family layout (Llama, Mistral, Qwen2, Qwen3) and in
an ``HSATransformer`` whose blocks are all ``Block``s (``attention: full`` or ``swa``), both ways.

HF layer ``i`` is the model's ``i``-th block in ``HSATransformer.blocks()`` order: ``lower.{i}`` for
``i < n_lower_layers``, else ``upper.{i - n_lower_layers}``.
"""
from __future__ import annotations

# HF name inside `model.layers.{i}.` → ours inside the block; weight and (where a family has them) bias.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.o_proj.bias": "attn.o_proj.bias",
    "self_attn.q_norm.weight": "attn.q_norm.weight",  # Qwen3: RMSNorm over each head, before RoPE
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn.w_gate.weight",
    "mlp.up_proj.weight": "ffn.w_up.weight",
    "mlp.down_proj.weight": "ffn.w_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def block_name(layer: int, n_lower_layers: int) -> str:
    """Our module path of HF decoder layer ``layer``."""
    return f"lower.{layer}" if layer < n_lower_layers else f"upper.{layer - n_lower_layers}"


def hf_to_ours(n_layers: int, n_lower_layers: int) -> dict[str, str]:
    """Every HF name a family may use → our state-dict name (names a given model lacks are simply absent there)."""
    names = dict(GLOBAL_NAMES)
    for i in range(n_layers):
        block = block_name(i, n_lower_layers)
        names.update({f"model.layers.{i}.{hf}": f"{block}.{ours}" for hf, ours in LAYER_NAMES.items()})
    return names


def ours_to_hf(n_layers: int, n_lower_layers: int) -> dict[str, str]:
    return {ours: hf for hf, ours in hf_to_ours(n_layers, n_lower_layers).items()}
