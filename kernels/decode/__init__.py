"""Decoding attention: one new token per sequence against static-shape KV caches (``reference.py`` defines it).

A sliding-window layer's step (write the ring slot, attend to the last W positions) runs one Triton kernel
(``triton_ring.py``) where ``kernels.dispatch.use_ring_kernel`` says so: it follows the backend switch
(``HSA_BACKEND`` / ``kernels.hsa.set_backend``: CUDA under ``auto``, ``triton`` wherever Triton runs, e.g. the CPU
interpreter in tests, ``reference`` never). Elsewhere, and for full-attention caches, the references run
(split-KV matmuls).

``triton_block.py`` holds a block's projections fused with the work around them, and ``triton_ring``'s
``ring_attention_out_proj`` merges the ring step inside the output projection (``lit_hsa.inference.fused_step`` puts
them together); ``pdl.py`` lets these kernels overlap the one before them (programmatic dependent launch).
"""
from __future__ import annotations

from ..dispatch import RING_KERNEL_MAX_HEAD_DIM_COMPILED, RING_KERNEL_MAX_WINDOW, ring_kernel_fits, use_ring_kernel
from .reference import SPLIT_KEYS, decode_attention, ring_attention_reference, ring_slot_and_mask, write_and_attend

__all__ = ["SPLIT_KEYS", "decode_attention", "write_and_attend", "ring_slot_and_mask", "ring_attention_reference",
           "ring_kernel_fits", "use_ring_kernel", "RING_KERNEL_MAX_WINDOW",
           "RING_KERNEL_MAX_HEAD_DIM_COMPILED"]
