"""HSA-UltraLong Transformer (spec §2): SWA blocks below, a chunk memory built once in the middle, and groups of
(retrieval + HSA block + SWA blocks) above. A plain ``nn.Module``: no Lightning here.

    tokens → embed → n_lower × Block(SWA)
           → ChunkMemory(h)                      landmarks [B, C, Hr, Dr], K/V [B, C·S, Hkv, D]  (shared by HSA blocks)
           → n_groups × [HSABlock → swa_layers_per_group × Block(SWA)]
           → RMSNorm → LM head
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import static_step_uses_references
from kernels.hsa import (fusion_weights, hsa_attention, hsa_attention_reference, select_chunks,
                         select_chunks_reference)

from .attention import AttentionMask, GrowingKV, KVCache, RMSNorm, Rotary, SelfAttention, build_mask
from .config import ModelConfig
from .fused_step import hsa_fusable
from .loss import chunk_loss_sum, chunked_cross_entropy
from .moe import MoE, SwiGLU


def make_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if cfg.moe and layer_idx >= cfg.first_dense_layers:
        return MoE(cfg.d_model, cfg.n_experts, cfg.experts_per_token, cfg.expert_hidden, cfg.n_shared_experts,
                   cfg.router_bias_update_rate, cfg.aux_loss_coef)
    return SwiGLU(cfg.d_model, cfg.ffn_hidden)


@dataclass
class Context:
    """Per-forward state shared by all blocks: rotary tables, attention masks by window, document ids."""

    cos: torch.Tensor
    sin: torch.Tensor
    masks: dict
    doc_ids: torch.Tensor | None
    q_start: int | torch.Tensor = 0  # absolute position of the first token (decoding)

    @property
    def kv_cache(self) -> "KVCache | None":
        """The decoding cache (every mask holds the same one), or None."""
        return next(iter(self.masks.values())).kv_cache if self.masks else None


class Block(nn.Module):
    """Pre-norm Transformer block: h += Attn(norm h) (SWA or full, RoPE); h += FFN(norm h)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.window = window
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = make_ffn(cfg, layer_idx)

    def forward(self, h: torch.Tensor, ctx: Context, memory: Memory | None = None) -> torch.Tensor:
        """``memory`` is unused: all blocks share one call signature, so wrappers (checkpointing) stay transparent."""
        kv = ctx.kv_cache
        if kv is not None and kv.fuse_blocks:  # static decoding: the step in fused kernels (lit_hsa.fused_step)
            return kv.block_step(self, h, ctx, memory)
        h = h + self.attn(self.attn_norm(h), ctx.cos, ctx.sin, ctx.masks[self.window])
        return h + self.ffn(self.ffn_norm(h))


