"""Decoding attention: one new token per sequence against static-shape KV caches (``reference.py`` defines it).

``ring_attention`` (a sliding-window layer's step: write the ring slot, attend to the last W positions) runs one
Triton kernel on CUDA (``triton_ring.py``) and the reference elsewhere. It follows ``kernels.hsa``'s backend switch
(``HSA_BACKEND`` / ``kernels.hsa.set_backend``): ``reference`` everywhere, or ``triton`` wherever Triton runs (CPU
under ``TRITON_INTERPRET=1`` in tests). Full-attention caches use ``decode_attention`` (split-KV matmuls).
"""
from __future__ import annotations

import importlib.util

import torch

from .reference import SPLIT_KEYS, decode_attention, ring_attention_reference, ring_slot_and_mask, write_and_attend

__all__ = ["SPLIT_KEYS", "decode_attention", "write_and_attend", "ring_slot_and_mask", "ring_attention",
           "ring_attention_reference", "ring_kernel_fits", "use_ring_kernel", "RING_KERNEL_MAX_WINDOW"]

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
    """Whether a ring step with rings ck [B, Hkv, W, D] takes the kernel: Triton on CUDA (or forced by the backend
    switch), a shape it covers, and a window of at most ``RING_KERNEL_MAX_WINDOW`` slots."""
    from kernels.hsa import get_backend

    backend = get_backend()
    if backend == "reference" or not ring_kernel_fits(q, ck) or ck.shape[2] > RING_KERNEL_MAX_WINDOW:
        return False
    return backend == "triton" or (q.is_cuda and importlib.util.find_spec("triton") is not None)


def ring_attention(q, k, v, ck, cv, pos: torch.Tensor) -> torch.Tensor:
    """q: [B, 1, Hq, D], k/v: [B, 1, Hkv, D] of the token at ``pos`` (0-d int tensor on the caches' device); rings
    ck/cv: [B, Hkv, W, D], written in place → [B, 1, Hq, D]."""
    if use_ring_kernel(q, ck):
        from .triton_ring import ring_attention_triton

        return ring_attention_triton(q, k, v, ck, cv, pos)
    return ring_attention_reference(q, k, v, ck, cv, pos)
