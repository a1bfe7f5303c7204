"""Attention of one new token per sequence against a static-shape KV cache (decoding), in plain PyTorch.

Caches are ``[B, Hkv, L, D]``. A full-attention layer's cache holds positions ``0..L-1`` in order; a sliding-window
layer keeps a *ring* of ``W`` slots where position ``p`` lives in slot ``p mod W``, so a step writes one slot and
the ring always holds the last ``W`` positions. The current position lives on the device (a 0-d tensor), so a step
has the same shapes and addresses every time and can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Keys per slice of the probabilities·values product: with one query, that GEMM has [G, D] outputs and a reduction
# over the whole cache, which a GEMM library may run on a single SM (0.6 s per token at 1M cached tokens on an H100);
# as a batch of slices summed afterwards it spreads over every SM, like flash-decoding's split-KV.
SPLIT_KEYS = 2048


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One query per sequence against a static cache. q: [B, 1, Hq, D]; k, v: [B, Hkv, L, D]; valid: [L] bool →
    [B, 1, Hq, D]. Plain batched matmuls: with one query the cache read is the whole cost, and they stream it at
    full bandwidth, where a fused attention kernel without split-KV parallelises over the B·Hq rows only."""
    B, _, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, D).to(k.dtype)  # query head h reads KV head h // G
    scores = (qg @ k.transpose(-1, -2)).float() * D**-0.5  # [B, Hkv, G, L]
    probs = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1).to(v.dtype)
    n = L // SPLIT_KEYS if L > 2 * SPLIT_KEYS and L % SPLIT_KEYS == 0 else 1
    parts = probs.view(B, Hkv, G, n, L // n).transpose(2, 3) @ v.view(B, Hkv, n, L // n, D)  # [B, Hkv, n, G, D]
    return parts.float().sum(dim=2).reshape(B, 1, Hq, D).to(q.dtype)


def write_and_attend(q, k, v, ck, cv, slot, valid) -> torch.Tensor:
    """Writes this step's k, v [B, 1, Hkv, D] into slot ``slot`` [1] of the static caches ck, cv [B, Hkv, L, D], then
    attends q [B, 1, Hq, D] to the ``valid`` [L] cached keys → [B, 1, Hq, D]."""
    ck.index_copy_(2, slot, k.transpose(1, 2).to(ck.dtype))
    cv.index_copy_(2, slot, v.transpose(1, 2).to(cv.dtype))
    return decode_attention(q, ck, cv, valid)


def ring_slot_and_mask(pos: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the token at ``pos`` (0-d int tensor): the ring slot it is written to ([1]) and which of the ``window``
    slots hold a position it may see ([window] bool: written already, i.e. not before position 0)."""
    # the position each slot holds: the latest p <= pos with p ≡ slot (mod W); < 0 = never written
    key_pos = pos - (pos - torch.arange(window, device=pos.device)) % window
    return (pos % window).view(1), key_pos >= 0


def ring_attention_reference(q, k, v, ck, cv, pos: torch.Tensor) -> torch.Tensor:
    """Sliding-window decoding step: writes k, v [B, 1, Hkv, D] of the token at ``pos`` into the rings ck, cv
    [B, Hkv, W, D], then attends q [B, 1, Hq, D] to the last W positions → [B, 1, Hq, D]."""
    slot, valid = ring_slot_and_mask(pos, ck.shape[2])
    return write_and_attend(q, k, v, ck, cv, slot, valid)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of fp32 x with ``weight`` in fp32; identity when weight is None (no norm)."""
    return x if weight is None else torch.nn.functional.rms_norm(x, (x.shape[-1],), weight.float(), eps)


class HeadRope(NamedTuple):
    """What turns raw q/k projections of one token into attention inputs: per-head RMSNorms (weights [D], or None
    for none) with ``eps``, then RoPE at the token's position (cos, sin [1, D/2] fp32)."""

    cos: torch.Tensor
    sin: torch.Tensor
    q_norm_w: torch.Tensor | None
    k_norm_w: torch.Tensor | None
    eps: float


def norm_rope_reference(x: torch.Tensor, norm_w: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """x [..., D] → RoPE(RMSNorm(x)) in fp32 (rope = GPT-NeoX halves: dim i rotates with dim i + D/2); cos, sin
    [1, D/2]."""
    c, s = cos.reshape(-1).float(), sin.reshape(-1).float()
    x1, x2 = _rms_norm(x.float(), norm_w, eps).chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def qkv_rope_reference(x, norm_w, wq, wk, wv, q_norm_w, k_norm_w, cos, sin, eps: float):
    """A decoding step's attention inputs (``triton_block.qkv_rope``), in fp32. x: [B, 1, d]; norm_w [d]; wq
    [Hq·D, d], wk, wv [Hkv·D, d]; q/k_norm_w [D] or None; cos, sin [1, D/2] → q [B, 1, Hq, D], k, v [B, 1, Hkv, D]:
    q = rope(n_q(wq·n(x))), k = rope(n_k(wk·n(x))), v = wv·n(x), n = RMSNorm, rope = GPT-NeoX halves."""
    B, D = x.shape[0], 2 * cos.shape[-1]
    n = _rms_norm(x.reshape(B, -1).float(), norm_w, eps)
    q, k, v = ((n @ w.float().T).view(B, 1, -1, D) for w in (wq, wk, wv))
    return norm_rope_reference(q, q_norm_w, cos, sin, eps), norm_rope_reference(k, k_norm_w, cos, sin, eps), v


def gemv_reference(x, w, *, norm_w=None, eps: float = 0.0, w_up=None, residual=None):
    """``triton_block.gemv`` in fp32: x [B, 1, K] or [B, K]; w, w_up [N, K]; residual [B, N] → [B, N]:
    [residual +] w·n(x), or silu(w·n(x)) * (w_up·n(x)); n = RMSNorm with norm_w, or identity."""
    n = _rms_norm(x.reshape(x.shape[0], -1).float(), norm_w, eps)
    y = n @ w.float().T
    if w_up is not None:
        y = torch.nn.functional.silu(y) * (n @ w_up.float().T)
    if residual is not None:
        y = y + residual.reshape(y.shape).float()
    return y
