"""Triton forward and backward kernels for ``hsa_attention`` (spec §4).

Math (``reference.hsa_attention_reference`` is the definition)::

    o[b,t,h] = Σ_j w[b,t,g,j] · softmax_c(q[b,t,h] · K_c^T · scale) · V_c,   c = indices[b,t,g,j], g = h // G

Every chunk has its own complete softmax over its ``S`` keys and the fusion weights are inputs, so ``o`` is a plain
weighted sum of per-(token, slot) results: no online rescaling across chunks is needed, the softmax of a chunk is
recomputed exactly in the backward (no log-sum-exp is stored), and the work can be cut along chunks or along
queries. Two strategies, chosen per call from the indices:

- **chunk-major** (any index layout; the only one for tokens that pick unrelated chunks). One stable sort of the
  flat (token, slot) pair ids by bucket ``(b, g, chunk)`` lists the pairs that selected each chunk; buckets are
  cut into *items* of at most ``seg`` pairs, launched in the order of the first token they touch. A program loads
  its chunk's K/V once and loops over its pairs in tiles of ``BP`` pairs × ``HB`` query heads of the group
  (``BP·HB`` = 64 rows, so ``tl.dot`` always has ≥ 16 rows whatever the head ratio: the authors' 16:1 limit
  disappears). Forward adds ``w · softmax · V`` into an fp32 output with atomics. Backward, per tile:
  ``dPv = dO·V^T``, ``Δ = rowsum(P ⊙ dPv)`` (= ``O_j·dO``, summed over the group's heads it is ``∂L/∂w_j``),
  ``dS = w·P⊙(dPv − Δ)``, ``dq += scale·dS·K`` (fp32 atomics), while ``dK += scale·dS^T·q`` and
  ``dV += (w·P)^T·dO`` stay in registers over the item and are added once per item.
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

import torch
import triton
import triton.language as tl

from .reference import check_hsa_inputs

__all__ = ["hsa_attention_triton", "build_plan", "HSAPlan", "CONFIG"]

# Tiles and strategy; the benchmark overrides them to tune. ``rows``: rows (pairs or tokens × heads) per tile;
# ``seg_rows``: about how many rows one chunk-major program handles before the next one takes over the bucket.
# Up to this many (token, slot) pairs (1M tokens × 16 slots) the strategy choice sorts every block's union (exact,
# reused by the query-major kernels); above it, a sample of blocks decides.
FULL_UNION_MAX_PAIRS = 1 << 24

CONFIG = {
    "strategy": "auto",  # "auto" | "chunk" | "query"
    "qm_max_expansion": 2.0,
    "fwd": {"rows": 64, "seg_rows": 256, "num_warps": 4, "num_stages": 1},
    "bwd": {"rows": 128, "seg_rows": 2048, "num_warps": 8, "num_stages": 2},
    "fwd_qm": {"rows": 64, "num_warps": 4, "num_stages": 2},
    "bwd_qm": {"rows": 64, "num_warps": 4, "num_stages": 2},
}

_LOG2E = 1.4426950408889634


@triton.jit
def _load_chunk(K, V, b64, c, g, stride_kb, stride_kt, stride_kh, S: tl.constexpr, D: tl.constexpr):
    """Chunk c of KV head g: (row offsets [S], k [S, D], v [S, D])."""
    offs_d = tl.arange(0, D)
    kv_rows = b64 * stride_kb + (c * S + tl.arange(0, S)).to(tl.int64) * stride_kt + g * stride_kh
    k = tl.load(K + kv_rows[:, None] + offs_d[None, :])
    v = tl.load(V + kv_rows[:, None] + offs_d[None, :])
    return kv_rows, k, v


@triton.jit
def _chunk_exp(q, kt, qk_scale, DOT_PREC: tl.constexpr):
    """Unnormalised softmax of every row over the chunk's S keys: q [M, D], kt [D, S] → (exp [M, S], row sums [M]),
    so a row's probabilities are exp / sums (fp32)."""
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # log2 domain
    pe = tl.math.exp2(s - tl.max(s, 1)[:, None])
    return pe, tl.sum(pe, 1)


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
    c = bucket % NCHUNK
    bg = bucket // NCHUNK
    g = bg % HKV
    b = bg // HKV
    return start, count, c, g, b


