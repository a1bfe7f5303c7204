"""The units the model is cut into for per-unit work (compile for training and decoding, activation checkpointing
and FSDP2 sharding in ``lit_hsa.training.parallel``): every block, and the chunk encoder."""
from __future__ import annotations

import torch
from torch import nn

from lit_hsa.model.loss import chunk_loss_sum


def transformer_units(model: nn.Module) -> list[nn.Module]:
    """The repeated units: every block, and the chunk encoder (it holds as many weights as a block)."""
    units = list(model.blocks())
    if model.memory is not None:
        units.append(model.memory)
    return units


def apply_compile(model: nn.Module, backend: str = "inductor", options: dict | None = None) -> None:
    """Compile each block separately: small graphs compile fast and are reused by every identical block.
    ``backend``: a torch.compile backend (``aot_eager`` captures the same graphs without generating code);
    ``options``: the backend's options (inductor config), for everything compiled here.
    The loss's row chunks are compiled too: eagerly, the [rows, vocab] logits go through memory three times in fp32
    (cast, log-softmax, pick), a noticeable share of a long-context step."""
    for unit in transformer_units(model):
        unit.compile(backend=backend, options=options)
    model.chunk_loss = torch.compile(chunk_loss_sum, backend=backend, dynamic=False, options=options)


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(unit, "_compiled_call_impl", None) is not None for unit in transformer_units(model))
