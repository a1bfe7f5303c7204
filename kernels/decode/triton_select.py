"""Chunk selection of one decoding step in Triton: the top-k of one query's scores against every landmark
(``kernels.hsa.reference.select_chunks_reference`` with one token and no documents defines it).

At a million cached tokens a decoding step scores 16K landmarks per retrieval head and keeps 32 or 64; written as
tensor operations that is a matrix-vector product, the visibility mask, and a staged ``topk`` (three radix selects,
index arithmetic, a gather and a sort): ~35 µs per HSA layer on an H200, most of it latency. Here:

1. ``_score_groups_kernel``, one program per (sequence·head, group of ``GROUP`` chunks): scores its group (loading
   landmarks a few dims at a time), masks chunks not yet visible (chunk i is visible at position t iff
   t >= (i+1)·S; groups wholly in the future load nothing), and keeps its top k by k rounds of arg-max;
2. ``_merge_candidates_kernel``, the top k of the candidates, ``MERGE`` at a time per program, as often as needed
   (once up to 4M cached tokens with the defaults); the last round writes the k chunks ordered most recent first,
   empty slots (index -1, score -inf) last, as the reference does.

Scores are accumulated in fp32 and returned in the query's dtype (the reference recomputes the selected scores in
that dtype).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["select_chunks_decode"]

GROUP = 128  # chunks per scoring program
MERGE = 4096  # candidates per merging program


@triton.jit
def _top_k_rounds(s, idx, N: tl.constexpr, KP: tl.constexpr, K):
    """The K largest of s [N] (with their idx [N]) by K rounds of arg-max: → scores [KP], indices [KP] (-1 / -inf
    past K or where s ran out of finite entries)."""
    slots = tl.arange(0, KP)
    top_s = tl.full([KP], float("-inf"), tl.float32)
    top_i = tl.full([KP], -1, tl.int32)
    for r in range(K):
        best = tl.max(s, 0)
        at = tl.argmax(s, 0)
        pick = tl.sum(tl.where(tl.arange(0, N) == at, idx, 0), 0)
        pick = tl.where(best > float("-inf"), pick, -1)  # no finite entry left: an empty slot
        top_s = tl.where(slots == r, best, top_s)
        top_i = tl.where(slots == r, pick, top_i)
        s = tl.where(tl.arange(0, N) == at, float("-inf"), s)
    return top_s, top_i


@triton.jit
def _score_groups_kernel(
    Q, LMK, POS, CAND_S, CAND_I,
    C, H, Dr, S_CHUNK, K, scale, stride_qb, stride_qh, stride_lb, stride_lc, stride_lh,
    GROUP: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
):
    bh = tl.program_id(0)
    grp = tl.program_id(1)
    n_groups = tl.num_programs(1)
    b = bh // H
    h = bh % H
    chunks = grp * GROUP + tl.arange(0, GROUP)
    n_visible = tl.load(POS).to(tl.int64) // S_CHUNK  # chunks 0 .. n_visible-1 lie wholly in the past
    visible = (chunks < C) & (chunks < n_visible)
    s = tl.zeros([GROUP], tl.float32)
    if grp * GROUP < n_visible:  # a group wholly in the future loads nothing
        q_row = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        rows = LMK + b.to(tl.int64) * stride_lb + chunks.to(tl.int64)[:, None] * stride_lc + h * stride_lh
        for d0 in range(0, Dr, BD):
            dims = d0 + tl.arange(0, BD)
            q = tl.load(q_row + dims, mask=dims < Dr, other=0.0).to(tl.float32)
            lmk = tl.load(rows + dims[None, :], mask=visible[:, None] & (dims < Dr)[None, :], other=0.0)
            s += tl.sum(lmk.to(tl.float32) * q[None, :], 1)
    s = tl.where(visible, s * scale, float("-inf"))
    top_s, top_i = _top_k_rounds(s, chunks.to(tl.int32), GROUP, KP, K)
    out = (bh.to(tl.int64) * n_groups + grp) * KP + tl.arange(0, KP)
    tl.store(CAND_S + out, top_s)
    tl.store(CAND_I + out, top_i)


@triton.jit
def _merge_candidates_kernel(
    CAND_S, CAND_I, OUT_S, OUT_I, N, K,
    MERGE: tl.constexpr, KP: tl.constexpr, FINAL: tl.constexpr,
):
    bh = tl.program_id(0)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    offs = part * MERGE + tl.arange(0, MERGE)
    ok = offs < N
    src = bh.to(tl.int64) * N + offs
    s = tl.load(CAND_S + src, mask=ok, other=float("-inf"))
    idx = tl.load(CAND_I + src, mask=ok, other=-1)
    top_s, top_i = _top_k_rounds(s, idx, MERGE, KP, K)
    slots = tl.arange(0, KP)
    if FINAL:
        # most recent chunk first, empty slots (-1) last: each slot's rank among the K by index, ties by slot
        later = (top_i[None, :] > top_i[:, None]) | ((top_i[None, :] == top_i[:, None]) & (slots[None, :] < slots[:, None]))
        rank = tl.sum(later.to(tl.int32), 1)
        dst = bh.to(tl.int64) * K + rank
        tl.store(OUT_S + dst, top_s.to(OUT_S.dtype.element_ty), mask=slots < K)
        tl.store(OUT_I + dst, top_i.to(tl.int64), mask=slots < K)
    else:
        dst = (bh.to(tl.int64) * n_parts + part) * KP + slots
        tl.store(OUT_S + dst, top_s)
        tl.store(OUT_I + dst, top_i)


def select_chunks_decode(q_slc: torch.Tensor, landmarks: torch.Tensor, topk: int, chunk_size: int,
                         pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q_slc: [B, 1, H, Dr] (the query of the token at ``pos``, a 0-d int tensor on the device); landmarks
    [B, C, H, Dr] (chunks not yet visible are ignored, whatever they hold) → scores [B, 1, H, topk] in q_slc's dtype,
    indices [B, 1, H, topk] int64: the top-k visible chunks by q·landmark/sqrt(Dr), most recent first, empty slots
    (-1, -inf) last. Scores accumulate in fp32."""
    B, T, H, Dr = q_slc.shape
    C = landmarks.shape[1]
    if T != 1 or landmarks.shape[0] != B or landmarks.shape[2:] != (H, Dr) or landmarks.stride(-1) != 1:
        raise ValueError(f"select_chunks_decode: q_slc {tuple(q_slc.shape)} must be [B, 1, H, Dr] and landmarks "
                         f"{tuple(landmarks.shape)} [B, C, H, Dr], contiguous in Dr")
    if not 1 <= topk <= 128:
        raise ValueError(f"select_chunks_decode: topk must be in [1, 128], got {topk}")
    q = q_slc if q_slc.stride(-1) == 1 else q_slc.contiguous()
    KP = triton.next_power_of_2(topk)
    n_groups = triton.cdiv(C, GROUP)
    dev = q.device
    cand_s = torch.empty(B * H * n_groups * KP, device=dev)
    cand_i = torch.empty(B * H * n_groups * KP, device=dev, dtype=torch.int32)
    _score_groups_kernel[(B * H, n_groups)](
        q, landmarks, pos, cand_s, cand_i,
        C, H, Dr, chunk_size, topk, 1.0 / math.sqrt(Dr), q.stride(0), q.stride(2),
        landmarks.stride(0), landmarks.stride(1), landmarks.stride(2),
        GROUP=GROUP, BD=min(64, triton.next_power_of_2(Dr)), KP=KP, num_warps=4,
    )
    scores = torch.empty(B, 1, H, topk, device=dev, dtype=q_slc.dtype)
    indices = torch.empty(B, 1, H, topk, device=dev, dtype=torch.int64)
    n = n_groups * KP
    while True:
        parts = triton.cdiv(n, MERGE)
        final = parts == 1
        out_s = scores if final else torch.empty(B * H * parts * KP, device=dev)
        out_i = indices if final else torch.empty(B * H * parts * KP, device=dev, dtype=torch.int32)
        _merge_candidates_kernel[(B * H, parts)](
            cand_s, cand_i, out_s, out_i, n, topk, MERGE=min(MERGE, triton.next_power_of_2(n)), KP=KP, FINAL=final,
            num_warps=8,
        )
        if final:
            return scores, indices
        cand_s, cand_i, n = out_s, out_i, parts * KP