class EncoderLayer(nn.Module):
    """Bidirectional layer of the chunk encoder (RoPE inside the chunk, QKV bias, SwiGLU ≈ 8d/3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, bias=True,
                                  eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, 64 * math.ceil(8 * cfg.d_model / 3 / 64))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, None)
        return x + self.ffn(self.ffn_norm(x))


@dataclass
class Memory:
    """Chunk memory: landmarks [B, C, Hr, Dr]; k, v [B, C·S, Hkv, D] (token i of chunk c at row c·S + i)."""

    landmarks: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    offloaded: bool = False  # k/v live in (pinned) host memory; HSA fetches only the selected chunks

    @property
    def n_chunks(self) -> int:
        return self.landmarks.shape[1]

    def fetch(self, indices: torch.Tensor, chunk_size: int, device) -> tuple["Memory", torch.Tensor]:
        """Offloaded memory: copy only the chunks that ``indices`` [B, T, H, K] select to ``device``; returns the
        compact memory and the indices renumbered into it (−1 kept)."""
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
        self.memory = Memory(landmarks, k, v, offloaded=self.offload_memory)
        return self.memory

    def memory_after(self, chunk_memory: "ChunkMemory", h: torch.Tensor) -> Memory:
        """The chunk memory the upper blocks read once h [B, n, d] (lower-stack outputs) joins the stream."""
        return chunk_memory.extend(self, h)

    def advance(self, n: int) -> None:
        self.kv.pos += n


class ChunkMemory(nn.Module):
    """Cuts h into chunks of S tokens, encodes each with a learned [CLS] vector appended last (position S), and
    projects the [CLS] output to a landmark and the token outputs to HSA keys/values (NoPE; RMSNorm on K)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.S = cfg.chunk_size
        self.n_kv, self.hd = cfg.hsa_kv_heads, cfg.head_dim
        self.n_r, self.dr = cfg.retrieval_heads, cfg.retrieval_head_dim
        self.cls = nn.Parameter(torch.zeros(cfg.d_model))
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.landmark = nn.Linear(cfg.d_model, self.n_r * self.dr, bias=False)
        self.landmark_norm = RMSNorm(self.dr, cfg.norm_eps) if cfg.retrieval_norm else nn.Identity()
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, h: torch.Tensor) -> Memory:
        """h: [B, T, d]; only the C = T // S complete chunks are encoded (a partial chunk is never visible)."""
        B, T, d = h.shape
        C = T // self.S
        if C == 0:
            return Memory(h.new_zeros(B, 0, self.n_r, self.dr), h.new_zeros(B, 0, self.n_kv, self.hd),
                          h.new_zeros(B, 0, self.n_kv, self.hd))
        x = h[:, : C * self.S].reshape(B * C, self.S, d)
        if self.layers:
            x = torch.cat([x, self.cls.to(x.dtype).expand(B * C, 1, d)], dim=1)
            cos, sin = self.rotary.cos_sin(torch.arange(self.S + 1, device=h.device))
            for layer in self.layers:
                x = layer(x, cos, sin)
            x = self.norm(x)
            summary, tokens = x[:, self.S], x[:, : self.S]
        else:
            tokens = self.norm(x)
            summary = tokens.mean(dim=1)
        landmarks = self.landmark_norm(self.landmark(summary).view(B, C, self.n_r, self.dr))
        k = self.k_norm(self.k_proj(tokens).view(B, C * self.S, self.n_kv, self.hd))
        v = self.v_proj(tokens).view(B, C * self.S, self.n_kv, self.hd)
        return Memory(landmarks, k, v)

    def extend(self, state: DecodeState, h: torch.Tensor) -> Memory:
        """Decoding: add h [B, n, d] to the incomplete chunk; encode every chunk that completes (chunks are encoded
        independently, so this equals the full forward) and append it to ``state``'s memory."""
        pending = h if state.pending is None else torch.cat([state.pending, h], dim=1)
        n_done = pending.shape[1] // self.S * self.S
        state.pending = pending[:, n_done:]
        if n_done == 0 and state.memory is not None:
            return state.memory  # no chunk completed (most decoding steps): nothing to encode or copy
        return state.append_memory(self(pending[:, :n_done]))


