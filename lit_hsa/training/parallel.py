"""Parallelism, configured not hand-coded (torchtitan style): per-block compile → activation checkpointing →
FSDP2 ``fully_shard`` per block, applied in one place from the trainer config. The model code knows nothing of it."""
from __future__ import annotations

from torch import nn

from lit_hsa.model.units import apply_compile, transformer_units


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each unit's activations in backward: memory per layer becomes O(T·d) instead of O(T·d·layers·k).
    Non-reentrant, so units can take non-tensor arguments (the per-forward context)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for parent in [model.lower, model.upper]:
        for i, block in enumerate(parent):
            parent[i] = checkpoint_wrapper(block, preserve_rng_state=True)
    if model.memory is not None:
        model.memory = checkpoint_wrapper(model.memory, preserve_rng_state=True)


def apply_fsdp(model: nn.Module, mesh, reshard_after_forward: bool = True) -> None:
    """FSDP2: each unit is one all-gather / reduce-scatter group; the root holds embeddings, final norm and head."""
    from torch.distributed.fsdp import fully_shard

    for unit in transformer_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def parallelize(model: nn.Module, *, activation_checkpointing: bool, compile: bool, mesh=None,
                compile_backend: str = "inductor") -> nn.Module:
    # Compile before wrapping for checkpointing: every wrapper shares one forward, so compiling the wrappers makes
    # dynamo guard on the wrapped block's type and recompile for each kind of unit (SWA block, HSA block, chunk
    # encoder) and argument list, which exhausts its recompile limit; the blocks' own forwards stay separate.
    if compile:
        apply_compile(model, compile_backend)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is not None:
        apply_fsdp(model, mesh)
    return model


def is_parallelized(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        return False
    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())

