"""Hierarchical Sparse Attention operator (spec §4).

``hsa_attention`` and ``select_chunks`` are the public API; ``reference.py`` holds the definition of the math.
On CUDA tensors they dispatch to the fast paths (``triton_attention.hsa_attention_triton``,
``triton_select.select_chunks_fast``), elsewhere to the reference, as ``kernels.dispatch`` decides (its backend
switch, re-exported here: ``set_backend("reference")`` or ``HSA_BACKEND=reference`` forces the reference everywhere,
e.g. to compare training runs).

The Triton modules are imported lazily, on first use: ``triton.jit`` decides at import time whether kernels are
compiled or interpreted (``TRITON_INTERPRET=1``), so tests must be able to set that variable first.
"""
from __future__ import annotations

import torch

from ..dispatch import (
    get_backend,
    hsa_attention_uses_kernel,
    select_chunks_uses_kernel,
    set_backend,
    static_step_uses_references,
    use_fast_paths,
)
from .reference import fusion_weights, hsa_attention_reference, select_chunks_reference

__all__ = [
    "hsa_attention",
    "select_chunks",
    "hsa_attention_reference",
    "select_chunks_reference",
    "fusion_weights",
    "hsa_attention_triton",
    "select_chunks_fast",
    "set_backend",
    "get_backend",
    "use_fast_paths",
]


def __getattr__(name: str):
    if name == "hsa_attention_triton":
        from .triton_attention import hsa_attention_triton

        return hsa_attention_triton
    if name == "select_chunks_fast":
        from .triton_select import select_chunks_fast

        return select_chunks_fast
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Outside a static decoding step both ops are opaque to torch.compile (a graph break each): their fast paths size a
# work list from the data (host syncs), which dynamo would guard on and recompile for, and tracing into the
# selection's autograd function gave NaN gradients under inductor on CUDA. The kernels are already fused; compile
# still fuses everything around them. In a static decoding step (``q_start`` a tensor) they are the references,
# traced into the compiled block (``dispatch.static_step_uses_references``).
def hsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int = 64,
    sm_scale: float | None = None,
    off_by_one: bool = False,
    q_start: int | torch.Tensor = 0,
) -> torch.Tensor:
    """q: [B, T, Hq, D], k/v: [B, Tk, Hkv, D], weights/indices: [B, T, Hkv, K] → o: [B, T, Hq, D].

    See ``reference.hsa_attention_reference`` for the exact definition. Shapes the kernel does not cover
    (fp64, head dims that are not a power of two in [16, 256], chunk sizes below 16) use the reference, and so do
    decoding-sized calls (at most ``DECODE_MAX_PAIRS`` (token, slot) pairs) under the ``auto`` backend. ``q_start``
    (the first query's position) only picks the path: a tensor (static-shape decoding) takes the reference, traced.
    """
    if static_step_uses_references(q_start):
        return hsa_attention_reference(q, k, v, weights, indices, chunk_size, sm_scale, off_by_one)
    return _hsa_attention_opaque(q, k, v, weights, indices, chunk_size, sm_scale, off_by_one)


@torch.compiler.disable
def _hsa_attention_opaque(q, k, v, weights, indices, chunk_size, sm_scale, off_by_one) -> torch.Tensor:
    if hsa_attention_uses_kernel(q, weights, chunk_size):
        from .triton_attention import hsa_attention_triton

        return hsa_attention_triton(q, k, v, weights, indices, chunk_size, sm_scale, off_by_one=off_by_one)
    return hsa_attention_reference(q, k, v, weights, indices, chunk_size, sm_scale, off_by_one)


def select_chunks(
    q_slc: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    chunk_size: int = 64,
    doc_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_slc: [B, T, H, Dr], landmarks: [B, C, H, Dr] → scores, indices: [B, T, H, topk].

    See ``reference.select_chunks_reference`` for the exact definition and keyword options. A tensor ``q_start``
    (static-shape decoding, the position lives on the device) takes the reference, traced.
    """
    if static_step_uses_references(kwargs.get("q_start", 0)):
        return select_chunks_reference(q_slc, landmarks, topk, chunk_size, doc_ids, **kwargs)
    return _select_chunks_opaque(q_slc, landmarks, topk, chunk_size, doc_ids, **kwargs)


@torch.compiler.disable
def _select_chunks_opaque(q_slc, landmarks, topk, chunk_size, doc_ids, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    if select_chunks_uses_kernel(q_slc, kwargs.get("q_start", 0)):
        from .triton_select import select_chunks_fast

        return select_chunks_fast(q_slc, landmarks, topk, chunk_size, doc_ids, **kwargs)
    return select_chunks_reference(q_slc, landmarks, topk, chunk_size, doc_ids, **kwargs)
