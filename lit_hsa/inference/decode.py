"""The model's forward for decoding: ``decode_forward(model, tokens, state)`` runs the next tokens after
``state.pos`` through the model's modules, reading and extending ``state``'s caches in place (segment prefill and
one-token steps alike), and lets the state's cache run a block's step itself where it can (``StaticKVCache``'s
fused kernels). The caches: ``KVCache`` (attention: sliding-window layers keep W positions, full-attention layers
all), the chunk memory (landmarks + K/V, optionally in host memory: ``OffloadedMemory``) and ``DecodeState`` holding
them. The model knows none of this: it attends through the masks it is given and reads the memory it is given."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from lit_hsa.model.attention import AttentionMask, Context, Rotary, attend, sliding_window_blocks
from lit_hsa.model.hsa import ChunkMemory, Memory
from lit_hsa.model.transformer import HSATransformer


@runtime_checkable
class DecodeCache(Protocol):
    """What decoding asks of an attention cache (``KVCache``: eager, growing; ``StaticKVCache``: static shapes for
    CUDA graphs): the rotary tables and masks of the next n positions, attention through the cached keys, and
    optionally a block's whole step in fused kernels."""

    @property
    def q_start(self) -> int | torch.Tensor: ...  # absolute position of the first new token (0-d tensor: static)

    def positions(self, n: int, device) -> torch.Tensor: ...

    def cos_sin(self, rotary: Rotary, n: int, device) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mask(self, window: int | None) -> "CacheMask": ...

    def attend(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor: ...

    def steps_block(self, block: nn.Module, ctx: Context, memory: Memory | None) -> bool: ...

    def block_step(self, block: nn.Module, h: torch.Tensor, ctx: Context, memory: Memory | None) -> torch.Tensor: ...

    def advance(self, n: int) -> None: ...


@runtime_checkable
class DecodingState(Protocol):
    """What ``decode_forward`` reads and extends (``DecodeState``, ``StaticDecodeState``): the attention cache, the
    chunk memory after the next tokens, and the position."""

    kv: DecodeCache

    @property
    def pos(self) -> int: ...

    def memory_after(self, chunk_memory: ChunkMemory, h: torch.Tensor) -> Memory: ...

    def advance(self, n: int) -> None: ...


@dataclass
class CacheMask(AttentionMask):
    """A layer's mask while decoding: it attends through the decoding cache, which keeps the layer's past keys and
    builds the mask from absolute positions."""

    cache: object = None

    def attend(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.cache.attend(layer, q, k, v, self.window)


@dataclass
class KVCache:
    """Past keys/values of every attention layer during decoding: sliding-window layers keep their last ``window``
    positions in ``layers[module] = (k, v)`` ``[B, L, Hkv, D]`` (bounded memory); full-attention layers keep all of
    them in ``buffers[module]`` (a ``GrowingKV``). ``pos``: absolute position of the first new token."""

    pos: int = 0
    layers: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)

    def steps_block(self, block, ctx, memory) -> bool:
        """Whether this cache runs ``block``'s step itself (``block_step``) instead of the block's modules: never
        for these eager caches (``StaticKVCache`` may, in fused kernels)."""
        return False

    def block_step(self, block, h, ctx, memory) -> torch.Tensor:
        raise NotImplementedError("KVCache never steps a block itself (steps_block is False)")

    def advance(self, n: int) -> None:
        self.pos += n

    def mask(self, window: int | None) -> "CacheMask":
        """The attention mask of layers with ``window``: it attends through this cache."""
        return CacheMask(window, cache=self)

    def positions(self, n: int, device) -> torch.Tensor:
        """Absolute positions of the next n tokens: [n]."""
        return torch.arange(self.pos, self.pos + n, device=device)

    def cos_sin(self, rotary: Rotary, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``rotary``'s cos, sin [n, D/2] at the next n positions."""
        return rotary.cos_sin(self.positions(n, device))

    @property
    def q_start(self) -> int:
        return self.pos

    def attend(self, layer: nn.Module, q, k, v, window: int | None) -> torch.Tensor:
        """New queries q [B, n, Hq, D] at positions pos..pos+n-1 against the layer's cached + new keys k, v
        [B, n, Hkv, D]; a sliding-window cache is then trimmed to the last ``window`` positions (all a later query
        can still see)."""
        if window is None:
            k, v = self.buffers.setdefault(layer, GrowingKV()).append(k, v)
            # Full attention over a long cache: a lower-right causal bias keeps SDPA on its fused kernels instead
            # of an explicit [n, L] mask (64 GB for a 64K segment against 1M cached tokens).
            return attend(q, k, v, AttentionMask(window, dense=causal_lower_right(q.shape[1], k.shape[1])))
        if (past := self.layers.get(layer)) is not None:  # at most `window` positions: a copy is cheap
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        self.layers[layer] = (k[:, -window:], v[:, -window:])
        return sliding_window_blocks(q, k, v, window)



class GrowingKV:
    """Tensors appended along dim 1 (time) into buffers that grow by a quarter when full, so a step writes only its
    new positions: concatenating the whole cache each token would copy all of it (gigabytes at a million cached
    tokens) per layer and token. Holds keys and values of a full-attention layer, or the chunk memory's landmarks
    and K/V. ``host``: keep the buffers in (pinned) host memory, whatever device the appended parts are on."""

    def __init__(self, host: bool = False):
        self.host = host
        self.buffers: list[torch.Tensor] = []
        self.length = 0

    @property
    def k(self) -> torch.Tensor:
        return self.buffers[0]

    @property
    def v(self) -> torch.Tensor:
        return self.buffers[1]

    def append(self, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """parts: [B, n, ...] each → every position so far, [B, length, ...] each (views)."""
        end = self.length + parts[0].shape[1]
        if not self.buffers or end > self.buffers[0].shape[1]:
            # +25% and at least 4096 positions: few regrowths in decoding and segment prefill alike, without
            # doubling the memory that decides where full attention runs out.
            old = self.buffers[0].shape[1] if self.buffers else 0
            capacity = max(end + 4096, old + old // 4)
            grown = [self._empty(x, capacity) for x in parts]
            for new, buffer in zip(grown, self.buffers):
                new[:, : self.length] = buffer[:, : self.length]
            self.buffers = grown
        for buffer, x in zip(self.buffers, parts):
            buffer[:, self.length : end] = x
        self.length = end
        return tuple(buffer[:, :end] for buffer in self.buffers)

    def _empty(self, like: torch.Tensor, capacity: int) -> torch.Tensor:
        shape = (like.shape[0], capacity, *like.shape[2:])
        if self.host:  # pinned: fetching selected chunks back to the accelerator is then a plain async copy
            return torch.empty(shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())
        return like.new_empty(shape)


@dataclass
class OffloadedMemory(Memory):
    """Chunk memory whose K/V live in (pinned) host memory; HSA fetches only the selected chunks."""


    def chunks_for(self, indices: torch.Tensor, chunk_size: int, device) -> tuple[Memory, torch.Tensor]:
        """Copy only the chunks that ``indices`` [B, T, H, K] select to ``device``; returns the compact memory and
        the indices renumbered into it (−1 kept)."""
        chosen, compact = torch.unique(indices.clamp(min=0), return_inverse=True)
        B, _, H, D = self.k.shape
        rows = chosen.to(self.k.device)

        def gather(x):
            x = x.view(B, -1, chunk_size, H, D)[:, rows]
            return x.to(device, non_blocking=True).reshape(B, -1, H, D)

        compact = torch.where(indices >= 0, compact, torch.full_like(compact, -1))
        return Memory(self.landmarks, gather(self.k), gather(self.v)), compact


def uncompiled():
    """Context in which blocks compiled (for training, or by a ``GraphDecoder`` for static decoding) run eagerly: for
    decoding with ``DecodeState``'s growing caches, which are found per layer and change length at every call, so
    dynamo would recompile per layer and shape until it gives up. (torch < 2.6 has no stances: nothing changes.)"""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


@dataclass
class DecodeState:
    """Everything incremental decoding keeps between calls: attention KV caches (SWA layers keep W positions), the
    lower-stack outputs of the current incomplete chunk, and the chunk memory of all completed chunks."""

    kv: KVCache = field(default_factory=KVCache)
    pending: torch.Tensor | None = None  # [B, <S, d]
    memory: Memory | None = None  # views of the two stores below
    offload_memory: bool = False  # keep chunk K/V in host memory, only landmarks on the accelerator
    landmark_store: GrowingKV = field(init=False)
    kv_store: GrowingKV = field(init=False)  # in (pinned) host memory when offloading

    def __post_init__(self):
        self.release_memory()

    @property
    def pos(self) -> int:
        return self.kv.pos

    def release_memory(self) -> None:
        """Drop the chunk memory and the incomplete chunk (empty stores)."""
        self.memory = self.pending = None
        self.landmark_store, self.kv_store = GrowingKV(), GrowingKV(host=self.offload_memory)

    def append_memory(self, new: Memory) -> Memory:
        """Add newly encoded chunks; the stores grow in place, so a chunk costs its own size, not the memory's."""
        (landmarks,) = self.landmark_store.append(new.landmarks)
        k, v = self.kv_store.append(new.k, new.v)
        self.memory = (OffloadedMemory if self.offload_memory else Memory)(landmarks, k, v)
        return self.memory

    def memory_after(self, chunk_memory: ChunkMemory, h: torch.Tensor) -> Memory:
        """The chunk memory the upper blocks read once h [B, n, d] (lower-stack outputs) joins the stream: h joins
        the incomplete chunk, and every chunk that completes is encoded (chunks are encoded independently, so this
        equals the full forward) and appended."""
        pending = h if self.pending is None else torch.cat([self.pending, h], dim=1)
        n_done = pending.shape[1] // chunk_memory.S * chunk_memory.S
        self.pending = pending[:, n_done:]
        if n_done == 0 and self.memory is not None:
            return self.memory  # no chunk completed (most decoding steps): nothing to encode or copy
        return self.append_memory(chunk_memory(pending[:, :n_done]))

    def advance(self, n: int) -> None:
        self.kv.advance(n)


def decoding_context(model: HSATransformer, T: int, device, kv: DecodeCache) -> Context:
    """The context of the next T tokens after ``kv.pos``: each window's mask attends through the cache, the rotary
    tables at the absolute positions, and the first position (an int, or a 0-d tensor on the device for static
    steps)."""
    cos, sin = kv.cos_sin(model.rotary, T, device)
    return Context(cos, sin, {w: kv.mask(w) for w in model.windows()}, None, kv.q_start)


def run_block(block: nn.Module, h: torch.Tensor, ctx: Context, memory: Memory | None, kv: DecodeCache) -> torch.Tensor:
    """One block's step: by the cache where it steps the block itself (fused kernels), else the block's modules."""
    if kv.steps_block(block, ctx, memory):
        return kv.block_step(block, h, ctx, memory)
    return block(h, ctx, memory)


def decode_forward(model: HSATransformer, input_ids: torch.Tensor, state: DecodingState) -> torch.Tensor:
    """input_ids [B, T]: the next tokens after ``state.pos`` (a ``DecodeState`` or ``StaticDecodeState``) → logits
    [B, T, V]; the state's caches are read and extended in place. Equals the full forward's logits for those
    positions."""
    T = input_ids.shape[1]
    # the embedding first: a static step's rotary kernel (``StaticKVCache.cos_sin``) then launches with PDL right
    # before the first block's, which can load its weights while it runs
    h = model.embed(input_ids)
    ctx = decoding_context(model, T, input_ids.device, state.kv)
    for block in model.lower:
        h = run_block(block, h, ctx, None, state.kv)
    memory = state.memory_after(model.memory, h) if model.memory is not None else None
    for block in model.upper:
        h = run_block(block, h, ctx, memory, state.kv)
    state.advance(T)
    return F.linear(model.norm(h), model.head_weight())
