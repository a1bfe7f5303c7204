"""The MoE layer's memory-bound steps, as plain torch ops: the definitions ``triton_moe.py`` is tested against.

- ``gather_sum_reference``: expert order → token order, each token's k rows summed (the combine of the routed
  experts' outputs, and the backward of the gather into expert order);
- ``gated_swiglu_reference``: the experts' activation, ``silu(gate) · up`` scaled by each row's routing gate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_sum_reference(y: torch.Tensor, position_of: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """y: [N·k, d] (rows in expert order), position_of: [N·k] int64 (assignment t·k + j → its row of y) →
    [N, d] in ``dtype``: out[t] = Σ_{j<k} y[position_of[t·k + j]], accumulated in fp32 (torch's reductions of
    fp16/bf16 accumulate in fp32 on the CPU and on CUDA)."""
    return y.index_select(0, position_of).view(-1, top_k, y.shape[-1]).sum(1, dtype=dtype)


def gated_swiglu_reference(gu: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """gu: [M, 2h] (gate | up), g: [M] fp32 (each row's routing gate) → [M, h] in gu's dtype:
    silu(gate) · up · g, evaluated op by op in gu's dtype (each product rounded to it, g rounded first)."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up * g[:, None].to(gu.dtype)
