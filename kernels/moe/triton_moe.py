"""Triton kernels for the MoE layer's memory-bound steps (``reference.py`` defines them).

Written as torch ops these steps make several passes over [N·k, ·] tensors: the combine is a row gather into a new
[N·k, d] tensor, then a sum over k; the activation's forward is silu, two multiplies (and a cast of the gates), its
backward silu_backward and four multiplies plus a row sum, each a full read and write. Here each is one pass: the
combine reads the k rows of a token and writes its sum once, the activation reads gate | up once and writes h, and
its backward reads gate | up and dh once and writes d_gate | d_up (one [M, 2h] tensor, so the grouped GEMM's
backward gets one contiguous gradient) and d_g. Everything is computed in fp32 and rounded once on store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_sum_triton", "gated_swiglu_triton", "gated_swiglu_backward_triton"]


def _block(n: int, cap: int) -> int:
    """A power-of-two block covering ``n`` (masked past it), at most ``cap`` and at least 16."""
    return max(16, min(cap, triton.next_power_of_2(n)))


@triton.jit
def _gather_sum_kernel(Y, POS, OUT, N, D, stride_y, stride_o,
                       K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(K):  # K is a constant: unrolled, the k row loads of a tile in flight together
        src = tl.load(POS + rows.to(tl.int64) * K + j, mask=row_ok, other=0)
        acc += tl.load(Y + src[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty), mask=ok)


def gather_sum_triton(y: torch.Tensor, position_of: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """y: [N·k, d] (unit column stride), position_of: [N·k] int64 → [N, d] in ``dtype``; see
    ``reference.gather_sum_reference``."""
    y = y if y.stride(-1) == 1 else y.contiguous()
    position_of = position_of.contiguous()
    n, d = position_of.numel() // top_k, y.shape[-1]
    out = torch.empty(n, d, dtype=dtype, device=y.device)
    block_n, block_d = 16, _block(d, 256)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    _gather_sum_kernel[grid](y, position_of, out, n, d, y.stride(0), out.stride(0),
                             K=top_k, BLOCK_N=block_n, BLOCK_D=block_d)
    return out


@triton.jit
def _gated_swiglu_fwd_kernel(GU, G, H, M, HID, stride_gu, stride_h, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < HID)[None, :]
    gate_ptr = GU + rows.to(tl.int64)[:, None] * stride_gu + cols[None, :]
    gate = tl.load(gate_ptr, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + HID, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    h = gate * tl.sigmoid(gate) * up * g[:, None]
    tl.store(H + rows.to(tl.int64)[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=ok)


def gated_swiglu_triton(gu: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """gu: [M, 2h] (unit column stride), g: [M] fp32 → [M, h] in gu's dtype; see
    ``reference.gated_swiglu_reference``."""
    gu = gu if gu.stride(-1) == 1 else gu.contiguous()
    m, hid = gu.shape[0], gu.shape[1] // 2
    h = torch.empty(m, hid, dtype=gu.dtype, device=gu.device)
    block_m, block_h = 16, _block(hid, 256)
    grid = (triton.cdiv(m, block_m), triton.cdiv(hid, block_h))
    _gated_swiglu_fwd_kernel[grid](gu, g.float().contiguous(), h, m, hid, gu.stride(0), h.stride(0),
                                   BLOCK_M=block_m, BLOCK_H=block_h)
    return h


@triton.jit
def _gated_swiglu_bwd_kernel(GU, G, DH, DGU, DG, M, HID, stride_gu, stride_dh, stride_dgu,
                             BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    # One program walks its rows' whole width, so d_g (a sum over the width) is finished in registers: no atomics,
    # no second pass, the same result every run.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    dg = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, HID, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < HID)[None, :]
        gu_off = rows.to(tl.int64)[:, None] * stride_gu + cols[None, :]
        gate = tl.load(GU + gu_off, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(GU + gu_off + HID, mask=ok, other=0.0).to(tl.float32)
        dh = tl.load(DH + rows.to(tl.int64)[:, None] * stride_dh + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        dg += tl.sum(dh * silu * up, axis=1)
        dsilu = dh * g[:, None]  # d(silu(gate) · up) / d(silu(gate) · up · g)
        d_off = rows.to(tl.int64)[:, None] * stride_dgu + cols[None, :]
        tl.store(DGU + d_off, (dsilu * up * sig * (1.0 + gate * (1.0 - sig))).to(DGU.dtype.element_ty), mask=ok)
        tl.store(DGU + d_off + HID, (dsilu * silu).to(DGU.dtype.element_ty), mask=ok)
    tl.store(DG + rows, dg, mask=row_ok)


def gated_swiglu_backward_triton(gu: torch.Tensor, g: torch.Tensor,
                                 dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gu: [M, 2h], g: [M] fp32, dh: [M, h] → (d_gu [M, 2h] in gu's dtype: d_gate | d_up, d_g [M] fp32)."""
    gu = gu if gu.stride(-1) == 1 else gu.contiguous()
    dh = dh if dh.stride(-1) == 1 else dh.contiguous()
    m, hid = gu.shape[0], gu.shape[1] // 2
    dgu = torch.empty(m, 2 * hid, dtype=gu.dtype, device=gu.device)
    dg = torch.empty(m, dtype=torch.float32, device=gu.device)
    block_m, block_h = 16, _block(hid, 128)
    _gated_swiglu_bwd_kernel[(triton.cdiv(m, block_m),)](gu, g.float().contiguous(), dh, dgu, dg, m, hid,
                                                          gu.stride(0), dh.stride(0), dgu.stride(0),
                                                          BLOCK_M=block_m, BLOCK_H=block_h)
    return dgu, dg
