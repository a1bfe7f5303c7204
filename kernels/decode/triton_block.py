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

So a dense block's step is five kernels: ``qkv_rope``, attention, ``gemv`` (o_proj + residual), ``gemv`` (norm,
gate, up, SwiGLU), ``gemv`` (down + residual). Weights are ``nn.Linear``'s ``[out, in]``, contiguous; products
accumulate in fp32; outputs take the input's dtype (the residual's where one is added).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_args, wait_for_inputs

__all__ = ["qkv_rope", "gemv"]


@triton.jit
def _load_x(X, cols, ok, parts, stride_xp):
    """The input at ``cols`` in fp32: the sum of ``parts`` rows ``stride_xp`` apart (partial results of a split
    computation, e.g. HSA's chunk ranges), usually one."""
    x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
    for p in range(1, parts):
        x += tl.load(X + p * stride_xp + cols, mask=ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _rstd(X, K, eps, BK: tl.constexpr, parts=1, stride_xp=0):
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
    rstd = _rstd(X, K, eps, BK)
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
def _gemv_kernel(
    X, NW, W1, W2, RES, Y,
    N, K, eps, stride_xb, stride_rb, stride_yb, parts, stride_xp,
    BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    X += b * stride_xb
    rows = pid * BN + tl.arange(0, BN)
    row_ok = rows < N
    w_rows = rows.to(tl.int64)[:, None] * K
    cols = tl.arange(0, BK)
    tile_ok = row_ok[:, None] & (cols < K)[None, :]
    w1 = tl.load(W1 + w_rows + cols[None, :], mask=tile_ok, other=0.0)  # weights first: see kernels.decode.pdl
    w2 = w1
    if GATED:
        w2 = tl.load(W2 + w_rows + cols[None, :], mask=tile_ok, other=0.0)
    wait_for_inputs(PDL)
    rstd = 1.0
    if NORM:
        rstd = _rstd(X, K, eps, BK, parts, stride_xp)
    y1 = tl.zeros([BN], tl.float32)
    y2 = tl.zeros([BN], tl.float32)
    for k0 in range(0, K, BK):  # w1 (w2) hold the tile at k0; the next one is loaded before this one is reduced
        cols = k0 + tl.arange(0, BK)
        nxt = cols + BK
        nxt_ok = row_ok[:, None] & (nxt < K)[None, :]
        n1 = tl.load(W1 + w_rows + nxt[None, :], mask=nxt_ok, other=0.0)
        n2 = n1
        if GATED:
            n2 = tl.load(W2 + w_rows + nxt[None, :], mask=nxt_ok, other=0.0)
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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, K] or [B, K] → [B, K] with unit stride along K."""
    x = x.reshape(x.shape[0], x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def qkv_rope(x: torch.Tensor, norm_w: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
             q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, 1, d] (one token per sequence); norm_w [d]; wq [Hq·D, d], wk, wv [Hkv·D, d]; q/k_norm_w [D] or None
    (no per-head norm); cos, sin [1, D/2] (fp32, the token's position) → q [B, 1, Hq, D], k, v [B, 1, Hkv, D] in
    x's dtype: q = rope(n_q(wq·n(x))), k = rope(n_k(wk·n(x))), v = wv·n(x), n = RMSNorm with ``eps``."""
    xr = _rows(x)
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


def autotuned(configs: list, key: list[str], interpreted: "triton.Config", prune=None):
    """``triton.autotune`` for the decoding kernels: tuned per problem shape on the first call (static decoding's
    eager warm-up step, before any graph is captured; Triton's benchmark clears the L2 between runs, so weights come
    from memory as in a real step). Under the interpreter, one configuration (it would run every one in full)."""
    if _interpreted():
        configs = [interpreted]
    kwargs = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
    return triton.autotune(configs=configs, key=key, **kwargs)


def _fitting_k(configs, named_args, **kwargs):
    """Drops K blocks wider than the input (past one block covering it)."""
    width = max(64, triton.next_power_of_2(named_args["K"]))
    fit = [c for c in configs if c.kwargs["BK"] <= width]
    return fit or configs[:1]


# A matrix-vector product is bound by how many bytes are in flight, so the candidates load tiles of 2K-16K weights
# per program and iteration: the first version's 16 x 128 tiles kept too little in flight and ran at half the speed
# of inductor's reductions (H200: `small`'s feed-forward 21 µs against 10.5). Tuned over every tile of 2K-16K weights
# with 4 or 8 warps (34 candidates; with the other kernels ~9 s of tuning at a model's first step), `small` on an H200
# took (16, 256, 8 warps) for gate/up, (2, 2048, 4) for down and (2, 1024, 4) for the output projection; the list
# keeps those and a spread around them.
_GEMV_TILES = [(1, 2048, 4), (2, 1024, 4), (2, 2048, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 8),
               (16, 256, 8), (16, 512, 8), (32, 128, 4)]
_gemv_tuned = autotuned([triton.Config({"BN": bn, "BK": bk}, num_warps=w) for bn, bk, w in _GEMV_TILES],
                        ["N", "K", "NORM", "GATED", "RESIDUAL", "PDL"], triton.Config({"BN": 8, "BK": 64}, num_warps=4),
                        prune=_fitting_k)(_gemv_kernel)
# one program per head, whose tile is [D/2, BK] twice (`small`: BK=256, 8 warps)
_QKV_TILES = [(128, 4), (256, 4), (256, 8), (512, 8)]  # (BK, warps)
_qkv_rope_tuned = autotuned([triton.Config({"BK": bk}, num_warps=w) for bk, w in _QKV_TILES],
                            ["K", "HQ", "HKV", "D", "HEAD_NORM", "PDL"], triton.Config({"BK": 64}, num_warps=4),
                            prune=_fitting_k)(_qkv_rope_kernel)


def gemv(x: torch.Tensor, w: torch.Tensor, *, norm_w: torch.Tensor | None = None, eps: float = 0.0,
         w_up: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, K], [B, 1, K] or [B, P, K] (P partial results, summed as they are loaded); w (and w_up): [N, K] →
    [B, N] in x's dtype (residual's when given):
    y = [residual +] w·n(x)        without w_up,
    y = silu(w·n(x)) * (w_up·n(x)) with w_up,
    n = RMSNorm with weight ``norm_w`` [K] and ``eps``, or identity when norm_w is None; residual: [B, N]."""
    parts = x.shape[1] if x.dim() == 3 else 1
    if parts > 1:
        xr = x if x.stride(-1) == 1 else x.contiguous()
        B, _, K = xr.shape
    else:
        xr = _rows(x)
        B, K = xr.shape
    _check_weights("gemv", K, w, *([w_up] if w_up is not None else []))
    N = w.shape[0]
    if w_up is not None and w_up.shape != w.shape:
        raise ValueError(f"gemv: w_up {tuple(w_up.shape)} must match w {tuple(w.shape)}")
    if residual is not None:
        residual = _rows(residual)
        if residual.shape != (B, N):
            raise ValueError(f"gemv: residual {tuple(residual.shape)} must be [{B}, {N}]")
    y = torch.empty(B, N, device=x.device, dtype=(residual if residual is not None else x).dtype)
    dummy = xr  # pointer arguments a configuration does not read
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), B)  # noqa: E731
    _gemv_tuned[grid](
        xr, norm_w if norm_w is not None else dummy, w, w_up if w_up is not None else w,
        residual if residual is not None else dummy, y,
        N, K, eps, xr.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        parts, xr.stride(1) if parts > 1 else 0,
        NORM=norm_w is not None, GATED=w_up is not None, RESIDUAL=residual is not None, **pdl_args(xr),
    )
    return y
