"""One Triton kernel for a sliding-window decoding step (``reference.ring_attention_reference`` is the definition).

At batch 1 a decoding step is bound by how many kernels it launches, not by bytes: written as tensor operations, a
ring step is a cache write per tensor, two matmuls and the softmax's passes, about six kernels per layer. Here one
program per (sequence, KV head) writes the new key/value into its ring slot, then runs an online softmax over the
ring's W slots for all G query heads of the group at once (the new key/value are taken from registers: the program's
own store need not be visible to its loads), and writes the output.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["ring_attention_triton"]

_LOG2E = 1.4426950408889634


@triton.jit
def _ring_decode_kernel(
    Q, KN, VN, CK, CV, O, POS,
    HKV, G, W, qk_scale,
    stride_qb, stride_qh, stride_nb, stride_nh, stride_cb, stride_ch, stride_cw,
    D: tl.constexpr, GP: tl.constexpr, BW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HKV
    g = pid % HKV
    pos = tl.load(POS).to(tl.int64)
    slot = pos % W
    offs_d = tl.arange(0, D)
    heads = tl.arange(0, GP)  # GP >= 16 rows for tl.dot; rows past G are masked
    head_ok = heads < G
    q_rows = b.to(tl.int64) * stride_qb + (g * G + heads).to(tl.int64) * stride_qh
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=head_ok[:, None], other=0.0).to(CK.dtype.element_ty)
    new_row = b.to(tl.int64) * stride_nb + g * stride_nh + offs_d
    kn = tl.load(KN + new_row).to(CK.dtype.element_ty)
    vn = tl.load(VN + new_row).to(CV.dtype.element_ty)
    ring = b.to(tl.int64) * stride_cb + g.to(tl.int64) * stride_ch
    tl.store(CK + ring + slot * stride_cw + offs_d, kn)
    tl.store(CV + ring + slot * stride_cw + offs_d, vn)

    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for start in range(0, W, BW):
        s_idx = start + tl.arange(0, BW)
        in_ring = s_idx < W
        rows = ring + s_idx.to(tl.int64)[:, None] * stride_cw + offs_d[None, :]
        k = tl.load(CK + rows, mask=in_ring[:, None], other=0.0)
        v = tl.load(CV + rows, mask=in_ring[:, None], other=0.0)
        is_new = (s_idx == slot)[:, None]
        k = tl.where(is_new, kn[None, :], k)
        v = tl.where(is_new, vn[None, :], v)
        # position held by each slot: the latest p <= pos with p ≡ slot (mod W); negative = never written
        # (Triton's % truncates like C, so the difference is made non-negative first)
        key_pos = pos - ((pos - s_idx) % W + W) % W
        valid = in_ring & (key_pos >= 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [GP, BW], log2 domain
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # blocks with no valid slot yet (early positions)
        alpha = tl.math.exp2(m - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
    out = acc / l[:, None]  # the token's own slot is always valid: l > 0
    tl.store(O + q_rows[:, None] + offs_d[None, :], out.to(O.dtype.element_ty), mask=head_ok[:, None])


def ring_attention_triton(q, k, v, ck, cv, pos: torch.Tensor, block_keys: int = 64) -> torch.Tensor:
    """q: [B, 1, Hq, D], k/v: [B, 1, Hkv, D] of the token at ``pos`` (0-d int tensor), rings ck/cv [B, Hkv, W, D]
    (written in place) → [B, 1, Hq, D] in q.dtype. Scale 1/sqrt(D)."""
    B, n, Hq, D = q.shape
    Hkv, W = ck.shape[1], ck.shape[2]
    if n != 1 or k.shape != (B, 1, Hkv, D) or v.shape != k.shape or cv.shape != ck.shape or Hq % Hkv:
        raise ValueError(f"ring_attention_triton: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"rings {tuple(ck.shape)} / {tuple(cv.shape)} do not fit [B, 1, Hq, D] / [B, Hkv, W, D]")
    from . import ring_kernel_fits

    if not ring_kernel_fits(q, ck):
        raise ValueError(f"ring_attention_triton needs fp32/fp16/bf16 and a power-of-two head dim in [16, 256], got "
                         f"{q.dtype} / {ck.dtype}, D={D}")
    if ck.stride(-1) != 1 or cv.stride() != ck.stride():
        raise ValueError("ring_attention_triton: the rings must be contiguous in the head dim with equal strides")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    G = Hq // Hkv
    out = torch.empty_like(q)
    prec = "ieee" if ck.dtype == torch.float32 else "tf32"
    _ring_decode_kernel[(B * Hkv,)](
        q, k, v, ck, cv, out, pos,
        Hkv, G, W, _LOG2E / math.sqrt(D),
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        D=D, GP=max(16, triton.next_power_of_2(G)), BW=block_keys, DOT_PREC=prec,
        num_warps=4, num_stages=2,
    )
    return out
