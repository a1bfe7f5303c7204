"""An HSA layer's decoding step in Triton: chunk selection and the attention to the selected chunks.

The PyTorch definitions are ``kernels.hsa.reference``'s ``select_chunks_reference`` (top-k of the visible chunks'
scores q·landmark/sqrt(Dr), slots most recent chunk first) with ``kernels.hsa.reference.fusion_weights`` (softmax or
stick-breaking over the kept chunks, after the optional recency term), and ``hsa_attention_reference`` (a softmax
inside each selected chunk, outputs summed with the fusion weights). Written as tensor operations, even compiled,
an HSA layer's step is about twenty kernels, a third of them the top-k's radix selects; here it is three launches
(timings: benchmarks/results/hsa_decode_kernels_sweep_h200_2026-11-29.json and docs/performance.md):

- ``_chunk_topk_kernel``, program (sequence·retrieval head, range of chunks): scores its range of landmarks (the
  step's largest read: 16K landmarks × 640 dims at 1M tokens) and keeps the range's top k as candidates;
- ``_select_kernel``, program (sequence·retrieval head): the top k of all candidates, ordered most recent first,
  and their fusion weights;
- ``_hsa_chunks_kernel``, program (sequence·KV head, group of slots): the group's chunks (K/V rows read straight
  from the memory), one softmax per chunk, weighted sum → partial outputs, which the output projection sums as it
  loads them (``triton_block.gemv`` with P parts).

Top k without sorting: scores become order-preserving 32-bit keys, and a few hundred entries are ranked at once by
pairwise comparison (a range's scores; the selection's survivors). The selection bounds the k-th best score from
below by the k-th best of the ranges' maxima (k distinct chunks reach it), so only the candidates at or above it
(a few dozen) are ranked; when more pass (scores bunched in few ranges), the exact k-th key is found first by
bisection over its 32 bits. (Many ranges — memories of millions of tokens — are bounded by bisection over their
maxima, and the candidates are read in blocks.) Slots are then ranked by chunk index (most recent first). Ties at
the k-th score keep the earliest candidates (``torch.topk`` leaves ties unspecified).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .pdl import pdl_args, wait_for_inputs
from .triton_block import rms_rstd

__all__ = ["select_chunks_decode", "hsa_chunks_decode", "FUSIONS"]

_LOG2E = 1.4426950408889634
FUSIONS = {"softmax": 0, "stick_breaking": 1}
# Launch shapes tuned for `small` at 1M tokens with ``benchmarks/bench_hsa_decode.py``
# (benchmarks/results/hsa_decode_kernels_sweep_h200_2026-11-29.json). Ranges hold at most MAX_RANGE chunks (a range's
# top k ranks its scores pairwise), so longer memories have more ranges, and the selection reads their candidates in
# blocks.
PROGRAMS = 128
MAX_RANGE = 256
TILE = 16384  # landmark values per load
TOPK_WARPS = 8
SELECT_WARPS = 8
KEPT = 64  # candidates the selection ranks directly (more: it first cuts them to K by bisection)
RANK_MAX = 256  # ranges whose maxima are ranked pairwise; up to BISECT_MAX, bisection over them in registers
BISECT_MAX = 4096
CAND_BLOCK = 4096  # candidates the selection reads at once


@triton.jit
def _sortable(s):
    """fp32 → uint32 keys in the same order (−inf above 0: 0 is free for padding)."""
    b = s.to(tl.int32, bitcast=True)
    # negative floats: flip all bits (larger magnitude → smaller key); positive ones: set the sign bit
    flip = (b >> 31) | (-2147483647 - 1)  # arithmetic shift: −1 for negative floats, else 0; | sign bit
    return (b ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _rank(key, N: tl.constexpr):
    """Each entry's rank by key [N], largest first, ties by position: the number of entries ahead of it ([N, N]
    comparisons: one step, no passes, for the few hundred entries it is given). The ranks are 0..N-1."""
    i = tl.arange(0, N)
    ki = key[:, None]
    kj = key[None, :]
    ahead = (kj > ki) | ((kj == ki) & (i[None, :] < i[:, None]))
    return tl.sum(ahead.to(tl.int32), 1)


@triton.jit
def _score_key(s):
    """Keys of candidate scores, 0 for −inf (an invisible chunk or an empty candidate)."""
    return tl.where(s > float("-inf"), _sortable(s), 0)


@triton.jit
def _candidate_scores(CAND_S, first, n, stride, BLOCK: tl.constexpr):
    """The candidate scores at CAND_S[first + i·stride], i in [0, n), padded to BLOCK with −inf."""
    i = tl.arange(0, BLOCK)
    return tl.load(CAND_S + first + i * stride, mask=i < n, other=float("-inf"))


@triton.jit
def _candidate_keys(CAND_S, first, n, stride, BLOCK: tl.constexpr):
    return _score_key(_candidate_scores(CAND_S, first, n, stride, BLOCK))


@triton.jit
def _keep(KEPT_S, KEPT_I, CAND_I, first, s, keep, n_kept, MP: tl.constexpr):
    """Appends the candidates ``first + i`` with ``keep`` (scores s) to the kept list, which holds n_kept and has
    room for MP (the count goes on past it: the caller then cuts); → the new count."""
    at = n_kept + tl.cumsum(keep.to(tl.int32), 0) - 1
    fits = keep & (at < MP)
    tl.store(KEPT_S + at, s, mask=fits)
    tl.store(KEPT_I + at, tl.load(CAND_I + first + tl.arange(0, s.shape[0]), mask=fits, other=-1), mask=fits)
    return n_kept + tl.sum(keep.to(tl.int32), 0)


@triton.jit
def _kth_largest(u, K):
    """The K-th largest of the keys u [N] held in registers (0 if fewer than K are above 0), by bisection over its
    32 bits."""
    t = tl.sum(tl.zeros_like(u), 0)
    for bit in tl.static_range(31, -1, -1):
        cand = t | (tl.full([], 1, tl.uint32) << bit)
        if tl.sum((u >= cand).to(tl.int32), 0) >= K:
            t = cand
    return t


@triton.jit
def _kth_key(CAND_S, n, stride, K, BLOCK: tl.constexpr):
    """The K-th largest key of the n candidates at CAND_S[i·stride] (0 if fewer than K are above 0), by bisection
    over its 32 bits, counting BLOCK keys at a time (they are re-read from L2 every round)."""
    t = tl.sum(tl.zeros([BLOCK], tl.uint32), 0)
    for bit in tl.static_range(31, -1, -1):
        cand = t | (tl.full([], 1, tl.uint32) << bit)
        count = 0
        for b0 in range(0, n, BLOCK):
            count += tl.sum((_candidate_keys(CAND_S, b0 * stride, n - b0, stride, BLOCK) >= cand).to(tl.int32), 0)
        if count >= K:
            t = cand
    return t


@triton.jit
def _chunk_topk_kernel(
    QS, QNW, LMK, POS, CAND_S, CAND_I,
    C, HR, DR, K, CHUNK, scale, eps,
    stride_qb, stride_lb, stride_lc, stride_lh,
    CPP: tl.constexpr, BD: tl.constexpr, QNORM: tl.constexpr, PDL: tl.constexpr,
):
    bh = tl.program_id(0)
    rng = tl.program_id(1)
    b = bh // HR
    h = bh % HR
    rows = rng * CPP + tl.arange(0, CPP)
    lmk = LMK + b.to(tl.int64) * stride_lb + h * stride_lh + rows.to(tl.int64)[:, None] * stride_lc
    cols = tl.arange(0, BD)
    # landmarks of past chunks: loaded before waiting (kernels.decode.pdl); a chunk written in this step is not
    # visible yet (masked below)
    tile = tl.load(lmk + cols[None, :], mask=(rows < C)[:, None] & (cols < DR)[None, :], other=0.0)
    wait_for_inputs(PDL)
    q_row = QS + b.to(tl.int64) * stride_qb + h * DR
    rq = 1.0
    if QNORM:
        rq = rms_rstd(q_row, DR, eps, BD)
    s = tl.zeros([CPP], tl.float32)
    for d0 in range(0, DR, BD):  # ``tile`` holds columns d0..; the next tile is loaded before this one is reduced
        nxt = d0 + BD + cols
        following = tl.load(lmk + nxt[None, :], mask=(rows < C)[:, None] & (nxt < DR)[None, :], other=0.0)
        c = d0 + cols
        q = tl.load(q_row + c, mask=c < DR, other=0.0).to(tl.float32) * rq
        if QNORM:
            q *= tl.load(QNW + c, mask=c < DR, other=0.0).to(tl.float32)
        s += tl.sum(tile.to(tl.float32) * q[None, :], 1)
        tile = following
    n_visible = tl.load(POS).to(tl.int64) // CHUNK  # chunk i is visible iff pos >= (i + 1)·S
    s = tl.where(rows < n_visible, s * scale, float("-inf"))
    # the range's top K in score order (so its best comes first); K slots even where fewer chunks are visible
    rank = _rank(tl.where(rows < C, _sortable(s), 0), CPP)  # rows past the last chunk rank last
    out = (bh * tl.num_programs(1) + rng).to(tl.int64) * K
    keep = (rank < K) & (rows < C)
    tl.store(CAND_S + out + rank, s, mask=keep)
    tl.store(CAND_I + out + rank, rows.to(tl.int32), mask=keep)
    unused = (rank < K) & (rows >= C)  # past the last chunk: empty candidates
    tl.store(CAND_S + out + rank, tl.full([CPP], float("-inf"), tl.float32), mask=unused)
    tl.store(CAND_I + out + rank, tl.full([CPP], -1, tl.int32), mask=unused)


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _select_kernel(
    CAND_S, CAND_I, DECAY, KEPT_S, KEPT_I, SEL_S, SEL_I, SEL_W,
    RANGES, K,
    RP: tl.constexpr, RANK_RANGES: tl.constexpr, CB: tl.constexpr, MP: tl.constexpr, KP: tl.constexpr,
    FUSION: tl.constexpr, POS_DECAY: tl.constexpr, PDL: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    n_cand = RANGES * K
    cands = CAND_S + bh * n_cand
    wait_for_inputs(PDL)
    # A lower bound on the K-th largest score: the K-th largest of the ranges' maxima (each range's first
    # candidate; K distinct chunks reach it). Only candidates at or above it can be in the top K: typically a few
    # dozen of the RANGES·K. Up to RANK_RANGES ranges it is found by ranking the maxima, up to RP by bisection over
    # them in registers, past that by bisection re-reading them.
    if RP <= RANK_RANGES:
        best = _candidate_keys(cands, 0, RANGES, K, RP)
        bound = tl.max(tl.where(_rank(best, RP) == K - 1, best, 0), 0)  # 0 if fewer ranges than K
    elif RANGES <= RP:
        bound = _kth_largest(_candidate_keys(cands, 0, RANGES, K, RP), K)
    else:
        bound = _kth_key(cands, RANGES, K, K, RP)
    bound = tl.maximum(bound, 1)  # never an empty candidate
    # compact the candidates at or above the bound (in candidate order), CB at a time
    kept_s, kept_i, cand_i = KEPT_S + bh * MP, KEPT_I + bh * MP, CAND_I + bh * n_cand
    n_kept = 0
    for c0 in range(0, n_cand, CB):
        s = _candidate_scores(cands, c0, n_cand - c0, 1, CB)
        n_kept = _keep(kept_s, kept_i, cand_i, c0, s, _score_key(s) >= bound, n_kept, MP)
    if n_kept > MP:  # too many to rank (scores bunched in few ranges): cut exactly to the top K by bisection
        t = _kth_key(cands, n_cand, 1, K, CB)
        n_above = 0
        for c0 in range(0, n_cand, CB):
            n_above += tl.sum((_candidate_keys(cands, c0, n_cand - c0, 1, CB) > t).to(tl.int32), 0)
        n_kept = 0
        n_ties = 0  # ties at t are taken in candidate order while the top K has room
        for c0 in range(0, n_cand, CB):
            s = _candidate_scores(cands, c0, n_cand - c0, 1, CB)
            key = _score_key(s)
            tie = (key == t) & (key > 0)
            keep = (key > t) | (tie & (n_ties + tl.cumsum(tie.to(tl.int32), 0) <= K - n_above))
            n_kept = _keep(kept_s, kept_i, cand_i, c0, s, keep, n_kept, MP)
            n_ties += tl.sum(tie.to(tl.int32), 0)
    # the kept candidates, ranked by score (top K) and by chunk (slots, most recent first)
    tl.debug_barrier()
    m = tl.arange(0, MP)
    kept = m < n_kept
    ks = tl.load(kept_s + m, mask=kept, other=float("-inf"))
    ki = tl.load(kept_i + m, mask=kept, other=-1)
    chosen = kept & (_rank(tl.where(kept, _sortable(ks), 0), MP) < K)
    slot = _rank(tl.where(chosen, ki + 1, 0), MP)  # chunk indices are distinct: later chunks first
    n = tl.sum(chosen.to(tl.int32), 0)
    out = bh * K
    tl.store(SEL_S + out + slot, ks, mask=chosen)
    tl.store(SEL_I + out + slot, ki, mask=chosen)
    j = tl.arange(0, KP)
    empty = (j >= n) & (j < K)
    tl.store(SEL_S + out + j, tl.full([KP], float("-inf"), tl.float32), mask=empty)
    tl.store(SEL_I + out + j, tl.full([KP], -1, tl.int32), mask=empty)
    tl.debug_barrier()  # read back in slot order
    valid = j < n
    sc = tl.load(SEL_S + out + j, mask=valid, other=0.0)
    if POS_DECAY:  # + decay · rank, slot j holding the j-th most recent chunk
        sc += tl.load(DECAY).to(tl.float32) * j.to(tl.float32)
    if FUSION == 0:  # softmax over the kept chunks
        e = tl.where(valid, tl.exp(sc - tl.max(tl.where(valid, sc, float("-inf")), 0)), 0.0)
        w = e / tl.maximum(tl.sum(e, 0), 1e-30)
    else:  # stick-breaking: w_j = σ(s_j) Π_{l<j} σ(−s_l)
        log_keep = tl.where(valid, _log_sigmoid(-sc), 0.0)
        w = tl.where(valid, tl.exp(_log_sigmoid(sc) + tl.cumsum(log_keep, 0) - log_keep), 0.0)
    tl.store(SEL_W + out + j, w, mask=j < K)


def select_chunks_decode(q_slc: torch.Tensor, q_norm_w: torch.Tensor | None, eps: float, landmarks: torch.Tensor,
                         pos: torch.Tensor, topk: int, chunk_size: int, fusion: str = "softmax",
                         pos_decay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding token per sequence at position ``pos`` (0-d int tensor on the device).

    q_slc: [B, Hr·Dr] or [B, 1, Hr·Dr], the retrieval projection before its per-head RMSNorm (weight ``q_norm_w``
    [Dr], or None for none); landmarks [B, C, Hr, Dr] (chunks at or after pos // chunk_size are not visible yet);
    ``pos_decay``: the recency term's scalar, or None → scores [B, Hr, K] (fp32, before the recency term),
    indices [B, Hr, K] (int32, most recent chunk first, −1 for empty slots), fusion weights [B, Hr, K] (fp32),
    K = min(topk, C)."""
    B, C, Hr, Dr = landmarks.shape
    q = q_slc.reshape(B, -1)
    if q.shape[1] != Hr * Dr or landmarks.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"select_chunks_decode: q_slc {tuple(q_slc.shape)} must hold Hr·Dr = {Hr * Dr} values per "
                         f"sequence, and q_slc / landmarks {tuple(landmarks.shape)} be contiguous in the last dim")
    if fusion not in FUSIONS:
        raise ValueError(f"select_chunks_decode: fusion must be one of {sorted(FUSIONS)}, got {fusion!r}")
    K = max(1, min(topk, C))
    # chunks per range: a power of two, at least K (the top K of each range are its candidates), at most MAX_RANGE
    CPP = min(MAX_RANGE, max(triton.next_power_of_2(K), triton.next_power_of_2(triton.cdiv(C, PROGRAMS))))
    ranges = triton.cdiv(C, CPP)
    dev = landmarks.device
    cand_s = torch.empty(B * Hr, ranges * K, device=dev)
    cand_i = torch.empty(B * Hr, ranges * K, device=dev, dtype=torch.int32)
    KP = triton.next_power_of_2(K)
    BD = max(16, min(triton.next_power_of_2(Dr), TILE // CPP))
    _chunk_topk_kernel[(B * Hr, ranges)](
        q, q_norm_w if q_norm_w is not None else q, landmarks, pos, cand_s, cand_i,
        C, Hr, Dr, K, chunk_size, 1.0 / math.sqrt(Dr), eps,
        q.stride(0), landmarks.stride(0), landmarks.stride(1), landmarks.stride(2),
        CPP=CPP, BD=BD, QNORM=q_norm_w is not None, num_warps=TOPK_WARPS, **pdl_args(q),
    )
    MP = max(KEPT, KP)
    kept_s = torch.empty(B * Hr, MP, device=dev)
    kept_i = torch.empty(B * Hr, MP, device=dev, dtype=torch.int32)
    sel_s = torch.empty(B, Hr, K, device=dev)
    sel_i = torch.empty(B, Hr, K, device=dev, dtype=torch.int32)
    sel_w = torch.empty(B, Hr, K, device=dev)
    _select_kernel[(B * Hr,)](
        cand_s, cand_i, pos_decay if pos_decay is not None else cand_s, kept_s, kept_i, sel_s, sel_i, sel_w,
        ranges, K, RP=min(BISECT_MAX, max(16, triton.next_power_of_2(ranges))), RANK_RANGES=RANK_MAX,
        CB=min(CAND_BLOCK, triton.next_power_of_2(ranges * K)), MP=MP, KP=KP,
        FUSION=FUSIONS[fusion], POS_DECAY=pos_decay is not None, num_warps=SELECT_WARPS, **pdl_args(q),
    )
    return sel_s, sel_i, sel_w


@triton.jit
def _hsa_chunks_kernel(
    Q, QNW, KM, VM, SEL_I, SEL_W, PART,
    HKV, HR, G, K, eps, qk_scale,
    stride_qb, stride_kb, stride_kt, stride_pb, stride_pp,
    D: tl.constexpr, GP: tl.constexpr, S: tl.constexpr, SLOTS: tl.constexpr, HEAD_NORM: tl.constexpr,
    DOT_PREC: tl.constexpr, PDL: tl.constexpr,
):
    bg = tl.program_id(0)
    group = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    wait_for_inputs(PDL)
    sel = (b * HR + g * HR // HKV).to(tl.int64) * K  # the selection of this KV head's retrieval head
    j = group * SLOTS + tl.arange(0, SLOTS)
    chunk = tl.load(SEL_I + sel + j, mask=j < K, other=-1)
    w = tl.load(SEL_W + sel + j, mask=j < K, other=0.0)
    # the group's chunks' keys and values as one [SLOTS·S, D] tile (rows of empty slots masked to 0, weight 0)
    token = tl.reshape(chunk.to(tl.int64)[:, None] * S + tl.arange(0, S)[None, :], [SLOTS * S])
    used = tl.reshape(tl.broadcast_to((chunk >= 0)[:, None], [SLOTS, S]), [SLOTS * S])
    offs_d = tl.arange(0, D)
    rows = b.to(tl.int64) * stride_kb + token * stride_kt + g * D
    k = tl.load(KM + rows[:, None] + offs_d[None, :], mask=used[:, None], other=0.0)
    v = tl.load(VM + rows[:, None] + offs_d[None, :], mask=used[:, None], other=0.0)
    heads = tl.arange(0, GP)  # GP >= 16 rows for tl.dot; rows past G are masked
    head_ok = heads < G
    q_cols = (g * G + heads) * D
    q = tl.load(Q + b.to(tl.int64) * stride_qb + q_cols[:, None] + offs_d[None, :], mask=head_ok[:, None],
                other=0.0).to(tl.float32)
    if HEAD_NORM:
        q = q * tl.rsqrt(tl.sum(q * q, 1) / D + eps)[:, None] * tl.load(QNW + offs_d).to(tl.float32)[None, :]
    s = tl.dot((q * qk_scale).to(k.dtype), tl.trans(k), input_precision=DOT_PREC)  # [GP, SLOTS·S], log2 domain
    s = tl.reshape(s, [GP, SLOTS, S])
    p = tl.math.exp2(s - tl.max(s, 2)[:, :, None])
    p = p * (w[None, :] / tl.sum(p, 2))[:, :, None]  # each chunk's softmax, times its fusion weight
    o = tl.dot(tl.reshape(p, [GP, SLOTS * S]).to(v.dtype), v, input_precision=DOT_PREC)  # [GP, D]
    out = PART + b.to(tl.int64) * stride_pb + group * stride_pp
    tl.store(out + q_cols[:, None] + offs_d[None, :], o, mask=head_ok[:, None])


def hsa_chunks_decode(q: torch.Tensor, q_norm_w: torch.Tensor | None, eps: float, k: torch.Tensor, v: torch.Tensor,
                      indices: torch.Tensor, weights: torch.Tensor, chunk_size: int, slots: int = 2) -> torch.Tensor:
    """q: [B, Hq·D] or [B, 1, Hq·D] before its per-head RMSNorm (weight ``q_norm_w`` [D] or None); k, v: the chunk
    memory [B, C·S, Hkv, D]; indices (int32), weights (fp32): [B, Hr, K] from ``select_chunks_decode`` (Hr = Hkv,
    or 1 shared by all KV heads) → partial outputs [B, P, Hq·D] (fp32), P = ceil(K / slots) groups of ``slots``
    slots, whose sum is the attention output (``gemv`` sums them while projecting). Scale 1/sqrt(D)."""
    B, T, Hkv, D = k.shape
    Hr, K = indices.shape[1], indices.shape[2]
    qr = q.reshape(B, -1)
    Hq = qr.shape[1] // D
    S = chunk_size
    if (qr.shape[1] != Hq * D or Hq % Hkv or Hkv % Hr or v.shape != k.shape or T % S or k.stride(-1) != 1
            or v.stride() != k.stride() or qr.stride(-1) != 1):
        raise ValueError(f"hsa_chunks_decode: q {tuple(q.shape)}, memory {tuple(k.shape)} / {tuple(v.shape)} and "
                         f"selection {tuple(indices.shape)} do not fit [B, Hq·D] / [B, C·S, Hkv, D] / [B, Hr, K]")
    if D & (D - 1) or S & (S - 1) or D < 16 or S < 16 or slots & (slots - 1):
        raise ValueError(f"hsa_chunks_decode: head dim {D}, chunk size {S} and slots {slots} must be powers of two "
                         "(D and S at least 16)")
    groups = triton.cdiv(K, slots)
    part = torch.empty(B, groups, Hq * D, device=q.device)
    prec = "ieee" if k.dtype == torch.float32 else "tf32"
    _hsa_chunks_kernel[(B * Hkv, groups)](
        qr, q_norm_w if q_norm_w is not None else qr, k, v, indices, weights, part,
        Hkv, Hr, Hq // Hkv, K, eps, _LOG2E / math.sqrt(D),
        qr.stride(0), k.stride(0), k.stride(1), part.stride(0), part.stride(1),
        D=D, GP=max(16, triton.next_power_of_2(Hq // Hkv)), S=S, SLOTS=slots, HEAD_NORM=q_norm_w is not None,
        DOT_PREC=prec, num_warps=4, **pdl_args(qr),
    )
    return part
