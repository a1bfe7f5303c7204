"""Triton forward and backward kernels for ``hsa_attention`` (spec §4).

Math (``reference.hsa_attention_reference`` is the definition)::

    o[b,t,h] = Σ_j w[b,t,g,j] · softmax_c(q[b,t,h] · K_c^T · scale) · V_c,   c = indices[b,t,g,j], g = h // G

Every chunk has its own complete softmax over its ``S`` keys and the fusion weights are inputs, so ``o`` is a plain
weighted sum of per-(token, slot) results: no online rescaling across chunks is needed, the softmax of a chunk is
recomputed exactly in the backward (no log-sum-exp is stored), and the work can be cut along chunks or along
queries. Two strategies, chosen per call from the indices:

- **chunk-major** (any index layout; the only one for tokens that pick unrelated chunks). One stable sort of the
  flat (token, slot) pair ids by bucket ``(slab, b, g, chunk)`` lists the pairs that selected each chunk; buckets
  are cut into *items* of at most ``seg`` pairs, launched in the order of the first token they touch. A program
  loads its chunk's K/V once and loops over its pairs in tiles of ``BP`` pairs × ``HB`` query heads of the group
  (``BP·HB`` = 64 rows, so ``tl.dot`` always has ≥ 16 rows whatever the head ratio: the authors' 16:1 limit
  disappears). Forward writes each pair's ``w · softmax · V`` [G, D] into a buffer of partials (16-bit, plain
  coalesced stores), and a second pass sums every token's K partials into ``o``. Backward, per tile:
  ``dPv = dO·V^T``, ``Δ = rowsum(P ⊙ dPv)`` (= ``O_j·dO``, summed over the group's heads it is ``∂L/∂w_j``),
  ``dS = w·P⊙(dPv − Δ)``, the pair's ``scale·dS·K`` into the partials (summed into ``dq`` the same way), while
  ``dK += scale·dS^T·q`` and ``dV += (w·P)^T·dO`` stay in registers over the item and are added once per item
  (fp32 atomics). Partials rather than fp32 atomics on ``o``/``dq``: rows spread over the whole output made every
  atomic a read-modify-write of 8 bytes per element in HBM; a partial is 2 bytes written and read once. The
  buffer holds one *slab* of consecutive tokens at a time (``CONFIG["partial_budget"]``), so its size does not
  grow past an fp32 output's.
- **query-major** (neighbouring tokens share chunks, as trained retrieval does). A program owns ``BT`` tokens ×
  ``HB`` heads (64 rows) and walks the *union* of the chunks its tokens picked (precomputed by a segmented sort);
  for each chunk every row's weight is the sum of its token's weights on that chunk (0 if it did not pick it),
  so the result is exact. Output, ``dq`` and ``∂L/∂w`` are accumulated in registers and written once: no atomics
  and no K/V re-reads when the union is small. ``dK``/``dV`` still come from the chunk-major backward (without
  its ``dq`` part). ``auto`` picks query-major when the union is at most ``CONFIG["qm_max_expansion"]`` times the
  slots a single token uses.

Work and memory are linear in the number of selected (token, slot) pairs in both; nothing is quadratic in T.
Empty slots (index −1) contribute 0 and get gradient 0 for their weight; rows whose slots are all empty come out
as 0. Indices ≥ the number of chunks are clamped to the last chunk, as the reference does.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .reference import check_hsa_inputs

__all__ = ["hsa_attention_triton", "build_plan", "HSAPlan", "CONFIG"]

# The strategy choice looks at this many evenly spaced token blocks (see HSAPlan.expansion).
EXPANSION_SAMPLE_BLOCKS = 2048

# Tiles and strategy; the benchmark overrides them to tune. ``rows``: rows (pairs or tokens × heads) per tile;
# ``seg_rows``: about how many rows one chunk-major program handles before the next one takes over the bucket.

CONFIG = {
    "strategy": "auto",  # "auto" | "chunk" | "query"
    # chunk-major partial buffer: at most this many times the bytes of an fp32 output (see _n_slabs)
    "partial_budget": 1.0,
    "graph_plans": True,  # build plans through CUDA graphs on CUDA (see _graphed)
    "qm_max_expansion": 2.0,
    "fwd": {"rows": 64, "seg_rows": 1024, "num_warps": 4, "num_stages": 1},
    "bwd": {"rows": 64, "seg_rows": 2048, "num_warps": 4, "num_stages": 2},
    "fwd_qm": {"rows": 64, "num_warps": 4, "num_stages": 2},
    "bwd_qm": {"rows": 64, "num_warps": 4, "num_stages": 2},
    "reduce": {"rows": 128, "num_warps": 4, "num_stages": 2},  # sums of the chunk-major partials
}

_LOG2E = 1.4426950408889634
# a partial buffer this small costs nothing worth cutting the work for
_MIN_PARTIAL_BYTES = 256 << 20


@triton.jit
def _load_chunk(K, V, b64, c, g, stride_kb, stride_kt, stride_kh, S: tl.constexpr, D: tl.constexpr):
    """Chunk c of KV head g: (row offsets [S], k [S, D], v [S, D])."""
    offs_d = tl.arange(0, D)
    kv_rows = b64 * stride_kb + (c * S + tl.arange(0, S)).to(tl.int64) * stride_kt + g * stride_kh
    k = tl.load(K + kv_rows[:, None] + offs_d[None, :])
    v = tl.load(V + kv_rows[:, None] + offs_d[None, :])
    return kv_rows, k, v


@triton.jit
def _chunk_exp(q, kt, qk_scale, DOT_PREC: tl.constexpr, OFF_BY_ONE: tl.constexpr):
    """Unnormalised softmax of every row over the chunk's S keys: q [M, D], kt [D, S] → (exp [M, S], row sums [M]),
    so a row's probabilities are exp / sums (fp32). OFF_BY_ONE: the sums include a virtual key of score 0 (value 0):
    the backward's formulas hold unchanged with these probabilities."""
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # log2 domain
    m = tl.max(s, 1)
    if OFF_BY_ONE:
        m = tl.maximum(m, 0.0)
    pe = tl.math.exp2(s - m[:, None])
    l = tl.sum(pe, 1)
    if OFF_BY_ONE:
        l += tl.math.exp2(-m)
    return pe, l


