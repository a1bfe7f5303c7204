"""Decoding with static shapes, so that one decoding step can be captured as a CUDA graph and replayed per token.

Eager decoding launches every kernel of every layer from Python for each token, and its caches grow; at batch 1 the
GPU mostly waits for the host. Here every cache is allocated once for ``max_len`` positions and the current position
lives on the device, so a step has the same shapes and addresses every time:

- sliding-window layers: a ring of W slots per layer, ``[B, Hkv, W, D]``; position p lives in slot p mod W (on CUDA
  a layer's step, write and attention, is one Triton kernel: ``kernels.decode``; a dense block's whole step is five,
  an HSA block's eight: ``lit_hsa.inference.fused_step``);
- full-attention layers: ``[B, Hkv, max_len, D]``, positions after the current one masked;
- the chunk memory: landmarks ``[B, max_len/S, Hr, Dr]`` and K/V ``[B, max_len, Hkv, D]``; chunks not yet written are
  in the future, so the usual visibility rule (chunk i is visible at t ≥ (i+1)·S) hides them; the lower-stack
  outputs of the chunk being filled wait in ``[B, S, d]`` and are encoded by the step that completes the chunk.

The prompt is prefilled with the ordinary ``DecodeState`` (segments, any length); ``StaticDecodeState`` takes its
caches over. A step that completes a chunk also runs the chunk encoder, so ``GraphDecoder`` keeps two graphs.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
from torch import nn

from lit_hsa.inference import fused_step
from lit_hsa.inference.decode import CacheMask, DecodeState, KVCache, decode_forward, uncompiled
from lit_hsa.kernels.decode import SPLIT_KEYS, ring_slot_and_mask, write_and_attend
from lit_hsa.kernels.dispatch import fused_blocks_apply, use_ring_kernel
from lit_hsa.model.hsa import HSABlock, Memory
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.model.units import apply_compile, is_compiled


def decode_compile_options(backend: str) -> dict | None:
    """Inductor options for decoding steps. Coordinate-descent tuning makes inductor write a batch-1 step's
    matrix-vector products as its own tuned reductions (``mm`` of one row decomposes into multiply + sum, fused with
    the neighbouring norms, casts and activations) instead of cuBLAS calls, which are slow at one row
    (benchmarks/results/generate_compiled_small_h200_2026-11-29_landmarks.json). It also tunes every fused kernel's
    launch shape. Costs compile time once (under a minute)."""
    return {"coordinate_descent_tuning": True} if backend == "inductor" else None


@functools.lru_cache(maxsize=None)
def compiled_write_and_attend(backend: str):
    # One graph per cache shape (rings of W slots, full caches of max_len): the cast, scale, mask and softmax passes
    # over the [G, L] scores fuse, which matters for full attention at a million cached keys.
    return torch.compile(write_and_attend, backend=backend, dynamic=False, options=decode_compile_options(backend))


class StaticKVCache:
    """Attention caches of static shape (see the module docstring), filled from an eager ``KVCache`` on each layer's
    first step: ``source``'s entry for that layer is moved over and dropped, so the two never both hold a layer."""

    def __init__(self, source: KVCache, max_len: int, device, fuse_blocks: bool = False):
        self.source, self.max_len = source, max_len
        self.pos = source.pos  # host copy of pos_t, for the host-side decisions (which graph, bounds)
        self.pos_t = torch.tensor(source.pos, device=device)
        # blocks' steps in fused Triton kernels (lit_hsa.inference.fused_step), where the backend switch allows Triton
        self.fuse_blocks = fuse_blocks and fused_blocks_apply(self.pos_t)
        self.rings: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.full: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}  # this step's, by window
        self.step_attention = write_and_attend  # ``compile`` swaps in a compiled one
        self.compiled = False
        self._locks: torch.Tensor | None = None

    def advance(self, n: int) -> None:
        self.pos_t += n
        self.pos += n
        self._slots.clear()

    @property
    def q_start(self) -> torch.Tensor:
        return self.pos_t

    def positions(self, n: int, device) -> torch.Tensor:
        return self.pos_t + torch.arange(n, device=device)

    def cos_sin(self, rotary: nn.Module, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``rotary``'s cos, sin [n, D/2] at the next n positions: one kernel for a fused step's token."""
        if self.fuse_blocks and n == 1:
            from lit_hsa.kernels.decode.triton_block import rope_cos_sin

            return rotary.scale(*rope_cos_sin(self.pos_t, rotary.inv_freq))  # YaRN's factor: one more kernel
        return rotary.cos_sin(self.positions(n, device))

    def compile(self, backend: str = "inductor") -> None:
        self.step_attention = compiled_write_and_attend(backend)
        self.compiled = True

    # Opaque to torch.compile (blocks compiled for decoding break the graph here): the caches are found by layer,
    # and dynamo would guard on each layer's identity and recompile per layer. The tensor work inside is compiled
    # on its own (``compile``).
    @torch.compiler.disable
    def attend(self, layer: nn.Module, q, k, v, window: int | None) -> torch.Tensor:
        """q: [B, 1, Hq, D], k/v: [B, 1, Hkv, D] of the token at pos → [B, 1, Hq, D]."""
        if q.shape[1] != 1:
            raise ValueError(f"static decoding takes one token per step, got {q.shape[1]}")
        ck, cv = self._full(layer, k) if window is None else self._ring(layer, k, window)
        if self.ring_kernel_applies(window, q, q.shape[-1]):
            from lit_hsa.kernels.decode.triton_ring import ring_attention_triton

            return ring_attention_triton(q, k, v, ck, cv, self.pos_t, self._ring_locks(ck))
        slot, valid = self._slot_and_mask(window, ck.shape[2])
        return self.step_attention(q, k, v, ck, cv, slot, valid)

    def mask(self, window: int | None) -> CacheMask:
        """The attention mask of layers with ``window``: it attends through these static caches."""
        return CacheMask(window, cache=self)

    def steps_block(self, block: nn.Module, ctx, memory: Memory | None) -> bool:
        """Whether ``block``'s step runs in fused kernels here (``block_step``) rather than through its modules: dense
        blocks wherever blocks fuse, HSA blocks where ``fused_step.hsa_fusable`` also holds."""
        if not self.fuse_blocks:
            return False
        return not isinstance(block, HSABlock) or fused_step.hsa_fusable(block, ctx, memory, self.compiled)

    @torch.compiler.disable
    def block_step(self, block: nn.Module, h: torch.Tensor, ctx, memory: Memory | None = None) -> torch.Tensor:
        """A block's whole step (dense or HSA), h [B, 1, d] → [B, 1, d], in fused kernels
        (``lit_hsa.inference.fused_step``)."""
        return fused_step.block_step(block, h, ctx, self, memory)

    def attend_and_project(self, layer: nn.Module, q, k, v, window: int | None, w_out: torch.Tensor,
                           residual: torch.Tensor, rope=None) -> torch.Tensor:
        """residual [B, 1, d] + attend(q, k, v) · w_outᵀ → [B, 1, d]. Ring steps on the kernel merge the attention
        inside the projection (``ring_attention_out_proj``); other steps attend, then project (``gemv``). ``rope``
        (a ``kernels.decode.reference.HeadRope``; only where ``ring_kernel_applies``): q and k are raw projections
        whose per-head norms and RoPE the ring kernel applies."""
        ck, cv = self._full(layer, k) if window is None else self._ring(layer, k, window)
        if self.ring_kernel_applies(window, q, q.shape[-1]):
            from lit_hsa.kernels.decode.triton_ring import ring_attention_out_proj

            return ring_attention_out_proj(q, k, v, ck, cv, self.pos_t, w_out, residual, self._ring_locks(ck),
                                           rope=rope)
        if rope is not None:
            raise ValueError("attend_and_project: raw q/k (rope) are for steps on the ring kernel only")
        from lit_hsa.kernels.decode.triton_block import gemv

        o = self.attend(layer, q, k, v, window)
        return gemv(o.flatten(2), w_out, residual=residual).view_as(residual)

    def ring_kernel_applies(self, window: int | None, x: torch.Tensor, head_dim: int) -> bool:
        """Whether a step of the layer with ``window`` (None: full attention), in x's dtype and device, takes the ring
        kernel: ring caches only, where it beats the alternative (the reference, compiled when the step is;
        ``kernels.dispatch.use_ring_kernel``)."""
        return window is not None and use_ring_kernel(x, head_dim, window, compiled_fallback=self.compiled)

    def _ring_locks(self, ck: torch.Tensor) -> torch.Tensor:
        """The ring kernel's per-(sequence, KV head) counters (it leaves them zero), one buffer for every layer: made
        by the first, eager step, so a captured graph holds no memset."""
        n = ck.shape[0] * ck.shape[1]
        if self._locks is None or self._locks.numel() < n:
            self._locks = torch.zeros(n, dtype=torch.int32, device=ck.device)
        return self._locks

    def _slot_and_mask(self, window: int | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where this step's key goes ([1]) and which of the ``length`` cached keys it may see ([length] bool). The
        same for every layer with this window, so computed once per step (``advance`` forgets it)."""
        if window not in self._slots:
            if window is None:
                self._slots[window] = (self.pos_t.view(1), torch.arange(length, device=self.pos_t.device) <= self.pos_t)
            else:
                self._slots[window] = ring_slot_and_mask(self.pos_t, window)
        return self._slots[window]

    # The caches take the dtype of the step's own keys, and the prefilled ones are cast into it: a prefill under
    # autocast leaves bf16 caches, while fused steps compute in the weights' dtype (Triton kernels ignore autocast).
    def _full(self, layer, k):
        if layer not in self.full:
            B, _, Hkv, D = k.shape
            capacity = -(-self.max_len // SPLIT_KEYS) * SPLIT_KEYS  # whole slices for decode_attention
            ck, cv = (k.new_zeros(B, Hkv, capacity, D) for _ in range(2))
            if (grown := self.source.buffers.pop(layer, None)) is not None:
                n = grown.length
                ck[:, :, :n] = grown.k[:, :n].transpose(1, 2).to(ck.dtype)
                cv[:, :, :n] = grown.v[:, :n].transpose(1, 2).to(cv.dtype)
            self.full[layer] = (ck, cv)
        return self.full[layer]

    def _ring(self, layer, k, window: int):
        if layer not in self.rings:
            B, _, Hkv, D = k.shape
            ck, cv = (k.new_zeros(B, Hkv, window, D) for _ in range(2))
            if (past := self.source.layers.pop(layer, None)) is not None:  # positions pos-n .. pos-1
                n = past[0].shape[1]
                slots = torch.arange(self.pos - n, self.pos, device=k.device) % window
                ck[:, :, slots] = past[0].transpose(1, 2).to(ck.dtype)
                cv[:, :, slots] = past[1].transpose(1, 2).to(cv.dtype)
            self.rings[layer] = (ck, cv)
        return self.rings[layer]


class StaticDecodeState:
    """Drop-in for ``DecodeState`` in ``decode_forward(model, tokens [B, 1], state)``, with the static caches of the
    module docstring. ``state``: a prefilled ``DecodeState`` (its caches are taken over); ``max_len``: the most
    positions (prompt + generated) the caches will hold. ``fused_casts``: the step runs in compiled blocks, whose
    kernels convert what they load, so the landmarks stay in the memory's dtype (see below). ``fuse_blocks``: dense and
    HSA blocks step in fused Triton kernels where the backend switch allows (``lit_hsa.inference.fused_step``)."""

    def __init__(self, model: HSATransformer, state: DecodeState, max_len: int, fused_casts: bool = False,
                 fuse_blocks: bool = False):
        if state.offload_memory:
            raise ValueError("static decoding keeps the chunk memory on the accelerator: offload_memory is not "
                             "supported")
        if state.pos == 0:
            raise ValueError("prefill the prompt before static decoding (the caches take their dtypes from it)")
        if max_len <= state.pos:
            raise ValueError(f"max_len ({max_len}) must exceed the {state.pos} positions already cached")
        device = model.embed.weight.device
        self.kv = StaticKVCache(state.kv, max_len, device, fuse_blocks)
        self.max_len = max_len
        self.chunk_size = model.cfg.chunk_size
        self.has_memory = model.memory is not None
        if self.has_memory:
            S, mem = self.chunk_size, state.memory
            capacity = -(-max_len // S)
            B, n = mem.landmarks.shape[:2]
            # Chunk selection scores in fp32 (``select_chunks_reference``). Run eagerly on bf16 landmarks, every step
            # would first write an fp32 copy of all of them (twice the bytes of the read) for each HSA layer, the
            # step's largest memory traffic at millions of cached tokens (256K landmarks × 640 dims at 16M for
            # `small`), so they are kept in fp32 (the same values: they come from the memory's dtype). In compiled
            # blocks the cast happens in the scoring kernel's registers, and the memory's dtype halves the read.
            dtype = mem.landmarks.dtype if fused_casts else torch.float32
            self.landmarks = mem.landmarks.new_zeros(B, capacity, *mem.landmarks.shape[2:], dtype=dtype)
            self.k, self.v = (mem.k.new_zeros(B, capacity * S, *mem.k.shape[2:]) for _ in range(2))
            self.landmarks[:, :n], self.k[:, : n * S], self.v[:, : n * S] = mem.landmarks, mem.k, mem.v
            self.pending = state.pending.new_zeros(B, S, state.pending.shape[-1])
            self.pending[:, : state.pending.shape[1]] = state.pending
            state.release_memory()  # taken over: free the eager copies

    @property
    def pos(self) -> int:
        return self.kv.pos

    @property
    def completes_chunk(self) -> bool:
        """Whether the next step fills the current chunk (and so runs the chunk encoder): decided on the host."""
        return self.has_memory and (self.pos + 1) % self.chunk_size == 0

    def memory_after(self, chunk_memory: nn.Module, h: torch.Tensor) -> Memory:
        """h: [B, 1, d] joins the current chunk; on the step that completes it, the chunk is encoded into its slot."""
        S, pos = self.chunk_size, self.kv.pos_t
        if self.kv.fuse_blocks:  # the fused step's kernels: one launch, which the next kernel's prefetch overlaps
            from lit_hsa.kernels.decode.triton_block import write_slot

            write_slot(self.pending, h, pos)
        else:
            self.pending.index_copy_(1, (pos % S).view(1), h.to(self.pending.dtype))
        if self.completes_chunk:
            new = chunk_memory(self.pending)
            c = (pos // S).view(1)
            rows = c * S + torch.arange(S, device=h.device)
            self.landmarks.index_copy_(1, c, new.landmarks.to(self.landmarks.dtype))
            self.k.index_copy_(1, rows, new.k.to(self.k.dtype))
            self.v.index_copy_(1, rows, new.v.to(self.v.dtype))
        return Memory(self.landmarks, self.k, self.v)

    def advance(self, n: int) -> None:
        self.kv.advance(n)


class GraphDecoder:
    """``step(tokens [B]) → logits [B, V]``: one decoding step with static shapes, replayed from a CUDA graph.

    The first step of each kind (plain, chunk-completing) runs eagerly: it warms up the kernels and moves the eager
    caches over; the next step of that kind is captured, and every later one replays the graph. Without CUDA every
    step runs eagerly on the static state, which computes the same thing. MoE layers route a decoding step's few
    tokens through gathered expert weights (``MoE._run_gathered``), so they need no host synchronisation either.
    Capture under autocast disables autocast's weight cache (a cached cast would be freed into the graph's memory
    pool); for the fastest steps cast the model to bf16 instead of using autocast.

    ``compile``: a torch.compile backend ("inductor") for the model's blocks and the cache attention, or None. A
    replayed step then launches inductor's fused kernels instead of one kernel per operator (norms, RoPE, SwiGLU,
    softmax) and tuned reductions instead of cuBLAS matrix-vector calls (``decode_compile_options``): at batch 1 the
    step is bound by the latency of its kernels. The blocks are compiled in place (like ``trainer.compile``), and
    the graphs compile in the warm-up steps (under a minute on an H200), so it pays off for long generations and
    serving, not for a few tokens.

    ``fuse_blocks``: on CUDA (or wherever ``kernels.hsa``'s backend switch sends ops to Triton) the dense blocks' steps
    run in five fused Triton launches each, the HSA blocks' in eight where ``fused_step.hsa_fusable`` holds
    (``lit_hsa.inference.fused_step``), whether or not the rest is compiled.
    """

    def __init__(self, model: HSATransformer, state: DecodeState, max_len: int, compile: str | None = None,
                 fuse_blocks: bool = True):
        self.model = model
        self.state = StaticDecodeState(model, state, max_len, fused_casts=compile == "inductor",
                                       fuse_blocks=fuse_blocks)
        self.compile = compile
        if compile is not None:
            if not is_compiled(model):  # compiling again would pile up dynamo cache entries for the same blocks
                apply_compile(model, compile, decode_compile_options(compile))
            self.state.kv.compile(compile)
        device = model.embed.weight.device
        self.use_graphs = device.type == "cuda"
        self.tokens: torch.Tensor | None = None  # [B, 1]: the graphs read their input from here
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.warm: set[bool] = set()
        self.pool = None

    def _forward(self) -> torch.Tensor:
        with uncompiled() if self.compile is None else nullcontext():  # blocks compiled for training stay eager
            return decode_forward(self.model, self.tokens, self.state)[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.state.pos >= self.state.max_len:
            raise ValueError(f"static decoding reached max_len={self.state.max_len}")
        if self.tokens is None:
            self.tokens = tokens.new_zeros(tokens.shape[0], 1)
        elif self.tokens.shape[0] != tokens.shape[0]:
            raise ValueError(f"the batch size is fixed at {self.tokens.shape[0]}, got {tokens.shape[0]}")
        self.tokens.copy_(tokens.view(-1, 1))
        kind = self.state.completes_chunk
        if not self.use_graphs or kind not in self.warm:
            self.warm.add(kind)
            with self._autocast():  # as at capture, so compiled blocks' guards on autocast state still hold then
                return self._forward()
        if kind not in self.graphs:
            self.graphs[kind] = self._capture()
        graph, logits = self.graphs[kind]
        graph.replay()
        self.state.kv.pos += 1  # the replayed graph advanced pos_t on the device (advance ran at capture)
        return logits.clone()

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        pos = self.state.kv.pos
        with self._autocast(), torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward()
        self.state.kv.pos = pos  # capture ran the Python (host counters) but none of the kernels
        return graph, logits

    def _autocast(self):
        """The caller's autocast without its weight cache (see the class docstring); nothing without graphs."""
        if not self.use_graphs:
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                              cache_enabled=False)
