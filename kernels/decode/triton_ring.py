"""One Triton kernel for a sliding-window decoding step (``reference.ring_attention_reference`` is the definition).

At batch 1 a decoding step is bound by how many kernels it launches and how long each takes, not by bytes: written
as tensor operations, a ring step is a cache write per tensor, two matmuls and the softmax's passes, about six kernels
per layer. Here one launch does it all, split like flash-decoding: the ring's W slots are cut into ``splits`` ranges
and program (sequence·KV head, range) runs an online softmax over its range for all G query heads of the group at once
(the program whose range holds this step's slot writes the new key/value there and takes them from registers: its
own store need not be visible to its loads). Each program leaves its partial (max, sum, weighted values) in a
scratch buffer and counts itself done on a per-(sequence, KV head) counter; the last one merges the partials, writes
the output and resets the counter, so no second kernel is launched. The step is latency bound, so the ring is
spread over the SMs rather than streamed by one program per KV head
(benchmarks/results/decode_kernels_h200_2026-11-29.json).

``ring_attention_out_proj`` skips the counter: the output projection's programs merge the partials as they load the
attention output, faster than the in-kernel merge and a separate projection
(benchmarks/results/decode_kernels_blocks_h200_2026-11-29.json).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .pdl import pdl_args, wait_for_inputs
from .reference import HeadRope
from .triton_block import autotuned, gemv, head_norm_weights, norm_rope_rows, unit_stride_rows

__all__ = ["ring_attention_triton", "ring_attention_out_proj", "ring_splits"]

_LOG2E = 1.4426950408889634
MAX_SPLITS = 32  # beyond this a range holds several key blocks
MERGE_TILE = 8192  # fp32 values of partial outputs the merge loads at once (32 registers per thread at 8 warps)


@triton.jit
def _ring_decode_kernel(
    Q, KN, VN, CK, CV, O, POS, PART_M, PART_L, PART_ACC, LOCKS, COS, SIN, QNW, KNW,
    HKV, G, W, qk_scale, SPLITS, BLOCKS_PER_SPLIT, eps,
    stride_qb, stride_qh, stride_nb, stride_nh, stride_cb, stride_ch, stride_cw,
    D: tl.constexpr, GP: tl.constexpr, BW: tl.constexpr, SP: tl.constexpr, SC: tl.constexpr, DOT_PREC: tl.constexpr,
    MERGE: tl.constexpr, ROPE: tl.constexpr, HEAD_NORM: tl.constexpr, PDL: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    offs_d = tl.arange(0, D)
    ring = b.to(tl.int64) * stride_cb + g.to(tl.int64) * stride_ch
    first = split * BLOCKS_PER_SPLIT * BW
    # The range's first key block does not depend on this step (the one slot it writes is patched in below), so it
    # is loaded before waiting for the kernels that produce q, k, v and pos (programmatic dependent launch).
    s_idx = first + tl.arange(0, BW)
    rows = ring + s_idx.to(tl.int64)[:, None] * stride_cw + offs_d[None, :]
    k = tl.load(CK + rows, mask=(s_idx < W)[:, None], other=0.0)
    v = tl.load(CV + rows, mask=(s_idx < W)[:, None], other=0.0)
    q_nw, q_nws = head_norm_weights(QNW, D, ROPE and HEAD_NORM)  # weights: before the wait too
    k_nw, k_nws = head_norm_weights(KNW, D, ROPE and HEAD_NORM)
    wait_for_inputs(PDL)
    pos = tl.load(POS).to(tl.int64)
    slot = pos % W
    heads = tl.arange(0, GP)  # GP >= 16 rows for tl.dot; rows past G are masked
    head_ok = heads < G
    q_rows = b.to(tl.int64) * stride_qb + (g * G + heads).to(tl.int64) * stride_qh
    new_row = b.to(tl.int64) * stride_nb + g * stride_nh
    if ROPE:  # raw projections (a plain matrix-vector kernel made them): the heads' norms and RoPE happen here
        q = norm_rope_rows(Q, q_rows, head_ok, q_nw, q_nws, COS, SIN, eps, D, HEAD_NORM)
        one = tl.arange(0, 1)
        kn = tl.sum(norm_rope_rows(KN, new_row + one, one < 1, k_nw, k_nws, COS, SIN, eps, D, HEAD_NORM), 0)
    else:
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=head_ok[:, None], other=0.0)
        kn = tl.load(KN + new_row + offs_d)
    q = q.to(CK.dtype.element_ty)
    kn = kn.to(CK.dtype.element_ty)
    vn = tl.load(VN + new_row + offs_d).to(CV.dtype.element_ty)
    if (slot >= first) & (slot < first + BLOCKS_PER_SPLIT * BW):
        tl.store(CK + ring + slot * stride_cw + offs_d, kn)
        tl.store(CV + ring + slot * stride_cw + offs_d, vn)

    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for blk in range(BLOCKS_PER_SPLIT):  # k, v hold block blk (loaded above, or by the previous iteration)
        s_idx = first + blk * BW + tl.arange(0, BW)
        in_ring = s_idx < W
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
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # ranges with no valid slot yet (early positions)
        alpha = tl.math.exp2(m - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
        following = s_idx + BW  # the next block, loaded while this one is reduced
        more = (following < W) & (following < first + BLOCKS_PER_SPLIT * BW)
        rows = ring + following.to(tl.int64)[:, None] * stride_cw + offs_d[None, :]
        k = tl.load(CK + rows, mask=more[:, None], other=0.0)
        v = tl.load(CV + rows, mask=more[:, None], other=0.0)

    part = (bg * SPLITS + split).to(tl.int64) * GP + heads
    tl.store(PART_M + part, m)
    tl.store(PART_L + part, l)
    tl.store(PART_ACC + part[:, None] * D + offs_d[None, :], acc)
    if MERGE:  # else the partials are the result (``ring_attention_out_proj`` merges them in the next kernel)
        _merge_when_last(O, PART_M, PART_L, PART_ACC, LOCKS, bg, q_rows, heads, head_ok, offs_d, SPLITS, D, GP, SP, SC)


@triton.jit
def _merge_when_last(O, PART_M, PART_L, PART_ACC, LOCKS, bg, q_rows, heads, head_ok, offs_d, SPLITS,
                     D: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr, SC: tl.constexpr):
    tl.debug_barrier()  # every thread's partial is written before the counter releases it to the merging program
    done = tl.atomic_add(LOCKS + bg, 1, sem="acq_rel")
    if done == SPLITS - 1:  # the last range of this (sequence, KV head) to finish merges them all
        tl.debug_barrier()
        # Loaded as whole tiles, SC ranges at a time, not range by range: fewer dependent L2 round trips (W=512 on an
        # H200: 8.9 instead of 9.3 µs per call).
        first_part = (bg * SPLITS).to(tl.int64) * GP
        ranges = tl.arange(0, SP)
        stats = first_part + ranges[:, None] * GP + heads[None, :]  # [SP, GP]
        m_all = tl.max(tl.load(PART_M + stats, mask=(ranges < SPLITS)[:, None], other=float("-inf"),
                               cache_modifier=".cg"), 0)
        # the token's own slot is always valid, so m_all is finite and the total weight l_all > 0
        l_all = tl.zeros([GP], tl.float32)
        out = tl.zeros([GP, D], tl.float32)
        for c in range(0, SPLITS, SC):
            r = c + tl.arange(0, SC)
            ok = (r < SPLITS)[:, None] & head_ok[None, :]  # [SC, GP]
            rows_c = first_part + r[:, None] * GP + heads[None, :]
            m_c = tl.load(PART_M + rows_c, mask=ok, other=float("-inf"), cache_modifier=".cg")
            scale = tl.math.exp2(m_c - m_all[None, :])  # 0 for empty ranges and padding
            l_all += tl.sum(scale * tl.load(PART_L + rows_c, mask=ok, other=0.0, cache_modifier=".cg"), 0)
            acc_c = tl.load(PART_ACC + rows_c[:, :, None] * D + offs_d[None, None, :], mask=ok[:, :, None],
                            other=0.0, cache_modifier=".cg")  # [SC, GP, D]
            out += tl.sum(scale[:, :, None] * acc_c, 0)
        out = out / tl.where(head_ok, l_all, 1.0)[:, None]
        tl.store(O + q_rows[:, None] + offs_d[None, :], out.to(O.dtype.element_ty), mask=head_ok[:, None])
        tl.atomic_xchg(LOCKS + bg, 0)  # ready for the next step (and the next CUDA-graph replay)


def ring_splits(window: int, block_keys: int) -> tuple[int, int]:
    """(ranges, key blocks per range) for a ring of ``window`` slots: one block per range up to ``MAX_SPLITS``."""
    n_blocks = triton.cdiv(window, block_keys)
    per_split = triton.cdiv(n_blocks, MAX_SPLITS)
    return triton.cdiv(n_blocks, per_split), per_split


def _check(q, k, v, ck, cv, name: str) -> None:
    B, n, Hq, D = q.shape
    Hkv = ck.shape[1]
    if n != 1 or k.shape != (B, 1, Hkv, D) or v.shape != k.shape or cv.shape != ck.shape or Hq % Hkv:
        raise ValueError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"rings {tuple(ck.shape)} / {tuple(cv.shape)} do not fit [B, 1, Hq, D] / [B, Hkv, W, D]")
    from ..dispatch import ring_kernel_fits

    if not ring_kernel_fits(q, ck):
        raise ValueError(f"{name} needs fp32/fp16/bf16 and a power-of-two head dim in [16, 256], got "
                         f"{q.dtype} / {ck.dtype}, D={D}")
    if ck.stride(-1) != 1 or cv.stride() != ck.stride():
        raise ValueError(f"{name}: the rings must be contiguous in the head dim with equal strides")


def _rope_args(rope: HeadRope | None, D: int):
    """The kernel's (cos, sin, q norm weight, k norm weight, eps): cos, sin as [D/2] fp32; the norm weights None
    without per-head norms (placeholders are passed then: the kernel reads them only with HEAD_NORM)."""
    if rope is None:
        return None, None, None, None, 0.0
    if (rope.q_norm_w is None) != (rope.k_norm_w is None) or rope.cos.numel() != D // 2 or rope.sin.numel() != D // 2:
        raise ValueError(f"ring attention: rope needs cos, sin of {D // 2} values and both per-head norm weights or "
                         f"neither, got cos {tuple(rope.cos.shape)}, sin {tuple(rope.sin.shape)}")
    cos, sin = (t.reshape(-1).float().contiguous() for t in (rope.cos, rope.sin))
    return cos, sin, rope.q_norm_w, rope.k_norm_w, rope.eps


def _ring_partials(q, k, v, ck, cv, pos, locks, out, block_keys: int, num_warps: int, rope: HeadRope | None):
    """Launches the ring kernel; merges into ``out`` when given (then ``locks`` are its counters), else only leaves
    the partials. → (m [B·Hkv·splits·GP], l [same], acc [same·D], splits, GP)."""
    B, _, Hq, D = q.shape
    Hkv, W = ck.shape[1], ck.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k.stride() != v.stride():  # the kernel reads both with k's strides
        k, v = k.contiguous(), v.contiguous()
    cos, sin, q_norm_w, k_norm_w, eps = _rope_args(rope, D)
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    splits, per_split = ring_splits(W, block_keys)
    SP = triton.next_power_of_2(splits)
    part_m, part_l = (torch.empty(B * Hkv * splits * GP, device=q.device) for _ in range(2))
    part_acc = torch.empty(B * Hkv * splits * GP * D, device=q.device)
    merge = out is not None
    prec = "ieee" if ck.dtype == torch.float32 else "tf32"
    _ring_decode_kernel[(B * Hkv, splits)](
        q, k, v, ck, cv, out if merge else q, pos, part_m, part_l, part_acc, locks if merge else pos,
        cos, sin, q_norm_w, k_norm_w, Hkv, G, W, _LOG2E / math.sqrt(D), splits, per_split, eps,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        D=D, GP=GP, BW=block_keys, SP=SP, SC=min(SP, max(1, MERGE_TILE // (GP * D))), DOT_PREC=prec, MERGE=merge,
        ROPE=rope is not None, HEAD_NORM=q_norm_w is not None, num_warps=num_warps, num_stages=2, **pdl_args(q),
    )
    return part_m, part_l, part_acc, splits, GP


def ring_attention_triton(q, k, v, ck, cv, pos: torch.Tensor, locks: torch.Tensor | None = None,
                          block_keys: int = 128, num_warps: int = 8, rope: HeadRope | None = None) -> torch.Tensor:
    """q: [B, 1, Hq, D], k/v: [B, 1, Hkv, D] of the token at ``pos`` (0-d int tensor), rings ck/cv [B, Hkv, W, D]
    (written in place) → [B, 1, Hq, D] in q.dtype (contiguous). Scale 1/sqrt(D).

    ``rope``: q and k are raw projections (views with unit stride in D will do), and the kernel applies the per-head
    norms and RoPE (``reference.norm_rope_reference``) before attending and writing k to the ring.

    ``locks``: int32 zeros, at least B·Hkv of them, left zero by every call: pass one buffer kept across steps (a
    CUDA graph then holds no memset); by default a fresh one is allocated. Calls sharing a buffer must not run
    concurrently (different streams)."""
    _check(q, k, v, ck, cv, "ring_attention_triton")
    B, Hkv = q.shape[0], ck.shape[1]
    if locks is None:
        locks = torch.zeros(B * Hkv, dtype=torch.int32, device=q.device)
    elif locks.dtype != torch.int32 or locks.numel() < B * Hkv:
        raise ValueError(f"ring_attention_triton: locks must be int32 with at least {B * Hkv} entries")
    q = q.contiguous()  # the merge writes the output with q's strides
    out = torch.empty_like(q)
    _ring_partials(q, k, v, ck, cv, pos, locks, out, block_keys, num_warps, rope)
    return out


@triton.jit
def _merge_out_proj_kernel(
    PART_M, PART_L, PART_ACC, W, RES, Y,
    N, HQ, G, SPLITS, stride_rb, stride_yb,
    D: tl.constexpr, GP: tl.constexpr, HP: tl.constexpr, SP: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    offs_d = tl.arange(0, D)
    heads = tl.arange(0, HP)
    ranges = tl.arange(0, SP)
    cols = heads[:, None] * D + offs_d[None, :]
    w = tl.load(W + rows.to(tl.int64)[:, None, None] * (HQ * D) + cols[None, :, :],
                mask=row_ok[:, None, None] & (heads < HQ)[None, :, None], other=0.0)  # [BN, HP, D]
    wait_for_inputs(PDL)
    ok = (heads < HQ)[:, None] & (ranges < SPLITS)[None, :]  # [HP, SP]
    # every query head's partials at once (independent loads in flight together): [HP, SP] statistics, [HP, SP, D]
    part = ((b * (HQ // G) + heads // G)[:, None] * SPLITS + ranges[None, :]).to(tl.int64) * GP + (heads % G)[:, None]
    m = tl.load(PART_M + part, mask=ok, other=float("-inf"))
    m_max = tl.max(m, 1)  # the token's own slot is valid: finite for real heads
    scale = tl.math.exp2(m - tl.where(heads < HQ, m_max, 0.0)[:, None])  # 0 for empty ranges and padding
    total = tl.sum(scale * tl.load(PART_L + part, mask=ok, other=0.0), 1)
    acc = tl.load(PART_ACC + part[:, :, None] * D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0)
    o = tl.sum(scale[:, :, None] * acc, 1) / tl.where(heads < HQ, total, 1.0)[:, None]  # [HP, D]
    y = tl.sum(tl.sum(w.to(tl.float32) * o[None, :, :], 2), 1)
    y += tl.load(RES + b.to(tl.int64) * stride_rb + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + b.to(tl.int64) * stride_yb + rows, y.to(Y.dtype.element_ty), mask=row_ok)


# Partial values (fp32) the projection's programs merge in registers: beyond this (long rings in many ranges, many
# heads) the ring kernel merges in-kernel and the projection is a plain ``gemv``.
MERGE_IN_PROJECTION_MAX = 8192


_OUT_PROJ_ROWS = [(2, 4), (4, 4), (8, 4), (16, 4), (16, 8)]  # (rows, warps); `small` on an H200 took 16 rows, 4 warps
_merge_out_proj_tuned = autotuned([triton.Config({"BN": bn}, num_warps=w) for bn, w in _OUT_PROJ_ROWS],
                                  ["N", "HQ", "G", "SPLITS", "PDL"], triton.Config({"BN": 4}, num_warps=4))(
    _merge_out_proj_kernel)


def ring_attention_out_proj(q, k, v, ck, cv, pos: torch.Tensor, w_out: torch.Tensor, residual: torch.Tensor,
                            locks: torch.Tensor | None = None, block_keys: int = 128,
                            num_warps: int = 8, rope: HeadRope | None = None) -> torch.Tensor:
    """The ring step of ``ring_attention_triton`` followed by the output projection and the residual:
    residual [B, 1, d] + attention(q, ...) [B, Hq·D] · w_out [d, Hq·D]ᵀ → [B, 1, d] in residual's dtype. ``rope``
    as for ``ring_attention_triton``.

    Two launches: the ring kernel leaves its ranges' partials, and the projection's programs merge them as they load
    the attention output (each program merges all heads: a few KB of partials from L2), so no program waits on a
    counter and no merged output goes through memory (the in-kernel merge took ~4 of the ring step's 8 µs). Where
    the partials are too many to merge in registers (``MERGE_IN_PROJECTION_MAX``), the ring kernel merges them
    (``locks`` as for ``ring_attention_triton``) and ``gemv`` projects."""
    _check(q, k, v, ck, cv, "ring_attention_out_proj")
    B, _, Hq, D = q.shape
    d = residual.shape[-1]
    if w_out.shape != (d, Hq * D) or not w_out.is_contiguous() or residual.numel() != B * d:
        raise ValueError(f"ring_attention_out_proj: w_out {tuple(w_out.shape)} must be contiguous [{d}, {Hq * D}] "
                         f"and residual {tuple(residual.shape)} [{B}, 1, {d}]")
    res = unit_stride_rows(residual)  # [B, d], unit stride along d
    HP, SP = triton.next_power_of_2(Hq), triton.next_power_of_2(ring_splits(ck.shape[2], block_keys)[0])
    if HP * SP * D > MERGE_IN_PROJECTION_MAX:
        o = ring_attention_triton(q, k, v, ck, cv, pos, locks, block_keys, num_warps, rope)
        return gemv(o.reshape(B, Hq * D), w_out, residual=res).view(B, 1, d)
    part_m, part_l, part_acc, splits, GP = _ring_partials(q, k, v, ck, cv, pos, None, None, block_keys, num_warps,
                                                          rope)
    y = torch.empty_like(res)
    _merge_out_proj_tuned[lambda meta: (triton.cdiv(d, meta["BN"]), B)](
        part_m, part_l, part_acc, w_out, res, y, d, Hq, Hq // ck.shape[1], splits, res.stride(0), y.stride(0),
        D=D, GP=GP, HP=HP, SP=SP, **pdl_args(q),
    )
    return y.view(B, 1, d)