# ------------------------------------------------------------------------------------------------ chunk-major
# ``n_items`` (the grid size) is a bound from the shapes (``HSAPlan._cut``). It used to be the exact, data-dependent
# count, and since Triton specialises integer arguments on divisibility by 16, a count that happened to be a multiple
# of 16 compiled the kernels again seconds into training. `do_not_specialize` keeps it out of the binary's key
# whatever the count is.


@triton.jit
def _item_header(ITEMS, n_items, NCHUNK, HKV):
    pid = tl.program_id(0)
    start = tl.load(ITEMS + pid)
    count = tl.load(ITEMS + n_items + pid)
    bucket = tl.load(ITEMS + 2 * n_items + pid)  # (b·Hkv + g)·NCHUNK + c
    part = tl.load(ITEMS + 3 * n_items + pid)  # where the item's pairs start in the slab's partial buffer
    c = bucket % NCHUNK
    bg = bucket // NCHUNK
    g = bg % HKV
    b = bg // HKV
    return start, count, part, c, g, b


@triton.jit
def _pair_rows(PERM, start, part, i, count, T, TOPK, HKV, b64, g, G, stride_qb, stride_qt, stride_qh,
               HB: tl.constexpr, BP: tl.constexpr, D: tl.constexpr):
    """Rows of tile i of an item (BP pairs × HB heads): (flat pair ids, mask, offsets of q/dO rows, offsets of the
    rows in the partial buffer [pairs, G, D])."""
    M: tl.constexpr = BP * HB
    r = tl.arange(0, M)
    rp = r // HB  # pair of the row inside the tile
    head = tl.program_id(1) * HB + r % HB  # query head inside the group
    row_ok = (i + rp < count) & (head < G)
    p = tl.load(PERM + start + i + rp, mask=row_ok, other=0)
    t = (p // (TOPK * HKV)) % T
    q_rows = b64 * stride_qb + t.to(tl.int64) * stride_qt + (g * G + head) * stride_qh
    part_rows = (part + i + rp).to(tl.int64) * (G * D) + head * D
    return p, row_ok, q_rows, part_rows


@triton.jit(do_not_specialize=["n_items"])
def _hsa_fwd_kernel(
    Q, K, V, W, PERM, ITEMS, PART,
    n_items, T, HKV, NCHUNK, TOPK, G, qk_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    S: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, BP: tl.constexpr,
    DOT_PREC: tl.constexpr, OFF_BY_ONE: tl.constexpr,
):
    """One item: every pair's ``w · softmax · V`` [HB heads, D] into its own row block of PART (no atomics)."""
    start, count, part, c, g, b = _item_header(ITEMS, n_items, NCHUNK, HKV)
    if count == 0:  # padding of the work list (its length is a bound, see HSAPlan._cut)
        return
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, D)
    _, k, v = _load_chunk(K, V, b64, c, g, stride_kb, stride_kt, stride_kh, S, D)  # k, v: [S, D]
    kt = tl.trans(k)
    for i in range(0, count, BP):
        p, row_ok, q_rows, part_rows = _pair_rows(PERM, start, part, i, count, T, TOPK, HKV, b64, g, G,
                                                  stride_qb, stride_qt, stride_qh, HB, BP, D)
        w = tl.load(W + p, mask=row_ok, other=0.0).to(tl.float32)
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        pe, l = _chunk_exp(q, kt, qk_scale, DOT_PREC, OFF_BY_ONE)
        pw = pe * (w / l)[:, None]  # [M, S] weight · softmax
        o = tl.dot(pw.to(v.dtype), v, input_precision=DOT_PREC)  # [M, D]
        tl.store(PART + part_rows[:, None] + offs_d[None, :], o.to(PART.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["n_items"])
def _hsa_bwd_kernel(
    Q, K, V, W, DO, PERM, ITEMS, PART, DK, DV, DW,
    n_items, T, HKV, NCHUNK, TOPK, G, qk_scale, sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    S: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, BP: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, DOT_PREC: tl.constexpr, OFF_BY_ONE: tl.constexpr,
):
    """One item: dK/dV of its chunk (registers, added once), and with COMPUTE_DQ each pair's dq part into PART and
    its ∂L/∂w."""
    start, count, part, c, g, b = _item_header(ITEMS, n_items, NCHUNK, HKV)
    if count == 0:  # padding of the work list
        return
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, D)
    kv_rows, k, v = _load_chunk(K, V, b64, c, g, stride_kb, stride_kt, stride_kh, S, D)  # k, v: [S, D]
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([S, D], dtype=tl.float32)
    dv = tl.zeros([S, D], dtype=tl.float32)
    pr = tl.arange(0, BP)
    for i in range(0, count, BP):
        p, row_ok, q_rows, part_rows = _pair_rows(PERM, start, part, i, count, T, TOPK, HKV, b64, g, G,
                                                  stride_qb, stride_qt, stride_qh, HB, BP, D)
        w = tl.load(W + p, mask=row_ok, other=0.0).to(tl.float32)
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)

        pe, l = _chunk_exp(q, kt, qk_scale, DOT_PREC, OFF_BY_ONE)
        prob = pe / l[:, None]  # [M, S] exact chunk softmax
        dpv = tl.dot(do, vt, input_precision=DOT_PREC)  # [M, S]
        delta = tl.sum(prob * dpv, 1)  # [M] = O_j · dO of the row
        ds = prob * (dpv - delta[:, None]) * w[:, None]  # [M, S]
        if COMPUTE_DQ:
            # ∂L/∂w for the tile's pairs: delta summed over the group's heads (head blocks add up).
            dw = tl.sum(tl.reshape(delta, (BP, HB)), 1)
            pair_ok = i + pr < count
            pp = tl.load(PERM + start + i + pr, mask=pair_ok, other=0)
            tl.atomic_add(DW + pp, dw, mask=pair_ok, sem="relaxed")
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * sm_scale
            tl.store(PART + part_rows[:, None] + offs_d[None, :], dq.to(PART.dtype.element_ty),
                     mask=row_ok[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
        dv += tl.dot(tl.trans((prob * w[:, None]).to(do.dtype)), do, input_precision=DOT_PREC)

    tl.atomic_add(DK + kv_rows[:, None] + offs_d[None, :], dk * sm_scale, sem="relaxed")
    tl.atomic_add(DV + kv_rows[:, None] + offs_d[None, :], dv, sem="relaxed")


@triton.jit(do_not_specialize=["t0", "n_tok"])
def _hsa_reduce_kernel(
    PART, IDX, RANK, OUT,
    t0, n_tok, T, HKV, TOPK, G,
    stride_ob, stride_ot, stride_oh,
    D: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """OUT[b, t0 + τ, g·G + h] = Σ_j PART[RANK[b, t, g, j], h] over the token's valid slots (0 if none), for the
    ``n_tok`` tokens of one slab; grid (token blocks, B·Hkv). Rows: BT tokens × GP heads."""
    bg = tl.program_id(1)
    g = bg % HKV
    b = bg // HKV
    M: tl.constexpr = BT * GP
    r = tl.arange(0, M)
    tok = tl.program_id(0) * BT + r // GP
    head = r % GP
    row_ok = (tok < n_tok) & (head < G)
    t = (t0 + tok).to(tl.int64)
    offs_d = tl.arange(0, D)
    slot0 = ((b.to(tl.int64) * T + t) * HKV + g) * TOPK
    acc = tl.zeros([M, D], dtype=tl.float32)
    for j in tl.range(0, TOPK, num_stages=NUM_STAGES):  # stages: the next slot's loads overlap this one's
        ok = row_ok & (tl.load(IDX + slot0 + j, mask=row_ok, other=-1) >= 0)
        rank = tl.load(RANK + slot0 + j, mask=ok, other=0).to(tl.int64)
        x = tl.load(PART + (rank * G + head)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc += x.to(tl.float32)
    o_rows = b.to(tl.int64) * stride_ob + t * stride_ot + (g * G + head) * stride_oh
    tl.store(OUT + o_rows[:, None] + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------ query-major


@triton.jit
def _qm_header(Q, IDX, W, UCOUNT, T, HKV, NCHUNK, TOPK, G, n_blk, u_width, stride_qb, stride_qt, stride_qh,
               D: tl.constexpr, HB: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr):
    """What a query-major program (grid: blocks, B·Hkv, heads) works on: its query rows and their tile q [M, D],
    the [BT, KP] index/weight tiles of its tokens, and where its chunk union starts in UNION and how long it is."""
    blk = tl.program_id(0)
    bg = tl.program_id(1)
    hb = tl.program_id(2)
    g = bg % HKV
    b = bg // HKV
    M: tl.constexpr = BT * HB
    r = tl.arange(0, M)
    tok = blk * BT + r // HB
    head = hb * HB + r % HB
    row_ok = (tok < T) & (head < G)
    q_rows = b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qt + (g * G + head) * stride_qh
    # index/weight tiles of the block's tokens, [BT, KP]; empty or padded slots = -1 never match a chunk
    tt = blk * BT + tl.arange(0, BT)
    jj = tl.arange(0, KP)
    slot = ((b.to(tl.int64) * T + tt) * HKV + g)[:, None] * TOPK + jj[None, :]
    slot_ok = (tt < T)[:, None] & (jj < TOPK)[None, :]
    idx = tl.load(IDX + slot, mask=slot_ok, other=-1)
    idx = tl.where(idx >= 0, tl.minimum(idx, NCHUNK - 1), -1)
    w = tl.load(W + slot, mask=slot_ok, other=0.0).to(tl.float32)
    q = tl.load(Q + q_rows[:, None] + tl.arange(0, D)[None, :], mask=row_ok[:, None], other=0.0)
    union_start = (bg.to(tl.int64) * n_blk + blk) * u_width
    n_union = tl.load(UCOUNT + bg.to(tl.int64) * n_blk + blk)
    return b, g, q_rows, row_ok, q, idx, w, slot, slot_ok, union_start, n_union


@triton.jit
def _row_weights(idx, w, c, HB: tl.constexpr, BT: tl.constexpr):
    """[BT, KP] tiles → [BT·HB] weight of chunk c for every row (sum over the token's slots holding c)."""
    wt = tl.sum(tl.where(idx == c, w, 0.0), 1)  # [BT]
    return tl.reshape(tl.broadcast_to(wt[:, None], (BT, HB)), (BT * HB,))


@triton.jit
def _hsa_fwd_qm_kernel(
    Q, K, V, W, IDX, UNION, UCOUNT, O,
    T, HKV, NCHUNK, TOPK, G, qk_scale, n_blk, u_width,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    S: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr,
    DOT_PREC: tl.constexpr, OFF_BY_ONE: tl.constexpr,
):
    b, g, q_rows, row_ok, q, idx, w, slot, slot_ok, union_start, n_union = _qm_header(
        Q, IDX, W, UCOUNT, T, HKV, NCHUNK, TOPK, G, n_blk, u_width, stride_qb, stride_qt, stride_qh, D, HB, BT, KP)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BT * HB, D], dtype=tl.float32)
    for u in range(0, n_union):
        c = tl.load(UNION + union_start + u)
        _, k, v = _load_chunk(K, V, b.to(tl.int64), c, g, stride_kb, stride_kt, stride_kh, S, D)
        pe, l = _chunk_exp(q, tl.trans(k), qk_scale, DOT_PREC, OFF_BY_ONE)
        pw = pe * (_row_weights(idx, w, c, HB, BT) / l)[:, None]
        acc = tl.dot(pw.to(v.dtype), v, acc, input_precision=DOT_PREC)
    tl.store(O + q_rows[:, None] + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _hsa_bwd_qm_kernel(
    Q, K, V, W, IDX, UNION, UCOUNT, DO, DQ, DW,
    T, HKV, NCHUNK, TOPK, G, qk_scale, sm_scale, n_blk, u_width,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    S: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr,
    DOT_PREC: tl.constexpr, OFF_BY_ONE: tl.constexpr,
):
    b, g, q_rows, row_ok, q, idx, w, slot, slot_ok, union_start, n_union = _qm_header(
        Q, IDX, W, UCOUNT, T, HKV, NCHUNK, TOPK, G, n_blk, u_width, stride_qb, stride_qt, stride_qh, D, HB, BT, KP)
    offs_d = tl.arange(0, D)
    do = tl.load(DO + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    dq = tl.zeros([BT * HB, D], dtype=tl.float32)
    dw = tl.zeros([BT, KP], dtype=tl.float32)
    for u in range(0, n_union):
        c = tl.load(UNION + union_start + u)
        _, k, v = _load_chunk(K, V, b.to(tl.int64), c, g, stride_kb, stride_kt, stride_kh, S, D)
        pe, l = _chunk_exp(q, tl.trans(k), qk_scale, DOT_PREC, OFF_BY_ONE)
        prob = pe / l[:, None]
        dpv = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        delta = tl.sum(prob * dpv, 1)  # [M] = O_c · dO per row
        wr = _row_weights(idx, w, c, HB, BT)
        ds = prob * (dpv - delta[:, None]) * wr[:, None]
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        dsum = tl.sum(tl.reshape(delta, (BT, HB)), 1)  # [BT]: summed over the block's heads
        dw += tl.where(idx == c, dsum[:, None], 0.0)
    tl.store(DQ + q_rows[:, None] + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    # several head blocks of one group add into the same ∂L/∂w
    tl.atomic_add(DW + slot, dw, mask=slot_ok & (idx >= 0), sem="relaxed")


# ------------------------------------------------------------------------------------------------ host side


def _slab_tokens(T: int, n_slab: int) -> int:
    return -(-T // n_slab)


def _sort_pairs(idx: torch.Tensor, n_chunks: int, n_slab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx: [B, T, Hkv, K] int32 → (perm [N] int32 pair ids sorted by (slab, b, g, chunk), stable; pairs per
    (slab, bucket) [n_slab·B·Hkv·C] int64)."""
    B, T, Hkv, K = idx.shape
    dev, nb = idx.device, B * Hkv * n_chunks
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int32)  # noqa: E731
    slab_bg = ((ar(T) // _slab_tokens(T, n_slab))[None, :, None, None] * (B * Hkv)
               + ar(B)[:, None, None, None] * Hkv + ar(Hkv)[None, None, :, None])
    key = torch.where(idx >= 0, slab_bg * n_chunks + idx, n_slab * nb).reshape(-1)
    _, perm = torch.sort(key, stable=True)
    # scatter_add rather than bincount: bincount reads the largest key back to the host to size its output.
    key = key.long()
    counts = torch.zeros(n_slab * nb + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    return perm.to(torch.int32), counts[:-1]


def _cut_items(idx: torch.Tensor, n_chunks: int, n_slab: int, perm: torch.Tensor, counts: torch.Tensor,
               seg: int) -> torch.Tensor:
    """Buckets cut into items of at most ``seg`` pairs → [n_slab, 4, cap] int32 (see ``HSAPlan``)."""
    B, T, Hkv, K = idx.shape
    dev, nb = perm.device, B * Hkv * n_chunks
    # The grid is sized by a bound known on the host (every non-empty bucket of a slab adds at most one partial
    # item), so building the list never waits for the GPU; the items past the real count are empty and exit at
    # once. (Reading the count back cost a host synchronisation per forward and per backward: the GPU idled
    # while Python built the rest of the list.)
    pairs = B * _slab_tokens(T, n_slab) * Hkv * K
    cap = pairs // seg + min(nb, pairs)
    if cap == 0 or nb == 0:
        return torch.zeros(n_slab, 4, 0, dtype=torch.int32, device=dev)
    items_per = (counts + (seg - 1)) // seg
    ends = torch.cumsum(items_per, 0)
    firsts = ends - items_per
    pair_starts = torch.cumsum(counts, 0) - counts
    r = torch.arange(cap, device=dev)[None]
    real = r < items_per.view(n_slab, nb).sum(1, keepdim=True)  # [n_slab, cap]
    item = firsts.view(n_slab, nb)[:, :1] + r  # each slab's items continue from its first one
    bucket = torch.searchsorted(ends, item, right=True).clamp_(max=n_slab * nb - 1)
    rank = item - firsts[bucket]
    start = torch.where(real, pair_starts[bucket] + rank * seg, 0)
    count = torch.where(real, torch.clamp(counts[bucket] - rank * seg, max=seg), 0)
    part = start - pair_starts.view(n_slab, nb)[:, :1]
    # Launch order = first token touched: programs in flight then share query/output rows in L2 whenever
    # neighbouring tokens picked the same chunks. Empty items go last.
    first_pair = perm[start.clamp(max=max(perm.numel() - 1, 0))].long()
    first_tok = (bucket % nb // (Hkv * n_chunks)) * T + (first_pair // (Hkv * K)) % T
    order = torch.argsort(torch.where(real, first_tok, B * T), dim=1, stable=True)
    cols = [x.gather(1, order) for x in (start, count, bucket % nb, part)]
    return torch.stack(cols, 1).to(torch.int32).contiguous()


def _chunk_work(idx: torch.Tensor, n_chunks: int, n_slab: int, segs: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Everything the chunk-major passes need: (perm, ranks, items for each seg)."""
    B, T, Hkv, K = idx.shape
    perm, counts = _sort_pairs(idx, n_chunks, n_slab)
    pos = torch.empty(perm.numel(), dtype=torch.int64, device=perm.device)
    pos[perm.long()] = torch.arange(perm.numel(), device=perm.device)
    slab_starts = (torch.cumsum(counts, 0) - counts).view(n_slab, -1)[:, 0]
    base = slab_starts[torch.arange(T, device=perm.device) // _slab_tokens(T, n_slab)][None, :, None, None]
    ranks = (pos.view(B, T, Hkv, K) - base).to(torch.int32)
    return (perm, ranks, *(_cut_items(idx, n_chunks, n_slab, perm, counts, seg) for seg in segs))


def _block_union(idx: torch.Tensor, bt: int, sample: int | None) -> tuple[torch.Tensor, ...]:
    """Distinct chunks per block of bt tokens: (sorted ids [B·Hkv, n, bt·K] with −1 padding, counts [B·Hkv, n],
    [valid slots, union sizes summed]). The padding stays: kernels loop over ``counts`` only, and trimming to the
    widest block would cost a host synchronisation of its own."""
    B, T, Hkv, K = idx.shape
    n_blk = triton.cdiv(T, bt)
    x = idx.permute(0, 2, 1, 3)  # [B, Hkv, T, K]
    if n_blk * bt != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, n_blk * bt - T), value=-1)
    x = x.reshape(B * Hkv, n_blk, bt * K)
    if sample is not None and n_blk > sample:
        x = x[:, torch.linspace(0, n_blk - 1, sample, device=x.device).long()]
    x = x.sort(dim=-1, descending=True).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    n_valid = (x >= 0).sum()
    x = x.masked_fill(dup, -1).sort(dim=-1, descending=True).values
    counts = (x >= 0).sum(-1, dtype=torch.int32)
    return x, counts, torch.stack([n_valid, counts.sum()])


# Building a plan is a few dozen small tensor ops: at 128K tokens the host takes ~1.5 ms to launch them and the GPU
# ~0.5 ms to run them. On CUDA each builder is captured once per shape into a CUDA graph and replayed (the last
# ``_MAX_GRAPHS`` shapes are kept).
_MAX_GRAPHS = 16
_graphs: "OrderedDict[tuple, tuple]" = OrderedDict()


def _graphed(fn, idx: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    """fn(idx, *args) → tensors; on CUDA through a CUDA graph (fresh copies of its outputs)."""
    if not (idx.is_cuda and CONFIG["graph_plans"]) or torch.cuda.is_current_stream_capturing():
        return fn(idx, *args)
    key = (fn.__name__, tuple(idx.shape), idx.device, args)
    if key not in _graphs:
        static = idx.clone()
        side = torch.cuda.Stream(idx.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (library handles, allocator)
            fn(static, *args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a data loader pinning memory) must not break the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outs = fn(static, *args)
        _graphs[key] = (graph, static, outs)
        while len(_graphs) > _MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    graph, static, outs = _graphs[key]
    static.copy_(idx)
    graph.replay()
    return tuple(o.clone() for o in outs)


class HSAPlan:
    """What the kernels need to know about one ``indices: [B, T, Hkv, K]`` tensor, built lazily and cached.

    - ``chunk_work(n_slab, segs)``: chunk-major work lists. The tokens are cut into ``n_slab`` slabs of consecutive
      tokens (the chunk-major kernels write one partial result per pair, and a slab's partials are what one buffer
      holds, see ``_n_slabs``). → (perm, ranks, items for each seg):
      ``perm``: [N] int32 flat pair ids ``((b·T + t)·Hkv + g)·K + j`` sorted by ``(slab, b, g, chunk)``, token
      order inside, empty slots last, so each slab's pairs are one contiguous range; ``ranks``: [B, T, Hkv, K]
      int32, where each pair's partial sits in its slab's buffer (its position in ``perm`` minus the slab's start);
      ``items``: buckets cut into items of at most ``seg`` pairs → [n_slab, 4, cap] int32 (start in perm, pair
      count, bucket ``(b·Hkv + g)·C + c``, start in the slab's buffer); ``cap`` is a bound known on the host, the
      items past the real ones have count 0, and the real ones run in the order of the first token they touch.
    - ``union(bt)``: query-major work list: for each block of ``bt`` tokens and KV head, the distinct chunks its
      tokens picked → (union [B·Hkv, n_blk, bt·K] int32 padded with −1, counts [B·Hkv, n_blk] int32,
      expansion = union size / slots used per token, averaged).
    Reusable by every HSA layer that reads the same indices.
    """

    def __init__(self, indices: torch.Tensor, n_chunks: int):
        B, T, Hkv, K = indices.shape
        if indices.numel() >= 2**31 or B * Hkv * n_chunks >= 2**31 - 1:
            raise ValueError("hsa_attention_triton: more than 2^31 (token, slot) pairs or buckets is not supported")
        self.shape, self.n_chunks = (B, T, Hkv, K), n_chunks
        # clamped like the reference; int32 halves the bytes of every pass below
        idx = indices.to(torch.int32)
        self.indices = torch.where(idx >= 0, idx.clamp(max=max(n_chunks - 1, 0)), -1).contiguous()
        self._work: dict[tuple, tuple] = {}
        self._union: dict[int, tuple] = {}

    def slab_tokens(self, n_slab: int) -> int:
        return _slab_tokens(self.shape[1], n_slab)

    def chunk_work(self, n_slab: int, segs: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        if (n_slab, segs) not in self._work:
            self._work[(n_slab, segs)] = _graphed(_chunk_work, self.indices, self.n_chunks, n_slab, segs)
        return self._work[(n_slab, segs)]

    def items(self, seg: int, n_slab: int = 1) -> torch.Tensor:
        return self.chunk_work(n_slab, (seg,))[2]

    def perm(self, n_slab: int = 1) -> torch.Tensor:
        return self.chunk_work(n_slab, ())[0]

    def ranks(self, n_slab: int = 1) -> torch.Tensor:
        return self.chunk_work(n_slab, ())[1]

    def _blocks(self, bt: int, sample: int | None = None):
        x, counts, stats = _graphed(_block_union, self.indices, bt, sample)
        n_valid, total = stats.tolist()  # one host sync
        return x, counts, total * bt / max(n_valid, 1)

    def expansion(self, bt: int) -> float:
        """Distinct chunks per block of bt tokens / slots used per token (1 = the tokens share all their chunks,
        bt = they share none). Estimated on at most ``EXPANSION_SAMPLE_BLOCKS`` evenly spaced blocks (exact below
        that, or when the full union is already built), so choosing the chunk-major path never sorts all pairs by
        block."""
        if bt in self._union:
            return self._union[bt][2]
        return self._blocks(bt, sample=EXPANSION_SAMPLE_BLOCKS)[2]

    def union(self, bt: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        if bt not in self._union:
            self._union[bt] = self._blocks(bt)
        return self._union[bt]


def build_plan(indices: torch.Tensor, n_chunks: int) -> HSAPlan:
    """indices: [B, T, Hkv, K] (−1 empty) → ``HSAPlan`` (sorts happen on first use)."""
    return HSAPlan(indices, n_chunks)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (slow, exact); 16-bit inputs use the tensor cores, accumulating in fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _heads(rows: int, G: int) -> tuple[int, int, int]:
    """(HB heads per program, rows // HB, head blocks) for group size G."""
    gp = triton.next_power_of_2(G)
    hb = min(gp, rows)
    return hb, rows // hb, gp // hb


def _tiles(cfg: dict, G: int) -> tuple[int, int, int, int]:
    """Chunk-major (HB, BP pairs per tile, head blocks, seg pairs per item)."""
    hb, bp, n_hb = _heads(cfg["rows"], G)
    seg = max(bp, (cfg["seg_rows"] // hb) // bp * bp)
    return hb, bp, n_hb, seg


def _strategy(plan: HSAPlan, G: int) -> str:
    if CONFIG["strategy"] != "auto":
        return CONFIG["strategy"]
    bt = _heads(CONFIG["fwd_qm"]["rows"], G)[1]
    return "query" if plan.expansion(bt) <= CONFIG["qm_max_expansion"] else "chunk"


def _check_kernel_shapes(q: torch.Tensor, chunk_size: int) -> None:
    D = q.shape[-1]
    if D < 16 or D & (D - 1) or D > 256:
        raise ValueError(f"hsa_attention_triton needs a power-of-two head dim in [16, 256], got {D}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"hsa_attention_triton needs a power-of-two chunk_size >= 16, got {chunk_size}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"hsa_attention_triton supports fp32/fp16/bf16, got {q.dtype}")


def _common_args(q, k, weights, chunk_size):
    return (q.shape[1], k.shape[2], k.shape[1] // chunk_size, weights.shape[-1], q.shape[2] // k.shape[2])


def _n_slabs(plan: HSAPlan, G: int, D: int, dtype: torch.dtype) -> int:
    """How many token slabs the chunk-major passes take, so that one slab's partials (a [G, D] block per
    (token, slot) pair, in ``dtype``) fit in ``CONFIG["partial_budget"]`` × the bytes of an fp32 output (what an
    atomic accumulator would take), or ``_MIN_PARTIAL_BYTES`` if that is more."""
    B, T, Hkv, K = plan.shape
    if T == 0:
        return 1
    total = B * T * Hkv * K * G * D * (torch.finfo(dtype).bits // 8)
    budget = max(int(CONFIG["partial_budget"] * B * T * Hkv * G * D * 4), _MIN_PARTIAL_BYTES, 1)
    n = min(-(-total // budget), T)
    n = -(-T // plan.slab_tokens(n))  # no empty slab
    return max(1, min(n, (2**31 - 2) // max(B * Hkv * plan.n_chunks, 1)))  # the sort key stays an int32


def _slabs(plan: HSAPlan, cfg: dict, G: int, D: int, out: torch.Tensor | None, launch) -> None:
    """Run one chunk-major kernel slab by slab: ``launch(grid, items, perm, part, HB, BP)`` for each slab. With
    ``out`` ([B, T, Hq, D]) every pair writes its [G, D] part into ``part`` and a second pass adds up each token's
    parts into ``out``: plain stores of 16-bit parts instead of fp32 atomics on rows spread over the whole
    output (half the bytes, no zero fill, no cast)."""
    B, T, Hkv, K = plan.shape
    hb, bp, n_hb, seg = _tiles(cfg, G)
    n_slab = 1 if out is None else _n_slabs(plan, G, D, out.dtype)
    segs = tuple(_tiles(CONFIG[pas], G)[3] for pas in ("fwd", "bwd"))  # one plan serves both passes
    perm, ranks, *items = plan.chunk_work(n_slab, segs)
    items = items[segs.index(seg)]
    slab = plan.slab_tokens(n_slab)
    part = None if out is None else torch.empty(B * slab * Hkv * K * G * D, device=perm.device, dtype=out.dtype)
    gp = triton.next_power_of_2(G)
    red = CONFIG["reduce"]
    bt = max(1, red["rows"] // gp)
    for s in range(n_slab):
        if items.shape[2]:
            launch((items.shape[2], n_hb), items[s], perm, part, hb, bp)
        if out is not None:
            n_tok = min(slab, T - s * slab)
            _hsa_reduce_kernel[(triton.cdiv(n_tok, bt), B * Hkv)](
                part, plan.indices, ranks, out,
                s * slab, n_tok, T, Hkv, K, G, out.stride(0), out.stride(1), out.stride(2),
                D=D, GP=gp, BT=bt, NUM_STAGES=red["num_stages"], num_warps=red["num_warps"],
            )


def _forward(q, k, v, weights, plan: HSAPlan, chunk_size: int, sm_scale: float, strategy: str,
             off_by_one: bool = False):
    B, T, Hq, D = q.shape
    _, Hkv, C, K, G = _common_args(q, k, weights, chunk_size)
    prec = _dot_precision(q.dtype)
    o = torch.empty_like(q)
    if strategy == "query":
        cfg = CONFIG["fwd_qm"]
        hb, bt, n_hb = _heads(cfg["rows"], G)
        union, counts, _ = plan.union(bt)
        _hsa_fwd_qm_kernel[(counts.shape[1], B * Hkv, n_hb)](
            q, k, v, weights, plan.indices, union, counts, o,
            T, Hkv, C, K, G, sm_scale * _LOG2E, counts.shape[1], union.shape[2],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            S=chunk_size, D=D, HB=hb, BT=bt, KP=triton.next_power_of_2(K), DOT_PREC=prec, OFF_BY_ONE=off_by_one,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return o
    cfg = CONFIG["fwd"]

    def launch(grid, items, perm, part, hb, bp):
        _hsa_fwd_kernel[grid](
            q, k, v, weights, perm, items, part,
            items.shape[1], T, Hkv, C, K, G, sm_scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            S=chunk_size, D=D, HB=hb, BP=bp, DOT_PREC=prec, OFF_BY_ONE=off_by_one,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    _slabs(plan, cfg, G, D, o, launch)
    return o


def _backward(q, k, v, weights, do, plan: HSAPlan, chunk_size: int, sm_scale: float, strategy: str,
              off_by_one: bool = False):
    """→ dq, dk, dv, dw (dq in q.dtype, dk/dv/dw fp32)."""
    B, T, Hq, D = q.shape
    _, Hkv, C, K, G = _common_args(q, k, weights, chunk_size)
    prec = _dot_precision(q.dtype)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    dv = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    dw = torch.zeros(weights.shape, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    query = strategy == "query"
    if query:
        cfg = CONFIG["bwd_qm"]
        hb, bt, n_hb = _heads(cfg["rows"], G)
        union, counts, _ = plan.union(bt)
        _hsa_bwd_qm_kernel[(counts.shape[1], B * Hkv, n_hb)](
            q, k, v, weights, plan.indices, union, counts, do, dq, dw,
            T, Hkv, C, K, G, sm_scale * _LOG2E, sm_scale, counts.shape[1], union.shape[2],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            S=chunk_size, D=D, HB=hb, BT=bt, KP=triton.next_power_of_2(K), DOT_PREC=prec, OFF_BY_ONE=off_by_one,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    cfg = CONFIG["bwd"]

    def launch(grid, items, perm, part, hb, bp):
        _hsa_bwd_kernel[grid](
            q, k, v, weights, do, perm, items, dk if part is None else part, dk, dv, dw,
            items.shape[1], T, Hkv, C, K, G, sm_scale * _LOG2E, sm_scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            S=chunk_size, D=D, HB=hb, BP=bp, COMPUTE_DQ=not query, DOT_PREC=prec, OFF_BY_ONE=off_by_one,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    _slabs(plan, cfg, G, D, None if query else dq, launch)
    return dq, dk, dv, dw


class _HSATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weights, indices, chunk_size, sm_scale, plan, off_by_one):
        if plan is None:
            plan = build_plan(indices, k.shape[1] // chunk_size)
        strategy = _strategy(plan, q.shape[2] // k.shape[2])
        o = _forward(q, k, v, weights, plan, chunk_size, sm_scale, strategy, off_by_one)
        ctx.save_for_backward(q, k, v, weights)
        ctx.plan, ctx.chunk_size, ctx.sm_scale, ctx.strategy = plan, chunk_size, sm_scale, strategy
        ctx.off_by_one = off_by_one
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, weights = ctx.saved_tensors
        dq, dk, dv, dw = _backward(
            q, k, v, weights, do.contiguous(), ctx.plan, ctx.chunk_size, ctx.sm_scale, ctx.strategy, ctx.off_by_one
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(weights.dtype), None, None, None, None, None


def hsa_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int = 64,
    sm_scale: float | None = None,
    plan: HSAPlan | None = None,
    off_by_one: bool = False,
) -> torch.Tensor:
    """Triton HSA. q: [B, T, Hq, D], k/v: [B, Tk, Hkv, D], weights/indices: [B, T, Hkv, K] → o: [B, T, Hq, D].

    Same math as ``reference.hsa_attention_reference``; differentiable in q, k, v and weights (fp32 atomics
    accumulate parts of the results, so the low bits may vary between runs). ``plan``: a
    ``build_plan(indices, Tk // S)`` to share across layers that read the same indices (optional). Runs on CUDA,
    or on CPU under ``TRITON_INTERPRET=1``.
    """
    check_hsa_inputs(q, k, v, weights, indices, chunk_size)
    _check_kernel_shapes(q, chunk_size)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _HSATriton.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), weights.contiguous(), indices, chunk_size, scale, plan,
        off_by_one,
    )
