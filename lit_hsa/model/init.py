"""Weights for a model built on the meta device (FSDP: build on meta → shard → materialise, the torchtitan order),
written shard by shard, so no process ever holds the whole model.

``materialize`` gives exactly the values an eager build draws from the same CPU generator state: it replays what the
constructors draw (``nn.Linear`` / ``nn.Embedding`` defaults, which the model's own initialisation overwrites but
which advance the generator), then the model's initialisation (``HSATransformer.init_targets``, in ``apply`` order),
in row blocks: the CPU generator gives the same numbers for a tensor drawn whole or in pieces of multiples of 16
elements. Each process draws every value but keeps only its own rows. ``load_full_state`` writes a full (mapped)
state dict into the same shards.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

DRAW_ELEMENTS = 1 << 22  # values drawn at a time (16 MiB in fp32): bounds the memory of the replay


def constructor_draws(model: nn.Module) -> Iterator[tuple[torch.Tensor, str]]:
    """(tensor, "uniform" | "normal"): the random draws of ``model``'s constructors, in construction order (module
    order): ``nn.Linear`` weight and bias (kaiming-uniform, uniform), ``nn.Embedding`` weight (standard normal).
    The project's other modules start from constants (``reset_parameters``)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            yield m.weight, "uniform"
            if m.bias is not None:
                yield m.bias, "uniform"
        elif isinstance(m, nn.Embedding):
            yield m.weight, "normal"


def apply_order(module: nn.Module) -> Iterator[nn.Module]:
    """``nn.Module.apply``'s order: each module after its children."""
    for child in module.children():
        yield from apply_order(child)
    yield module


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this process's part of ``tensor``, the global index of its first row): a plain tensor is all of it; a DTensor
    sharded along dim 0 (FSDP2) holds a block of rows."""
    to_local = getattr(tensor, "to_local", None)
    if to_local is None:
        return tensor, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(shape[1:]) != tuple(tensor.shape[1:]) or any(offset[1:]):
        raise NotImplementedError(f"only row (dim 0) sharding is supported, got {tensor.placements}")
    return to_local(), offset[0] if tensor.dim() else 0


def row_blocks(shape: torch.Size) -> list[tuple[int, int]]:
    """Row ranges [start, stop) to draw a tensor of ``shape`` in: each a multiple of 16 elements but the last, which
    holds at least 16 (below 16 elements the generator takes another path)."""
    rows = shape[0] if len(shape) else 1
    per_row = math.prod(shape[1:]) if len(shape) else 1
    step = max(16, DRAW_ELEMENTS // max(1, per_row) // 16 * 16)
    bounds = [*range(0, rows, step), rows]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * per_row < 16:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def write_rows(tensor: torch.Tensor, rows: Callable[[int, int], torch.Tensor]) -> None:
    """Fill ``tensor`` (plain or row-sharded) from ``rows(start, stop)``, which gives the full tensor's rows
    [start, stop) on the CPU, asked for block by block (``row_blocks``) so that draws chain as one."""
    local, first = local_rows(tensor)
    if tensor.dim() == 0:
        local.copy_(rows(0, 1).reshape(()))
        return
    last = first + local.shape[0]
    for start, stop in row_blocks(tensor.shape):
        values = rows(start, stop)
        a, b = max(start, first), min(stop, last)
        if a < b:
            local[a - first:b - first].copy_(values[a - start:b - start])


def draw(tensor: torch.Tensor, kind: str, generator: torch.Generator, std: float = 1.0, keep: bool = True) -> None:
    """Draw ``tensor``'s values as ``nn.init`` would on the CPU ("normal": N(0, std²); "uniform": the draw count of
    a uniform init; its bounds do not change which values follow), in blocks; ``keep=False`` only advances
    ``generator``."""
    full = tensor.shape

    def rows(start: int, stop: int) -> torch.Tensor:
        values = torch.empty((stop - start, *full[1:]) if len(full) else (1,), dtype=tensor.dtype)
        return values.normal_(0.0, std, generator=generator) if kind == "normal" else values.uniform_(
            generator=generator)

    if keep:
        write_rows(tensor, rows)
    else:
        for start, stop in row_blocks(full):
            rows(start, stop)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, rng_state: torch.Tensor, init_std: float,
                init_targets: Callable[[nn.Module], list[tuple[torch.Tensor, str]]]) -> None:
    """Give a model built on the meta device (and possibly sharded since) storage on ``device`` and the values an
    eager build gets when the CPU generator starts at ``rng_state`` (``torch.get_rng_state()`` taken before the
    build). ``init_targets(module)``: the model's own initialisation of one module (``HSATransformer.init_targets``).
    The global generator is left alone."""
    model.to_empty(device=device)
    for m in model.modules():  # constants (norm scales, zero scalars and buffers, RoPE frequencies)
        if not isinstance(m, (nn.Linear, nn.Embedding)) and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    generator = torch.Generator()
    generator.set_state(rng_state)
    for tensor, kind in constructor_draws(model):
        draw(tensor, kind, generator, keep=False)
    for m in apply_order(model):
        for tensor, kind in init_targets(m):
            if kind == "normal":
                draw(tensor, "normal", generator, std=init_std)
            else:
                tensor.zero_()


@torch.no_grad()
def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write a full state dict (``model.state_dict()`` names; tensors may be memory-mapped) into ``model``'s
    parameters and persistent buffers, each process its own rows. Keys and shapes are checked by the caller."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        source = state[name]
        write_rows(tensor, lambda start, stop, s=source: s[start:stop] if s.dim() else s.reshape(1))
