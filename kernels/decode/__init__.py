"""Decoding attention: one new token per sequence against static-shape KV caches (``reference.py`` defines it).

A sliding-window layer's step (write the ring slot, attend to the last W positions) runs one Triton kernel
(``triton_ring.py``) where ``use_ring_kernel`` says so: it follows ``kernels.hsa``'s backend switch (``HSA_BACKEND`` /
``kernels.hsa.set_backend``: CUDA under ``auto``, ``triton`` wherever Triton runs, e.g. the CPU interpreter in tests,
``reference`` never). Elsewhere, and for full-attention caches, the references run (split-KV matmuls).
"""
from __future__ import annotations

import torch

from .reference import SPLIT_KEYS, decode_attention, ring_attention_reference, ring_slot_and_mask, write_and_attend

__all__ = ["SPLIT_KEYS", "decode_attention", "write_and_attend", "ring_slot_and_mask", "ring_attention_reference",
           "ring_kernel_fits", "use_ring_kernel", "RING_KERNEL_MAX_WINDOW"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# One program per (sequence, KV head) streams that head's whole ring: ~128 KB for the small preset's W=512, D=64. A
# ring of 4096 slots at D=128 (2 MB per program, a handful of programs at batch 1) would be bound by single SMs'
# bandwidth; such windows keep the matmul path until a split-window variant is measured.
RING_KERNEL_MAX_WINDOW = 1024


def ring_kernel_fits(q: torch.Tensor, ck: torch.Tensor) -> bool:
    """Shapes and dtypes the Triton kernel covers: fp32/fp16/bf16, a power-of-two head dim in [16, 256]."""
    D = q.shape[-1]
    return q.dtype in _FLOATS and ck.dtype in _FLOATS and 16 <= D <= 256 and D & (D - 1) == 0


def use_ring_kernel(q: torch.Tensor, ck: torch.Tensor) -> bool:
    """Whether a ring step with rings ck [B, Hkv, W, D] takes the kernel: the backend switch sends q's ops to Triton,
    the kernel covers the shape, and the window has at most ``RING_KERNEL_MAX_WINDOW`` slots."""
    from kernels.hsa import use_fast_paths

    return use_fast_paths(q) and ring_kernel_fits(q, ck) and ck.shape[2] <= RING_KERNEL_MAX_WINDOW