@triton.jit(do_not_specialize=["n_items"])
def _hsa_fwd_kernel(
    Q, K, V, W, PERM, ITEMS, OACC,
    n_items, T, HKV, NCHUNK, TOPK, G, qk_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    S: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, BP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    start, count, c, g, b = _item_header(ITEMS, n_items, NCHUNK, HKV)
    if count == 0:  # padding of the work list (its length is a bound, see HSAPlan._cut)
        return
    hb = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, D)
    _, k, v = _load_chunk(K, V, b64, c, g, stride_kb, stride_kt, stride_kh, S, D)  # k, v: [S, D]
    kt = tl.trans(k)

    M: tl.constexpr = BP * HB
    r = tl.arange(0, M)
    rp = r // HB  # pair of the row inside the tile
    head = hb * HB + r % HB  # query head inside the group
    head_ok = head < G
    for i in range(0, count, BP):
        row_ok = (i + rp < count) & head_ok
        p = tl.load(PERM + start + i + rp, mask=row_ok, other=0)
        t = (p // (TOPK * HKV)) % T
        w = tl.load(W + p, mask=row_ok, other=0.0).to(tl.float32)
        q_rows = b64 * stride_qb + t.to(tl.int64) * stride_qt + (g * G + head) * stride_qh
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        pe, l = _chunk_exp(q, kt, qk_scale, DOT_PREC)
        pw = pe * (w / l)[:, None]  # [M, S] weight · softmax
        o = tl.dot(pw.to(v.dtype), v, input_precision=DOT_PREC)  # [M, D]
        tl.atomic_add(OACC + q_rows[:, None] + offs_d[None, :], o, mask=row_ok[:, None], sem="relaxed")


@triton.jit(do_not_specialize=["n_items"])
def _hsa_bwd_kernel(
    Q, K, V, W, DO, PERM, ITEMS, DQ, DK, DV, DW,
    n_items, T, HKV, NCHUNK, TOPK, G, qk_scale, sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    S: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, BP: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    start, count, c, g, b = _item_header(ITEMS, n_items, NCHUNK, HKV)
    if count == 0:  # padding of the work list
        return
    hb = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, D)
    kv_rows, k, v = _load_chunk(K, V, b64, c, g, stride_kb, stride_kt, stride_kh, S, D)  # k, v: [S, D]
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([S, D], dtype=tl.float32)
    dv = tl.zeros([S, D], dtype=tl.float32)

    M: tl.constexpr = BP * HB
    r = tl.arange(0, M)
    rp = r // HB
    head = hb * HB + r % HB
    head_ok = head < G
    pr = tl.arange(0, BP)
    for i in range(0, count, BP):
        row_ok = (i + rp < count) & head_ok
        p = tl.load(PERM + start + i + rp, mask=row_ok, other=0)
        t = (p // (TOPK * HKV)) % T
        w = tl.load(W + p, mask=row_ok, other=0.0).to(tl.float32)
        q_rows = b64 * stride_qb + t.to(tl.int64) * stride_qt + (g * G + head) * stride_qh
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)

        pe, l = _chunk_exp(q, kt, qk_scale, DOT_PREC)
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
            tl.atomic_add(DQ + q_rows[:, None] + offs_d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
        dv += tl.dot(tl.trans((prob * w[:, None]).to(do.dtype)), do, input_precision=DOT_PREC)

    tl.atomic_add(DK + kv_rows[:, None] + offs_d[None, :], dk * sm_scale, sem="relaxed")
    tl.atomic_add(DV + kv_rows[:, None] + offs_d[None, :], dv, sem="relaxed")


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
    DOT_PREC: tl.constexpr,
):
    b, g, q_rows, row_ok, q, idx, w, slot, slot_ok, union_start, n_union = _qm_header(
        Q, IDX, W, UCOUNT, T, HKV, NCHUNK, TOPK, G, n_blk, u_width, stride_qb, stride_qt, stride_qh, D, HB, BT, KP)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BT * HB, D], dtype=tl.float32)
    for u in range(0, n_union):
        c = tl.load(UNION + union_start + u)
        _, k, v = _load_chunk(K, V, b.to(tl.int64), c, g, stride_kb, stride_kt, stride_kh, S, D)
        pe, l = _chunk_exp(q, tl.trans(k), qk_scale, DOT_PREC)
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
    DOT_PREC: tl.constexpr,
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
        pe, l = _chunk_exp(q, tl.trans(k), qk_scale, DOT_PREC)
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


