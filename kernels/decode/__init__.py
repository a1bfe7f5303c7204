"""Decoding attention: one new token per sequence against static-shape KV caches (``reference.py`` defines it).

A sliding-window layer's step (write the ring slot, attend to the last W positions) runs one Triton kernel
(``triton_ring.py``) where ``use_ring_kernel`` says so: it follows ``kernels.hsa``'s backend switch (``HSA_BACKEND`` /
``kernels.hsa.set_backend``: CUDA under ``auto``, ``triton`` wherever Triton runs, e.g. the CPU interpreter in tests,
``reference`` never). Elsewhere, and for full-attention caches, the references run (split-KV matmuls).

``triton_block.py`` holds a block's projections fused with the work around them, and ``triton_ring``'s
``ring_attention_out_proj`` merges the ring step inside the output projection (``lit_hsa.fused_step`` puts them
together); ``pdl.py`` lets these kernels overlap the one before them (programmatic dependent launch).
"""
from __future__ import annotations

import torch

from .reference import SPLIT_KEYS, decode_attention, ring_attention_reference, ring_slot_and_mask, write_and_attend

__all__ = ["SPLIT_KEYS", "decode_attention", "write_and_attend", "ring_slot_and_mask", "ring_attention_reference",
           "ring_kernel_fits", "use_ring_kernel", "RING_KERNEL_MAX_WINDOW",
           "RING_KERNEL_MAX_HEAD_DIM_COMPILED"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# Measured on an H200 in bf16 with the defaults (``benchmarks/bench_decode_kernels.py``, µs per call replayed from a
# CUDA graph, ``benchmarks/results/decode_kernels_h200_2026-11-29.json``): the kernel takes 7.8 µs for the small
# preset's W=512, D=64, against 31.9 for the eager reference (five kernels) and 10.1 compiled by inductor; but 20.5
# (W=4096, D=64), 49.8 (W=4096, D=128) and 13.0 (W=512, D=128), where the compiled reference takes 16.4, 17.1, 10.1.
# So: windows up to 1,024 slots, and where a compiled reference is at hand, head dims up to 64 only.
RING_KERNEL_MAX_WINDOW = 1024
RING_KERNEL_MAX_HEAD_DIM_COMPILED = 64


def ring_kernel_fits(q: torch.Tensor, ck: torch.Tensor) -> bool:
    """Shapes and dtypes the Triton kernel covers: fp32/fp16/bf16, a power-of-two head dim in [16, 256]."""
    return q.dtype in _FLOATS and ck.dtype in _FLOATS and _head_dim_fits(q.shape[-1])


def _head_dim_fits(D: int) -> bool:
    return 16 <= D <= 256 and D & (D - 1) == 0


def use_ring_kernel(x: torch.Tensor, head_dim: int, window: int, compiled_fallback: bool = False) -> bool:
    """Whether a ring step of ``window`` slots takes the kernel, for queries and rings of x's dtype and device (x:
    any tensor of the step, e.g. q or the block's input): the backend switch sends x's ops to Triton, the kernel
    covers the shape, and it measured faster than the alternative (``compiled_fallback``: the reference compiled by
    inductor, else eager) — see the bounds above."""
    from kernels.hsa import use_fast_paths

    if compiled_fallback and head_dim > RING_KERNEL_MAX_HEAD_DIM_COMPILED:
        return False
    return (use_fast_paths(x) and x.dtype in _FLOATS and _head_dim_fits(head_dim)
            and window <= RING_KERNEL_MAX_WINDOW)