class Retrieval(nn.Module):
    """q_slc = Linear(RMSNorm(h)) per retrieval head → top-k visible chunks and their fusion weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.retrieval_heads * cfg.retrieval_head_dim, bias=False)
        # QK-norm for retrieval: unnormalised q·landmark scores start near 0 at init (both factors are small), so
        # fusion is uniform and the bilinear score learns slowly; normalised, they start O(1) like attention's.
        self.q_norm = RMSNorm(cfg.retrieval_head_dim, cfg.norm_eps) if cfg.retrieval_norm else nn.Identity()
        self.pos_decay = nn.Parameter(torch.zeros(())) if cfg.pos_decay else None

    def forward(self, h: torch.Tensor, memory: Memory, doc_ids: torch.Tensor | None, q_start: int | torch.Tensor = 0):
        """→ weights [B, T, Hkv, K] (float32), indices [B, T, Hkv, K] (int64, −1 empty)."""
        cfg = self.cfg
        B, T, _ = h.shape
        q_slc = self.q_norm(self.q_proj(self.norm(h)).view(B, T, cfg.retrieval_heads, cfg.retrieval_head_dim))
        # No more slots than chunks exist: a dense top-k (warm-up) on a short sequence would otherwise carry
        # empty slots that still cost gather and attention work.
        topk = max(1, min(cfg.hsa_topk, memory.landmarks.shape[1]))
        select = select_chunks_reference if static_step_uses_references(q_start) else select_chunks
        scores, indices = select(q_slc, memory.landmarks, topk, cfg.chunk_size, doc_ids,
                                 q_start=q_start, gumbel_noise=cfg.gumbel_noise and self.training)
        if self.pos_decay is not None:
            rank = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
            scores = scores + self.pos_decay.to(scores.dtype) * rank  # slot j holds the j-th most recent chunk
        weights = fusion_weights(scores, cfg.fusion)
        if cfg.shared_selection and cfg.hsa_kv_heads > 1:
            weights = weights.expand(B, T, cfg.hsa_kv_heads, -1)
            indices = indices.expand(B, T, cfg.hsa_kv_heads, -1)
        return weights, indices


class HSABlock(nn.Module):
    """retrieval(h) ; [h += SWA(norm h)] ; o = HSA(norm h) ; bypass: h + FFN(norm(h + o)) | standard: h += o;
    h += FFN."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, swa_window: int | None):
        """swa_window: window of the SWA sub-layer (None: no sub-layer, i.e. model.hsa_layer_swa is false)."""
        super().__init__()
        self.cfg = cfg
        self.swa_window = swa_window
        if swa_window is not None:
            self.swa_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.swa = SelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, eps=cfg.norm_eps)
        self.retrieval = Retrieval(cfg)
        self.hsa_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.hsa_q_heads * cfg.head_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.hsa_q_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = make_ffn(cfg, layer_idx)
        self.last_selection: tuple[torch.Tensor, torch.Tensor] | None = None  # for retrieval statistics

    def forward(self, h: torch.Tensor, ctx: Context, memory: Memory) -> torch.Tensor:
        kv = ctx.kv_cache
        # static decoding: the step in fused kernels (lit_hsa.fused_step)
        if kv is not None and kv.fuse_blocks and hsa_fusable(self, ctx, memory, kv.compiled):
            return kv.block_step(self, h, ctx, memory)
        h_in = h  # the retrieval reads the block's input, before the SWA sub-layer (spec §2)
        if self.swa_window is not None:
            h = h + self.swa(self.swa_norm(h), ctx.cos, ctx.sin, ctx.masks[self.swa_window])
        return self.feed_forward(h, h + self.hsa_output(h, ctx, memory, h_in))

    def hsa_output(self, h: torch.Tensor, ctx: Context, memory: Memory,
                   h_retrieval: torch.Tensor | None = None) -> torch.Tensor:
        """o = o_proj(HSA(norm h)) with the chunks the retrieval selects from ``h_retrieval`` (the block's input;
        default h): h [B, T, d] → [B, T, d]."""
        cfg = self.cfg
        B, T, _ = h.shape
        if memory.n_chunks == 0:  # nothing retrievable yet (sequence shorter than one chunk)
            return torch.zeros_like(h)
        h_retrieval = h if h_retrieval is None else h_retrieval
        weights, indices = self.retrieval(h_retrieval, memory, ctx.doc_ids, ctx.q_start)
        self.last_selection = (weights.detach(), indices.detach())
        q = self.q_norm(self.q_proj(self.hsa_norm(h)).view(B, T, cfg.hsa_q_heads, cfg.head_dim))
        if memory.offloaded:
            memory, indices = memory.fetch(indices, cfg.chunk_size, h.device)
        attend = hsa_attention_reference if static_step_uses_references(ctx.q_start) else hsa_attention
        o = attend(q, memory.k.to(q.dtype), memory.v.to(q.dtype), weights, indices, cfg.chunk_size,
                   off_by_one=cfg.softmax_off_by_one)
        return self.o_proj(o.reshape(B, T, -1))

    def feed_forward(self, h: torch.Tensor, h_o: torch.Tensor) -> torch.Tensor:
        """The block's output from h and h_o = h + o: bypass h + FFN(norm(h + o)), standard h_o + FFN(norm h_o)."""
        return self.ffn_residual(h, h_o) + self.ffn(self.ffn_norm(h_o))

    def ffn_residual(self, h: torch.Tensor, h_o: torch.Tensor) -> torch.Tensor:
        """What the feed-forward's output is added to: h (bypass, HSA's output feeds only the FFN) or h_o = h + o."""
        return h if self.cfg.hsa_residual == "bypass" else h_o