class HSAPlan:
    """What the kernels need to know about one ``indices: [B, T, Hkv, K]`` tensor, built lazily and cached.

    - ``items(seg)``: chunk-major work list. ``perm``: [N_valid] int32 flat pair ids ``((b·T + t)·Hkv + g)·K + j``
      sorted by bucket ``(b·Hkv + g)·C + c`` (token order inside a bucket); the buckets cut into items of at most
      ``seg`` pairs → [3, n_items] int32 (start in perm, pair count, bucket), in launch order; ``n_items`` is an
      upper bound known on the host, and the items past the real ones have count 0.
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
        self._perm = self._counts = None
        self._items: dict[int, torch.Tensor] = {}
        self._union: dict[int, tuple] = {}

    def _sort(self):
        B, T, Hkv, K = self.shape
        dev, nb = self.indices.device, B * Hkv * self.n_chunks
        bg = (torch.arange(B, device=dev, dtype=torch.int32)[:, None, None, None] * Hkv
              + torch.arange(Hkv, device=dev, dtype=torch.int32)[None, None, :, None])
        key = torch.where(self.indices >= 0, bg * self.n_chunks + self.indices, nb).reshape(-1)
        _, perm = torch.sort(key, stable=True)
        # scatter_add rather than bincount: bincount reads the largest key back to the host to size its output.
        key = key.long()
        self._counts = torch.zeros(nb + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:nb]
        self._perm = perm.to(torch.int32)

    @property
    def perm(self) -> torch.Tensor:
        if self._perm is None:
            self._sort()
        return self._perm

    def items(self, seg: int) -> torch.Tensor:
        if seg not in self._items:
            self._items[seg] = self._cut(seg)
        return self._items[seg]

    def _cut(self, seg: int) -> torch.Tensor:
        B, T, Hkv, K = self.shape
        perm = self.perm
        counts, dev = self._counts, perm.device
        # The grid is sized by a bound known on the host (every non-empty bucket adds at most one partial item), so
        # building the list never waits for the GPU; the items past the real count are empty and exit at once.
        # (Reading the count back cost a host synchronisation per forward and per backward: the GPU idled while
        # Python built the rest of the list.)
        cap = perm.numel() // seg + min(counts.numel(), perm.numel())
        if cap == 0:
            return torch.zeros(3, 0, dtype=torch.int32, device=dev)
        items_per = (counts + (seg - 1)) // seg
        ends = torch.cumsum(items_per, 0)
        item = torch.arange(cap, device=dev)
        real = item < ends[-1]
        item_bucket = torch.searchsorted(ends, item, right=True).clamp_(max=counts.numel() - 1)
        rank = item - (ends - items_per)[item_bucket]
        item_start = (torch.cumsum(counts, 0) - counts)[item_bucket] + rank * seg
        item_count = torch.where(real, torch.clamp(counts[item_bucket] - rank * seg, max=seg), 0)
        item_start = torch.where(real, item_start, 0)
        # Launch order = first token touched: programs in flight then share query/output rows in L2 whenever
        # neighbouring tokens picked the same chunks. Empty items go last.
        first_pair = perm[item_start].long()
        first_tok = (item_bucket // (Hkv * self.n_chunks)) * T + (first_pair // (Hkv * K)) % T
        order = torch.argsort(torch.where(real, first_tok, B * T), stable=True)
        return torch.stack([item_start[order], item_count[order], item_bucket[order]]).to(torch.int32).contiguous()

    def _blocks(self, bt: int, sample: int | None = None):
        """Distinct chunks per block of bt tokens: (sorted ids [B·Hkv, n, bt·K] with −1 padding, counts, expansion).
        The padding stays: kernels loop over ``counts`` only, and trimming to the widest block would cost a host
        synchronisation of its own."""
        B, T, Hkv, K = self.shape
        n_blk = triton.cdiv(T, bt)
        x = self.indices.permute(0, 2, 1, 3)  # [B, Hkv, T, K]
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
        n_valid, total = torch.stack([n_valid, counts.sum()]).tolist()  # one host sync
        return x, counts, total * bt / max(n_valid, 1)

    def expansion(self, bt: int) -> float:
        """Distinct chunks per block of bt tokens / slots used per token (1 = the tokens share all their chunks,
        bt = they share none). Up to ``FULL_UNION_MAX_PAIRS`` (token, slot) pairs it is exact and the union it
        measured is kept for the query-major kernels (one host sync serves both); above, it is estimated on 2048
        evenly spaced blocks, so choosing the chunk-major path never sorts all pairs by block."""
        if bt not in self._union and self.indices.numel() > FULL_UNION_MAX_PAIRS:
            return self._blocks(bt, sample=2048)[2]
        return self.union(bt)[2]

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


def _forward(q, k, v, weights, plan: HSAPlan, chunk_size: int, sm_scale: float, strategy: str):
    B, T, Hq, D = q.shape
    _, Hkv, C, K, G = _common_args(q, k, weights, chunk_size)
    prec = _dot_precision(q.dtype)
    if strategy == "query":
        cfg = CONFIG["fwd_qm"]
        hb, bt, n_hb = _heads(cfg["rows"], G)
        union, counts, _ = plan.union(bt)
        o = torch.empty_like(q)
        _hsa_fwd_qm_kernel[(counts.shape[1], B * Hkv, n_hb)](
            q, k, v, weights, plan.indices, union, counts, o,
            T, Hkv, C, K, G, sm_scale * _LOG2E, counts.shape[1], union.shape[2],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            S=chunk_size, D=D, HB=hb, BT=bt, KP=triton.next_power_of_2(K), DOT_PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return o
    o_acc = torch.zeros(B, T, Hq, D, device=q.device, dtype=torch.float32)
    cfg = CONFIG["fwd"]
    hb, bp, n_hb, seg = _tiles(cfg, G)
    items = plan.items(seg)
    if items.shape[1]:
        _hsa_fwd_kernel[(items.shape[1], n_hb)](
            q, k, v, weights, plan.perm, items, o_acc,
            items.shape[1], T, Hkv, C, K, G, sm_scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            S=chunk_size, D=D, HB=hb, BP=bp, DOT_PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return o_acc if q.dtype == torch.float32 else o_acc.to(q.dtype)


def _backward(q, k, v, weights, do, plan: HSAPlan, chunk_size: int, sm_scale: float, strategy: str):
    """→ dq, dk, dv, dw (dq/dw fp32 or q.dtype, dk/dv fp32)."""
    B, T, Hq, D = q.shape
    _, Hkv, C, K, G = _common_args(q, k, weights, chunk_size)
    prec = _dot_precision(q.dtype)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    dv = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    dw = torch.zeros(weights.shape, device=q.device, dtype=torch.float32)
    query = strategy == "query"
    if query:
        cfg = CONFIG["bwd_qm"]
        hb, bt, n_hb = _heads(cfg["rows"], G)
        union, counts, _ = plan.union(bt)
        dq = torch.empty_like(q)
        _hsa_bwd_qm_kernel[(counts.shape[1], B * Hkv, n_hb)](
            q, k, v, weights, plan.indices, union, counts, do, dq, dw,
            T, Hkv, C, K, G, sm_scale * _LOG2E, sm_scale, counts.shape[1], union.shape[2],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            S=chunk_size, D=D, HB=hb, BT=bt, KP=triton.next_power_of_2(K), DOT_PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    else:
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    cfg = CONFIG["bwd"]
    hb, bp, n_hb, seg = _tiles(cfg, G)
    items = plan.items(seg)
    if items.shape[1]:
        _hsa_bwd_kernel[(items.shape[1], n_hb)](
            q, k, v, weights, do, plan.perm, items, dq, dk, dv, dw,
            items.shape[1], T, Hkv, C, K, G, sm_scale * _LOG2E, sm_scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            S=chunk_size, D=D, HB=hb, BP=bp, COMPUTE_DQ=not query, DOT_PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return dq, dk, dv, dw


class _HSATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weights, indices, chunk_size, sm_scale, plan):
        if plan is None:
            plan = build_plan(indices, k.shape[1] // chunk_size)
        strategy = _strategy(plan, q.shape[2] // k.shape[2])
        o = _forward(q, k, v, weights, plan, chunk_size, sm_scale, strategy)
        ctx.save_for_backward(q, k, v, weights)
        ctx.plan, ctx.chunk_size, ctx.sm_scale, ctx.strategy = plan, chunk_size, sm_scale, strategy
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, weights = ctx.saved_tensors
        dq, dk, dv, dw = _backward(
            q, k, v, weights, do.contiguous(), ctx.plan, ctx.chunk_size, ctx.sm_scale, ctx.strategy
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(weights.dtype), None, None, None, None


def hsa_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int = 64,
    sm_scale: float | None = None,
    plan: HSAPlan | None = None,
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
        q.contiguous(), k.contiguous(), v.contiguous(), weights.contiguous(), indices, chunk_size, scale, plan
    )
