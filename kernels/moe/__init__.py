"""The MoE layer's fused memory-bound steps (``lit_hsa.model.moe`` calls them): ``gather_sum`` (the combine, expert
order → token order) and ``gated_swiglu`` (the experts' activation, with its backward).

``reference.py`` defines both; ``triton_moe.py`` computes each in one pass. Which one runs is decided by
``kernels.dispatch.moe_kernels_apply`` (the backend switch: CUDA tensors under ``auto``, anywhere under ``triton``,
e.g. the CPU interpreter in tests, never on the meta device). The Triton module is imported on first use:
``triton.jit`` decides at import time whether kernels are compiled or interpreted (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import torch

from ..dispatch import moe_kernels_apply
from .reference import gated_swiglu_reference, gather_sum_reference

__all__ = ["gather_sum", "gated_swiglu", "gather_sum_reference", "gated_swiglu_reference"]


# Outside torch.compile's graphs, as the HSA ops: the Triton launches inside autograd Functions have not been traced
# by dynamo on a GPU yet (a graph break per call is the known-safe form until that is measured).
@torch.compiler.disable
def gather_sum(y: torch.Tensor, position_of: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """y: [N·k, d] (rows in expert order), position_of: [N·k] int64 (assignment t·k + j → its row of y) → [N, d] in
    ``dtype``: each token's k rows summed in fp32. The kernel is not differentiable by itself: the caller's autograd
    function (``lit_hsa.model.moe.Route``) supplies the backward, a gather the other way."""
    if moe_kernels_apply(y):
        from .triton_moe import gather_sum_triton

        return gather_sum_triton(y, position_of, top_k, dtype)
    return gather_sum_reference(y, position_of, top_k, dtype)


@torch.compiler.disable
def gated_swiglu(gu: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """gu: [M, 2h] (gate | up, the gate/up grouped GEMM's output), g: [M] fp32 (each row's routing gate) → [M, h] in
    gu's dtype: silu(gate) · up · g. The kernel computes it in fp32 and rounds once, the reference op by op in gu's
    dtype (the same in fp32)."""
    if moe_kernels_apply(gu):
        return _GatedSwiGLU.apply(gu, g)
    return gated_swiglu_reference(gu, g)


class _GatedSwiGLU(torch.autograd.Function):
    """The fused activation; backward: d_gate | d_up as one [M, 2h] tensor and d_g [M] (fp32), from gu and g saved
    (h is recomputed, not stored)."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        from .triton_moe import gated_swiglu_triton

        ctx.save_for_backward(gu, g)
        ctx.g_dtype = g.dtype
        return gated_swiglu_triton(gu, g)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        from .triton_moe import gated_swiglu_backward_triton

        gu, g = ctx.saved_tensors
        dgu, dg = gated_swiglu_backward_triton(gu, g, dh)
        return dgu, dg.to(ctx.g_dtype)
