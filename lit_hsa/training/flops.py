"""Training FLOPs per token, counted analytically so MFU is right for sparse attention: matmuls 6 × active
parameters; attention 12 × (keys actually read per query) × head_dim × heads (QKᵀ and PV, forward + backward)."""
from __future__ import annotations

from lit_hsa.config import ModelConfig


def mean_keys_causal(seq_len: int, window: int | None) -> float:
    """Mean keys per query of causal attention over seq_len tokens, limited to ``window`` when given."""
    w = seq_len if window is None else min(window, seq_len)
    # Σ_t min(t+1, w) = w(w+1)/2 + (T − w)·w
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def mean_keys_hsa(seq_len: int, chunk: int, topk: int) -> float:
    """Mean keys per query of HSA: min(topk, visible chunks) × chunk, visible chunks at t = t // chunk."""
    total = sum(min(topk, t // chunk) * chunk for t in range(0, seq_len, chunk)) * chunk
    return total / seq_len


def training_flops_per_token(cfg: ModelConfig, active_params: int, seq_len: int) -> float:
    matmul_params = active_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)  # lookup is free
    flops = 6.0 * matmul_params
    attn = cfg.n_heads * cfg.head_dim
    window = None if cfg.attention == "full" else cfg.swa_window
    n_attention_blocks = cfg.n_layers - (cfg.n_groups if cfg.attention == "hsa" else 0)
    flops += 12.0 * attn * mean_keys_causal(seq_len, window) * n_attention_blocks
    if cfg.attention == "hsa":
        hsa = cfg.hsa_q_heads * cfg.head_dim
        flops += 12.0 * hsa * mean_keys_hsa(seq_len, cfg.chunk_size, cfg.hsa_topk) * cfg.n_groups
        if cfg.hsa_layer_swa:
            flops += 12.0 * attn * mean_keys_causal(seq_len, cfg.hsa_swa_window or cfg.swa_window) * cfg.n_groups
        flops += 12.0 * attn * (cfg.chunk_size + 1) * cfg.encoder_layers  # bidirectional chunk encoder
        flops += 6.0 * cfg.retrieval_heads * cfg.retrieval_head_dim * (seq_len / cfg.chunk_size) / 2 * cfg.n_groups
    return flops
