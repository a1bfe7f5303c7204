"""The matrix-vector products of a decoding step, each fused with the work around it (``reference.py`` defines them:
``qkv_rope_reference``, ``gemv_reference``).

With one token per sequence a block's projections are matrix-vector products: each reads its weight once and does
almost nothing else, so at batch 1 a step is bound by how many kernels it launches, and how long each takes to reach
full bandwidth, not by arithmetic. Written as tensor operations (even compiled by inductor) a dense block's step is
about ten kernels: norm, three projections, the q/k norms and RoPE, attention, the output projection, residual and
norm, gate/up, down. Two kernels here cover every projection of such a block:

- ``qkv_rope``: RMSNorm(x) → q, k, v projections → per-head RMSNorm of q and k → RoPE, one program per output head
  (the head's norm and rotation need all of its D outputs, which one program holds);
- ``gemv``: y = [residual +] W·n(x), or silu(W_gate·n(x)) * (W_up·n(x)), n = RMSNorm or identity, the output rows
  split over programs. Each program recomputes the input's norm (d values: cheaper than a kernel of its own).

So a dense block's step is five kernels: ``gemv`` of the stacked q/k/v projections (the ring kernel then applies
the head norms and RoPE: ``norm_rope_rows``; ``qkv_rope`` where another attention follows), attention, ``gemv``
(o_proj + residual), ``gemv`` (norm, gate, up, SwiGLU), ``gemv`` (down + residual). ``rope_cos_sin`` and
``write_slot`` save a step's launches around the blocks. Weights are ``nn.Linear``'s ``[out, in]``, contiguous;
products accumulate in fp32; outputs take the input's dtype (the residual's where one is added).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_args, wait_for_inputs

__all__ = ["qkv_rope", "gemv", "rope_cos_sin", "write_slot"]


@triton.jit
def _load_x(X, cols, ok, parts, stride_xp):
    """The input at ``cols`` in fp32: the sum of ``parts`` rows ``stride_xp`` apart (partial results of a split
    computation, e.g. HSA's chunk ranges), usually one."""
    x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
    for p in range(1, parts):
        x += tl.load(X + p * stride_xp + cols, mask=ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def rms_rstd(X, K, eps, BK: tl.constexpr, parts=1, stride_xp=0):
    """1 / RMS of the K input values at X (fp32)."""
    acc = tl.zeros([BK], tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = _load_x(X, cols, cols < K, parts, stride_xp)
        acc += x * x
    return tl.rsqrt(tl.sum(acc, 0) / K + eps)


@triton.jit
def _input_tile(X, NW, cols, ok, rstd, NORM: tl.constexpr, parts=1, stride_xp=0):
    """The input values at ``cols`` in fp32, RMS-normalised with weight NW when NORM."""
    x = _load_x(X, cols, ok, parts, stride_xp)
    if NORM:
        x = x * rstd * tl.load(NW + cols, mask=ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _qkv_rope_kernel(
    X, NW, WQ, WK, WV, QNW, KNW, COS, SIN, Q, KO, VO,
    K, HQ, HKV, eps, stride_xb,
    D: tl.constexpr, BK: tl.constexpr, HEAD_NORM: tl.constexpr, PDL: tl.constexpr,
):
    head = tl.program_id(0)  # 0..HQ-1: query heads, then HKV key heads, then HKV value heads
    b = tl.program_id(1)
    X += b.to(tl.int64) * stride_xb
    is_q = head < HQ
    is_v = head >= HQ + HKV
    if is_q:
        w = WQ + head.to(tl.int64) * D * K
        out = Q + (b * HQ + head).to(tl.int64) * D
        head_w = QNW
    elif is_v:
        w = WV + (head - HQ - HKV).to(tl.int64) * D * K
        out = VO + (b * HKV + head - HQ - HKV).to(tl.int64) * D
        head_w = KNW
    else:
        w = WK + (head - HQ).to(tl.int64) * D * K
        out = KO + (b * HKV + head - HQ).to(tl.int64) * D
        head_w = KNW
    # the two halves of the head apart: RoPE (GPT-NeoX layout) rotates dim i with dim i + D/2
    half = tl.arange(0, D // 2)
    rows1 = w + half[:, None] * K
    rows2 = w + (half + D // 2)[:, None] * K
    cols = tl.arange(0, BK)
    w1 = tl.load(rows1 + cols[None, :], mask=(cols < K)[None, :], other=0.0)  # weights first: see kernels.decode.pdl
    w2 = tl.load(rows2 + cols[None, :], mask=(cols < K)[None, :], other=0.0)
    wait_for_inputs(PDL)
    rstd = rms_rstd(X, K, eps, BK)
    y1 = tl.zeros([D // 2], tl.float32)
    y2 = tl.zeros([D // 2], tl.float32)
    for k0 in range(0, K, BK):  # w1, w2 hold the tile at k0; the next one is loaded before this one is reduced
        cols = k0 + tl.arange(0, BK)
        nxt = cols + BK
        n1 = tl.load(rows1 + nxt[None, :], mask=(nxt < K)[None, :], other=0.0)
        n2 = tl.load(rows2 + nxt[None, :], mask=(nxt < K)[None, :], other=0.0)
        x = _input_tile(X, NW, cols, cols < K, rstd, True)[None, :]
        y1 += tl.sum(w1.to(tl.float32) * x, 1)
        y2 += tl.sum(w2.to(tl.float32) * x, 1)
        w1, w2 = n1, n2
    if not is_v:
        if HEAD_NORM:
            r = tl.rsqrt((tl.sum(y1 * y1, 0) + tl.sum(y2 * y2, 0)) / D + eps)
            y1 = y1 * r * tl.load(head_w + half).to(tl.float32)
            y2 = y2 * r * tl.load(head_w + D // 2 + half).to(tl.float32)
        c = tl.load(COS + half)
        s = tl.load(SIN + half)
        y1, y2 = y1 * c - y2 * s, y2 * c + y1 * s
    tl.store(out + half, y1.to(out.dtype.element_ty))
    tl.store(out + D // 2 + half, y2.to(out.dtype.element_ty))


@triton.jit
def head_norm_weights(NW, D: tl.constexpr, LOAD: tl.constexpr):
    """A per-head norm's weight [D] in fp32, and the same with its halves swapped (``norm_rope_rows``); zeros
    unless LOAD."""
    cols = tl.arange(0, D)
    if LOAD:
        return tl.load(NW + cols).to(tl.float32), tl.load(NW + (cols + D // 2) % D).to(tl.float32)
    return tl.zeros([D], tl.float32), tl.zeros([D], tl.float32)


@triton.jit
def norm_rope_rows(X, rows, ok, nw, nw_swapped, COS, SIN, eps, D: tl.constexpr, HEAD_NORM: tl.constexpr):
    """Per-head RMSNorm (weight nw [D] fp32 and its halves swapped, from ``head_norm_weights``; when HEAD_NORM)
    and RoPE (COS, SIN [D/2] fp32, GPT-NeoX layout) of the heads at X + rows [R] (D contiguous values each; rows
    not ``ok`` read as zeros) → [R, D] fp32. Each head is read
    twice, the second time with its halves swapped, so the rotation is elementwise in the layout the caller goes on
    with (no shuffle of registers between halves)."""
    cols = tl.arange(0, D)
    swapped = (cols + D // 2) % D
    x = tl.load(X + rows[:, None] + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    xs = tl.load(X + rows[:, None] + swapped[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if HEAD_NORM:
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        x = x * r * nw[None, :]
        xs = xs * r * nw_swapped[None, :]
    c = tl.load(COS + cols % (D // 2))[None, :]
    s = tl.load(SIN + cols % (D // 2))[None, :]
    return x * c + tl.where(cols < D // 2, -1.0, 1.0)[None, :] * xs * s  # x1·c − x2·s | x2·c + x1·s


@triton.jit
def _rope_table_kernel(POS, INV_FREQ, COS, SIN, HALF, BH: tl.constexpr, PDL: tl.constexpr):
    i = tl.arange(0, BH)
    ok = i < HALF
    freq = tl.load(INV_FREQ + i, mask=ok, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    angle = tl.load(POS).to(tl.float32) * freq  # the fp32 angle ``Rotary.cos_sin`` computes
    # Triton's cos/sin are the GPU's approximate instructions, accurate only near 0: the angle (up to millions of
    # radians) is first reduced to [-pi, pi] in fp64, where 2pi's rounding error times the turns stays below 1e-9.
    a = angle.to(tl.float64)
    r = (a - tl.floor(a * 0.15915494309189535 + 0.5) * 6.283185307179586).to(tl.float32)
    tl.store(COS + i, tl.cos(r), mask=ok)
    tl.store(SIN + i, tl.sin(r), mask=ok)


@triton.jit
def _weight_rows(W1, W2, W3, rows, N1, N2, K, STACKED: tl.constexpr):
    """Pointers to the weight rows ``rows`` [BN] (then [BN, 1]): of W1, or with STACKED of the matrices W1 (N1 rows),
    W2 (N2 rows), W3 stacked."""
    r = rows.to(tl.int64)
    if STACKED:
        ptr = tl.where(r < N1, W1 + r * K, tl.where(r < N1 + N2, W2 + (r - N1) * K, W3 + (r - N1 - N2) * K))
    else:
        ptr = W1 + r * K
    return ptr[:, None]


@triton.jit
def _gemv_kernel(
    X, NW, W1, W2, W3, RES, Y,
    N, K, N1, N2, eps, stride_xb, stride_rb, stride_yb, parts, stride_xp,
    BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, STACKED: tl.constexpr,
    RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    X += b * stride_xb
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    w_rows = _weight_rows(W1, W2, W3, rows, N1, N2, K, STACKED)  # [BN, 1] pointers
    up_rows = W2 + rows.to(tl.int64)[:, None] * K  # GATED: the up projection's
    cols = tl.arange(0, BK)
    tile_ok = row_ok[:, None] & (cols < K)[None, :]
    w1 = tl.load(w_rows + cols[None, :], mask=tile_ok, other=0.0)  # weights first: see kernels.decode.pdl
    w2 = w1
    if GATED:
        w2 = tl.load(up_rows + cols[None, :], mask=tile_ok, other=0.0)
    wait_for_inputs(PDL)
    rstd = 1.0
    if NORM:
        rstd = rms_rstd(X, K, eps, BK, parts, stride_xp)
    y1 = tl.zeros([BN], tl.float32)
    y2 = tl.zeros([BN], tl.float32)
    for k0 in range(0, K, BK):  # w1 (w2) hold the tile at k0; the next one is loaded before this one is reduced
        cols = k0 + tl.arange(0, BK)
        nxt = cols + BK
        nxt_ok = row_ok[:, None] & (nxt < K)[None, :]
        n1 = tl.load(w_rows + nxt[None, :], mask=nxt_ok, other=0.0)
        n2 = n1
        if GATED:
            n2 = tl.load(up_rows + nxt[None, :], mask=nxt_ok, other=0.0)
        x = _input_tile(X, NW, cols, cols < K, rstd, NORM, parts, stride_xp)[None, :]
        y1 += tl.sum(w1.to(tl.float32) * x, 1)
        if GATED:
            y2 += tl.sum(w2.to(tl.float32) * x, 1)
        w1, w2 = n1, n2
    y = y1
    if GATED:
        y = y1 * tl.sigmoid(y1) * y2  # silu(gate) * up
    if RESIDUAL:
        y += tl.load(RES + b * stride_rb + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + b * stride_yb + rows, y.to(Y.dtype.element_ty), mask=row_ok)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_weights(name: str, K: int, *weights: torch.Tensor) -> None:
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K or not w.is_contiguous():
            raise ValueError(f"{name}: weights must be contiguous [out, {K}], got {tuple(w.shape)} "
                             f"(contiguous={w.is_contiguous()})")


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, K] or [B, K] → [B, K] with unit stride along K."""
    x = x.reshape(x.shape[0], x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def qkv_rope(x: torch.Tensor, norm_w: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
             q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, 1, d] (one token per sequence); norm_w [d]; wq [Hq·D, d], wk, wv [Hkv·D, d]; q/k_norm_w [D] or None
    (no per-head norm); cos, sin [1, D/2] (fp32, the token's position) → q [B, 1, Hq, D], k, v [B, 1, Hkv, D] in
    x's dtype: q = rope(n_q(wq·n(x))), k = rope(n_k(wk·n(x))), v = wv·n(x), n = RMSNorm with ``eps``."""
    xr = unit_stride_rows(x)
    B, K = xr.shape
    D = 2 * cos.shape[-1]
    _check_weights("qkv_rope", K, wq, wk, wv)
    if D & (D - 1) or D < 4 or wq.shape[0] % D or wk.shape[0] % D or wv.shape != wk.shape:
        raise ValueError(f"qkv_rope: head dim {D} (a power of two) must divide wq {tuple(wq.shape)} and wk "
                         f"{tuple(wk.shape)}, and wv must match wk")
    if (q_norm_w is None) != (k_norm_w is None):
        raise ValueError("qkv_rope: give both per-head norm weights or neither")
    Hq, Hkv = wq.shape[0] // D, wk.shape[0] // D
    q = xr.new_empty(B, 1, Hq, D)
    k, v = (xr.new_empty(B, 1, Hkv, D) for _ in range(2))
    head_norm = q_norm_w is not None
    qn, kn = (q_norm_w, k_norm_w) if head_norm else (norm_w, norm_w)  # unread without HEAD_NORM
    cos, sin = cos.reshape(-1).float().contiguous(), sin.reshape(-1).float().contiguous()
    _qkv_rope_tuned[(Hq + 2 * Hkv, B)](
        xr, norm_w, wq, wk, wv, qn, kn, cos, sin, q, k, v,
        K, Hq, Hkv, eps, xr.stride(0), D=D, HEAD_NORM=head_norm, **pdl_args(xr),
    )
    return q, k, v


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos, sin [1, D/2] (fp32) at position ``pos`` (a 0-d int tensor on the device) for frequencies
    ``inv_freq`` [D/2] (any float dtype; a model cast to bf16 casts it too): ``Rotary.cos_sin(pos.view(1))`` in one
    launch instead of six (arange, add, cast, multiply, cos, sin): at batch 1 a step pays per launch."""
    if pos.numel() != 1 or not inv_freq.is_floating_point() or inv_freq.dim() != 1:
        raise ValueError(f"rope_cos_sin: pos must hold one position and inv_freq be a float [D/2], got "
                         f"{tuple(pos.shape)} / {inv_freq.dtype} {tuple(inv_freq.shape)}")
    half = inv_freq.numel()
    cos, sin = (inv_freq.new_empty(1, half, dtype=torch.float32) for _ in range(2))
    _rope_table_kernel[(1,)](pos, inv_freq, cos, sin, half, BH=triton.next_power_of_2(half), **pdl_args(inv_freq))
    return cos, sin


@triton.jit
def _write_slot_kernel(X, BUF, POS, S, N, stride_xb, stride_bb, stride_bs, BD: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    ok = cols < N
    wait_for_inputs(PDL)
    slot = tl.load(POS).to(tl.int64) % S
    x = tl.load(X + b * stride_xb + cols, mask=ok)
    tl.store(BUF + b * stride_bb + slot * stride_bs + cols, x.to(BUF.dtype.element_ty), mask=ok)


def write_slot(buf: torch.Tensor, x: torch.Tensor, pos: torch.Tensor) -> None:
    """buf [B, S, N][:, pos mod S] = x [B, 1, N] (cast to buf's dtype), pos a 0-d int tensor on the device: one launch
    where ``index_copy_`` at a device position takes two (the remainder, the copy)."""
    B, S, N = buf.shape
    xr = unit_stride_rows(x)
    if xr.shape != (B, N) or buf.stride(-1) != 1 or pos.numel() != 1:
        raise ValueError(f"write_slot: x {tuple(x.shape)} must be [{B}, 1, {N}] for buf {tuple(buf.shape)} (unit "
                         f"stride in the last dim), pos one position, got {tuple(pos.shape)}")
    _write_slot_kernel[(B,)](xr, buf, pos, S, N, xr.stride(0), buf.stride(0), buf.stride(1),
                             BD=triton.next_power_of_2(N), **pdl_args(xr))


def autotuned(configs: list, key: list[str], interpreted: "triton.Config", prune=None):
    """``triton.autotune`` for the decoding kernels: tuned per problem shape on the first call (static decoding's
    eager warm-up step, before any graph is captured; Triton's benchmark clears the L2 between runs, so weights come
    from memory as in a real step). Under the interpreter, one configuration (it would run every one in full)."""
    if _interpreted():
        configs = [interpreted]
    kwargs = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
    return triton.autotune(configs=configs, key=key, **kwargs)


def _input_width(named_args) -> int:
    """The widest K block worth a tile: the input rounded up to a power of two (at least 64)."""
    return max(64, triton.next_power_of_2(named_args["K"]))


def _fitting_k(configs, named_args, **kwargs):
    """Drops K blocks wider than the input (past one block covering it)."""
    width = _input_width(named_args)
    fit = [c for c in configs if c.kwargs["BK"] <= width]
    return fit or configs[:1]


# A matrix-vector product is bound by how many bytes are in flight, so the candidates load tiles of 2K-16K weights
# per program and iteration (smaller tiles kept too little in flight). The list keeps the tiles that tuning over
# every 2K-16K tile with 4 or 8 warps picked for `small`, a spread around them, and tiles as wide as 4096 for
# ``_prefetching_tiles``, which then keeps only the tiles of one width per shape; a short list keeps the first
# step's tuning to seconds (benchmarks/results/decode_kernels_blocks_h200_2026-11-29.json).
_GEMV_TILES = [(1, 2048, 4), (2, 1024, 4), (2, 2048, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 8),
               (16, 256, 8), (16, 512, 8), (32, 128, 4), (1, 4096, 4), (2, 4096, 8), (8, 1024, 8)]
_TILE_VALUES_PER_THREAD = 32  # weights (both matrices, gated) a tile puts in each thread's registers, at most


def _prefetching_tiles(configs, named_args, **kwargs):
    """Tiles as wide as the input (rounded up to a power of two), or for gated products (two matrices) half as wide,
    within ``_TILE_VALUES_PER_THREAD`` (else the widest that fit). A program loads its first tile before it waits
    for the previous kernel (``kernels.decode.pdl``) and the rest of its weights only after that kernel has
    finished, so in a step the first tile should hold (nearly) all of them. The autotuner times kernels alone, where
    that does not show: its picks among tiles of similar isolated speed changed a chained step's time by up to 15%
    (benchmarks/results/generate_qkv_gemv_small_h200_2026-11-29.json; docs/performance.md)."""
    width = _input_width(named_args)
    gated = kwargs.get("GATED", named_args.get("GATED"))  # constexprs come as keywords
    fit = []
    for target in (width // 2 if gated else width, width):
        fit = fit or [c for c in configs if c.kwargs["BK"] <= target and c.kwargs["BN"] * c.kwargs["BK"]
                      * (2 if gated else 1) <= _TILE_VALUES_PER_THREAD * 32 * c.num_warps]
    widest = max((c.kwargs["BK"] for c in fit), default=0)
    return [c for c in fit if c.kwargs["BK"] == widest] or configs[:1]


_gemv_tuned = autotuned([triton.Config({"BN": bn, "BK": bk}, num_warps=w) for bn, bk, w in _GEMV_TILES],
                        ["N", "K", "NORM", "GATED", "STACKED", "RESIDUAL", "PDL"],
                        triton.Config({"BN": 8, "BK": 64}, num_warps=4), prune=_prefetching_tiles)(_gemv_kernel)
# one program per head, whose tile is [D/2, BK] twice (`small`: BK=256, 8 warps)
_QKV_TILES = [(128, 4), (256, 4), (256, 8), (512, 8)]  # (BK, warps)
_qkv_rope_tuned = autotuned([triton.Config({"BK": bk}, num_warps=w) for bk, w in _QKV_TILES],
                            ["K", "HQ", "HKV", "D", "HEAD_NORM", "PDL"], triton.Config({"BK": 64}, num_warps=4),
                            prune=_fitting_k)(_qkv_rope_kernel)


def gemv(x: torch.Tensor, w: torch.Tensor | list[torch.Tensor], *, norm_w: torch.Tensor | None = None,
         eps: float = 0.0, w_up: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, K], [B, 1, K] or [B, P, K] (P partial results, summed as they are loaded); w (and w_up): [N, K], or w
    a list of up to three [Ni, K] matrices whose rows are stacked (N = ΣNi: e.g. q, k, v projections in one launch,
    no concatenated copy) → [B, N] in x's dtype (residual's when given):
    y = [residual +] w·n(x)        without w_up,
    y = silu(w·n(x)) * (w_up·n(x)) with w_up,
    n = RMSNorm with weight ``norm_w`` [K] and ``eps``, or identity when norm_w is None; residual: [B, N]."""
    parts = x.shape[1] if x.dim() == 3 else 1
    if parts > 1:
        xr = x if x.stride(-1) == 1 else x.contiguous()
        B, _, K = xr.shape
    else:
        xr = unit_stride_rows(x)
        B, K = xr.shape
    stack = list(w) if isinstance(w, (list, tuple)) else [w]
    if not 1 <= len(stack) <= 3 or (len(stack) > 1 and w_up is not None):
        raise ValueError(f"gemv: w is one matrix or a list of up to three (without w_up), got {len(stack)}")
    _check_weights("gemv", K, *stack, *([w_up] if w_up is not None else []))
    N = sum(m.shape[0] for m in stack)
    sizes = [m.shape[0] for m in stack] + [0, 0]
    if w_up is not None and w_up.shape != stack[0].shape:
        raise ValueError(f"gemv: w_up {tuple(w_up.shape)} must match w {tuple(stack[0].shape)}")
    if residual is not None:
        residual = unit_stride_rows(residual)
        if residual.shape != (B, N):
            raise ValueError(f"gemv: residual {tuple(residual.shape)} must be [{B}, {N}]")
    y = torch.empty(B, N, device=x.device, dtype=(residual if residual is not None else x).dtype)
    dummy = xr  # pointer arguments a configuration does not read
    w1, w2, w3 = (stack + [stack[0]] * 2)[:3]
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), B)  # noqa: E731
    _gemv_tuned[grid](
        xr, norm_w if norm_w is not None else dummy, w1, w_up if w_up is not None else w2, w3,
        residual if residual is not None else dummy, y,
        N, K, sizes[0], sizes[1], eps, xr.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        parts, xr.stride(1) if parts > 1 else 0,
        NORM=norm_w is not None, GATED=w_up is not None, STACKED=len(stack) > 1, RESIDUAL=residual is not None,
        **pdl_args(xr),
    )
    return y