class HSATransformer(nn.Module):
    """input_ids: [B, T] (int64), doc_ids: [B, T] or None → logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (the CLI fills it from the tokenizer)")
        self.cfg = cfg
        window = None if cfg.attention == "full" else cfg.swa_window
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        self.lower = nn.ModuleList(Block(cfg, i, window) for i in range(cfg.n_lower_layers))
        self.memory = ChunkMemory(cfg) if cfg.attention == "hsa" else None
        # Window of the HSA blocks' own SWA sub-layer: fixed at build (set_swa_window changes the SWA blocks only).
        has_sub_layer = cfg.attention == "hsa" and cfg.hsa_layer_swa
        self.hsa_swa_window = (cfg.hsa_swa_window or cfg.swa_window) if has_sub_layer else None
        upper, idx = [], cfg.n_lower_layers
        for _ in range(cfg.n_groups):
            upper.append(HSABlock(cfg, idx, self.hsa_swa_window) if cfg.attention == "hsa" else Block(cfg, idx, window))
            upper.extend(Block(cfg, idx + 1 + j, window) for j in range(cfg.swa_layers_per_group))
            idx += 1 + cfg.swa_layers_per_group
        self.upper = nn.ModuleList(upper)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.chunk_loss = chunk_loss_sum  # per row chunk of the loss; parallel.apply_compile swaps in a compiled one
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MoE):
            for w in (module.w_gate, module.w_up, module.w_down):
                nn.init.normal_(w, 0.0, std)
        elif isinstance(module, ChunkMemory):
            nn.init.normal_(module.cls, 0.0, std)

    def set_hsa_topk(self, topk: int) -> None:
        """Change the number of retrieved chunks (stage / schedule changes; no parameter depends on it)."""
        self.cfg.hsa_topk = topk

    def set_swa_window(self, window: int) -> None:
        """Change the window of the SWA blocks (not of the HSA blocks' own SWA sub-layer)."""
        if self.cfg.attention == "full":
            raise ValueError("model.attention is 'full': there is no sliding window to change")
        for m in self.modules():
            if isinstance(m, Block):
                m.window = window
        self.cfg.swa_window = window

    def blocks(self) -> list[nn.Module]:
        return [*self.lower, *self.upper]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def hsa_blocks(self) -> list[HSABlock]:
        return [m for m in self.modules() if isinstance(m, HSABlock)]

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def make_context(self, T: int, device, doc_ids: torch.Tensor | None, kv: KVCache | None = None) -> Context:
        cfg = self.cfg
        backend = cfg.attn_backend
        if backend == "auto":
            backend = "flex" if torch.device(device).type == "cuda" else "sdpa"
        windows = {None if cfg.attention == "full" else cfg.swa_window}
        if self.hsa_swa_window is not None:
            windows.add(self.hsa_swa_window)
        if kv is not None:  # decoding: each layer masks against its own cache
            masks = {w: AttentionMask(w, kv_cache=kv) for w in windows}
        else:
            masks = {w: build_mask(T, w, doc_ids, device, backend) for w in windows}
        if kv is not None:
            cos, sin = kv.cos_sin(self.rotary, T, device)
        else:
            cos, sin = self.rotary.cos_sin(torch.arange(T, device=device))
        # q_start: an int, or (static-shape decoding) a 0-d tensor on the device
        return Context(cos, sin, masks, doc_ids, kv.q_start if kv is not None else 0)

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                state: DecodeState | None = None, labels: torch.Tensor | None = None,
                loss_weight: torch.Tensor | None = None) -> torch.Tensor:
        """With ``state`` (decoding / segment prefill): ``input_ids`` are the next tokens after ``state.pos``;
        caches are read and extended in place. Returns logits [B, T, V] for the given tokens, or with ``labels``
        [B, T] the mean cross-entropy (weighted by ``loss_weight`` [B, T] when given), computed in row chunks so
        [T, V] logits never exist (and inside forward, so FSDP has the head weight gathered)."""
        B, T = input_ids.shape
        if state is not None and doc_ids is not None:
            raise ValueError("document masking is not supported while decoding with a DecodeState")
        # the embedding first: a decoding step's rotary kernel (``StaticKVCache.cos_sin``) then launches with PDL
        # right before the first block's, which can load its weights while it runs
        h = self.embed(input_ids)
        ctx = self.make_context(T, input_ids.device, doc_ids, state.kv if state is not None else None)
        for block in self.lower:
            h = block(h, ctx, None)
        if self.memory is None:
            memory = None
        elif state is not None:
            memory = state.memory_after(self.memory, h)
        else:
            memory = self.memory(h)
        for block in self.upper:
            h = block(h, ctx, memory)
        if state is not None:
            state.advance(T)
        h = self.norm(h)
        if labels is not None:
            weights = loss_weight.flatten() if loss_weight is not None else None
            return chunked_cross_entropy(h.flatten(0, 1), self.head_weight(), labels.flatten(), weights,
                                         chunk_loss=self.chunk_loss)
        return F.linear(h, self.head_weight())

    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token): routed experts count k/E of their parameters; tied embeddings once."""
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(m.routed_parameters() * (m.n_experts - m.top_k) / m.n_experts for m in self.moe_layers())
        return total, int(total - inactive)
