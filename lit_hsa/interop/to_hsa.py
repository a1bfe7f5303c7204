"""A dense model (every block a ``Block``: ``attention: full`` or ``swa``) → an HSA model that computes the same
function at conversion, ready for continued training (``configs/convert/hsa_from_dense.yaml``).

Layout: the dense model's L layers keep their order and their weights. The lower ``n_lower_layers`` become SWA
blocks; above them, ``n_groups`` groups of (one HSA block + ``swa_layers_per_group`` SWA blocks). Default:
the lower half, then 2 groups (1 where the upper half has fewer than 4 layers) — the presets' proportions (8B-A1B: 12
lower + 2 × (HSA + 5 SWA)).

Initialisation (after the HSA authors' OLMo-3 → HiLS conversion, ``utils/convert_basemodel_to_hils.py`` in
Tencent-Hunyuan/HiLS-Attention: HSA layers reuse the dense layer's projections, new retrieval parts start random):

- Each HSA block's SWA sub-layer *is* its dense layer: attention, norms and FFN copied.
- HSA attention: the queries (``q_proj``, ``q_norm``, ``hsa_norm``) are the dense layer's; the chunk memory's keys and
  values (``k_proj``, ``v_proj``, ``k_norm``, the memory's output norm) are the first HSA layer's dense keys and
  values, KV heads averaged in groups when ``hsa_kv_heads`` is below the dense model's. The output projection starts at
  **zero**, so at conversion every HSA block adds nothing and the model's logits equal the dense model's wherever the
  sliding window covers the context; training opens it (its gradient is nonzero from the first step). Two other
  starts for the comparison of issue #39: ``out_std`` > 0 draws it from N(0, out_std²) (the function changes a
  little at conversion), and ``model.hsa_gate`` keeps it random (``init_std``) behind a learned gate at **zero** (the
  function is kept; the gate's gradient is nonzero from the first step, and the retrieval parts' gradients grow with
  the one scalar rather than with a whole projection).
- Chunk encoder: its attention and norms copied from the first HSA layer (a pretrained attention summarises the chunk
  into the [CLS] slot); its FFN random with the output projection at zero (an identity at start).
- Retrieval query, landmark projection, [CLS]: random (``init_std``), with ``retrieval_norm`` on so selection
  scores start O(1) rather than near zero.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from lit_hsa.config import ConfigError, ModelConfig
from lit_hsa.interop.names import block_name
from lit_hsa.model.transformer import HSATransformer


def default_layout(n_layers: int) -> tuple[int, int, int]:
    """(n_lower_layers, n_groups, swa_layers_per_group) for a dense model of ``n_layers``."""
    if n_layers < 2:
        raise ConfigError(f"a dense model of {n_layers} layer cannot hold SWA blocks and an HSA block: it needs >= 2")
    upper = n_layers - n_layers // 2
    groups = 2 if upper >= 4 else 1
    per_group = upper // groups
    return n_layers - groups * per_group, groups, per_group - 1


def hsa_config(dense: ModelConfig, **overrides) -> ModelConfig:
    """The HSA model's config: the dense one's widths, RoPE and norms, the default layout and HSA settings, then
    ``overrides`` (ModelConfig fields). Raises ConfigError when the layout does not add up to the dense layers."""
    if dense.attention == "hsa":
        raise ConfigError("the checkpoint is already an HSA model: convert a dense (full or swa) one")
    if dense.moe:
        raise ConfigError("converting MoE checkpoints to HSA is not supported: convert a dense one")
    n_lower, groups, per_group = default_layout(dense.n_layers)
    cfg = replace(dense, name=f"{dense.name}-hsa", attention="hsa", n_lower_layers=n_lower, n_groups=groups,
                  swa_layers_per_group=per_group, swa_window=min(dense.swa_window, 4096) if dense.attention == "swa"
                  else 512, hsa_layer_swa=True, hsa_swa_window=None, hsa_heads=None, hsa_kv_heads=dense.n_kv_heads,
                  retrieval_dim=None, retrieval_norm=True, chunk_size=64, hsa_topk=16, encoder_layers=1)
    cfg = replace(cfg, **overrides)
    if cfg.n_layers != dense.n_layers:
        raise ConfigError(f"model.n_lower_layers + model.n_groups × (1 + model.swa_layers_per_group) = {cfg.n_layers} "
                          f"must equal the dense model's {dense.n_layers} layers")
    if cfg.hsa_q_heads != dense.n_heads or dense.n_kv_heads % cfg.hsa_kv_heads:
        raise ConfigError(f"model.hsa_heads must equal the dense model's {dense.n_heads} query heads and "
                          f"model.hsa_kv_heads divide its {dense.n_kv_heads} KV heads, got {cfg.hsa_q_heads} and "
                          f"{cfg.hsa_kv_heads}")
    cfg.validate()
    return cfg


def pool_heads(weight: torch.Tensor, heads: int, head_dim: int, groups: int) -> torch.Tensor:
    """A KV projection [heads·head_dim, d] → [groups·head_dim, d]: each group the mean of heads/groups
    consecutive heads (GQA's grouping: query head h reads KV head h // (Hq / Hkv))."""
    return weight.view(groups, heads // groups, head_dim, -1).mean(dim=1).reshape(groups * head_dim, -1)


def dense_to_hsa(dense: ModelConfig, state: dict[str, torch.Tensor], seed: int = 0, out_std: float = 0.0,
                 **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The HSA config and state dict converted from a dense model's (names as ``HSATransformer.state_dict()``);
    parts with no dense counterpart are drawn with ``seed``; the HSA output projections start at zero, or from
    N(0, out_std²) with ``out_std`` > 0, or random behind a zero gate with ``model.hsa_gate``."""
    if out_std < 0 or (out_std > 0 and overrides.get("hsa_gate")):
        raise ConfigError(f"the HSA output start is zero, N(0, out_std²) or a zero gate: got out_std {out_std} "
                          f"with model.hsa_gate={bool(overrides.get('hsa_gate'))}")
    cfg = hsa_config(dense, **overrides)
    torch.manual_seed(seed)
    fresh = HSATransformer(cfg).state_dict()  # random init for the parts with no dense source
    generator = torch.Generator().manual_seed(seed + 1)
    out: dict[str, torch.Tensor] = {}

    def layer(i: int, name: str) -> torch.Tensor:
        return state[f"{block_name(i, dense.n_lower_layers)}.{name}"]

    def layer_names(i: int) -> list[str]:
        """The names of dense layer i's weights inside its block."""
        prefix = block_name(i, dense.n_lower_layers) + "."
        return [k[len(prefix):] for k in state if k.startswith(prefix)]

    hsa_layers = [cfg.n_lower_layers + g * (1 + cfg.swa_layers_per_group) for g in range(cfg.n_groups)]
    for key in ("embed.weight", "norm.weight", "lm_head.weight"):
        if key in state:
            out[key] = state[key]
    for i in range(cfg.n_layers):
        ours = block_name(i, cfg.n_lower_layers)
        dense_keys = layer_names(i)
        if i not in hsa_layers:  # an SWA block: the same module names
            out.update({f"{ours}.{k}": layer(i, k) for k in dense_keys})
            continue
        for k in dense_keys:  # the SWA sub-layer and the FFN
            target = {"attn_norm.weight": "swa_norm.weight"}.get(k, k.replace("attn.", "swa.", 1))
            out[f"{ours}.{target}"] = layer(i, k)
        out[f"{ours}.hsa_norm.weight"] = layer(i, "attn_norm.weight")
        out[f"{ours}.retrieval.norm.weight"] = layer(i, "attn_norm.weight")
        out[f"{ours}.q_proj.weight"] = layer(i, "attn.q_proj.weight")
        if dense.qk_norm:
            out[f"{ours}.q_norm.weight"] = layer(i, "attn.q_norm.weight")
        o_proj = fresh[f"{ours}.o_proj.weight"]
        if cfg.hsa_gate:  # random projection (fresh), closed gate
            out[f"{ours}.gate"] = torch.zeros_like(fresh[f"{ours}.gate"])
        elif out_std == 0:
            out[f"{ours}.o_proj.weight"] = torch.zeros_like(o_proj)
        else:
            out[f"{ours}.o_proj.weight"] = (torch.randn(o_proj.shape, generator=generator) * out_std).to(o_proj.dtype)

    first = hsa_layers[0]
    out["memory.norm.weight"] = layer(first, "attn_norm.weight")
    for proj in ("k_proj", "v_proj"):
        out[f"memory.{proj}.weight"] = pool_heads(layer(first, f"attn.{proj}.weight"), dense.n_kv_heads,
                                                  dense.head_dim, cfg.hsa_kv_heads)
    if dense.qk_norm:
        out["memory.k_norm.weight"] = layer(first, "attn.k_norm.weight")
    first_attention = [k for k in layer_names(first) if k.startswith("attn.")]
    for j in range(cfg.encoder_layers):
        enc = f"memory.layers.{j}"
        for k in first_attention:  # q/k/v/o, the QK norms and q/k/v biases where the dense model has them
            if f"{enc}.{k}" in fresh:
                out[f"{enc}.{k}"] = layer(first, k)
        out[f"{enc}.attn_norm.weight"] = layer(first, "attn_norm.weight")
        out[f"{enc}.ffn.w_down.weight"] = torch.zeros_like(fresh[f"{enc}.ffn.w_down.weight"])

    unknown = [k for k in out if k not in fresh]
    if unknown:
        raise ConfigError(f"the dense checkpoint has weights the HSA model has no place for: {', '.join(unknown[:4])}")
    return cfg, {k: out.get(k, v) for k, v in fresh.items()}
