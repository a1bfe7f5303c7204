"""HSA-UltraLong Transformer (spec §2): SWA blocks below, a chunk memory built once in the middle, and groups of
(retrieval + HSA block + SWA blocks) above. A plain ``nn.Module``: no Lightning here.

    tokens → embed → n_lower × Block(SWA)
           → ChunkMemory(h)                      landmarks [B, C, Hr, Dr], K/V [B, C·S, Hkv, D]  (shared by HSA blocks)
           → n_groups × [HSABlock → swa_layers_per_group × Block(SWA)]
           → RMSNorm → LM head
"""
from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lit_hsa.model.attention import Context, RMSNorm, Rotary, SelfAttention, build_mask
from lit_hsa.model.config import ModelConfig
from lit_hsa.model.hsa import ChunkMemory, HSABlock, Memory, Retrieval
from lit_hsa.model.loss import chunk_loss_sum, chunked_cross_entropy
from lit_hsa.model.moe import MoE, make_ffn


class Block(nn.Module):
    """Pre-norm Transformer block: h += Attn(norm h) (SWA or full, RoPE); h += FFN(norm h)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.window = window
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias,
                                  cfg.norm_eps, cfg.attn_out_bias)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = make_ffn(cfg, layer_idx)

    def forward(self, h: torch.Tensor, ctx: Context, memory: Memory | None = None) -> torch.Tensor:
        """``memory`` is unused: all blocks share one call signature, so wrappers (checkpointing) stay transparent."""
        h = h + self.attn(self.attn_norm(h), ctx.cos, ctx.sin, ctx.masks[self.window])
        return h + self.ffn(self.ffn_norm(h))


class SequenceShard(Protocol):
    """One contiguous slice of longer sequences (context parallelism: ``lit_hsa.training.context_parallel``). It
    builds the context of the slice's tokens (rotary tables at their absolute positions, masks whose attention also
    reads earlier slices' keys, the documents of the whole sequence's chunks) and the chunk memory of the whole
    sequence from each slice's own chunks. It holds the collectives; the model only calls these two methods."""

    def context(self, model: "HSATransformer", T: int, device, doc_ids: torch.Tensor | None) -> Context: ...

    def gather_memory(self, memory: Memory) -> Memory: ...


class HSATransformer(nn.Module):
    """input_ids: [B, T] (int64), doc_ids: [B, T] or None → logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (the CLI fills it from the tokenizer)")
        self.cfg = cfg  # frozen; what schedules change is the runtime state below
        window = None if cfg.attention == "full" else cfg.swa_window
        self._hsa_topk, self._swa_window = cfg.hsa_topk, cfg.swa_window
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
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
        self.chunk_loss = chunk_loss_sum  # per row chunk of the loss; units.apply_compile swaps in a compiled one
        self.apply(self._init_weights)

    @staticmethod
    def init_targets(module: nn.Module) -> list[tuple[torch.Tensor, str]]:
        """The model's initialisation of one module's own tensors: (tensor, "normal") drawn from N(0, init_std²),
        (tensor, "zeros"). Applied in ``nn.Module.apply`` order (children first); ``lit_hsa.model.init`` replays
        it shard by shard for a model built on the meta device."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            bias = getattr(module, "bias", None)
            return [(module.weight, "normal")] + ([(bias, "zeros")] if bias is not None else [])
        if isinstance(module, MoE):
            return [(w, "normal") for w in (module.w_gate, module.w_up, module.w_down)]
        if isinstance(module, ChunkMemory):
            return [(module.cls, "normal")]
        return []

    def _init_weights(self, module: nn.Module) -> None:
        for tensor, kind in self.init_targets(module):
            if kind == "normal":
                nn.init.normal_(tensor, 0.0, self.cfg.init_std)
            else:
                nn.init.zeros_(tensor)

    @property
    def hsa_topk(self) -> int:
        """Chunks each query retrieves now (``cfg.hsa_topk`` until a schedule changes it)."""
        return self._hsa_topk

    @property
    def swa_window(self) -> int:
        """Window of the SWA blocks now (``cfg.swa_window`` until a schedule changes it)."""
        return self._swa_window

    def set_hsa_topk(self, topk: int) -> None:
        """Change the number of retrieved chunks (stage / schedule changes; no parameter depends on it)."""
        if topk < 1:
            raise ValueError(f"hsa_topk must be >= 1, got {topk}")
        for m in self.modules():
            if isinstance(m, Retrieval):
                m.topk = topk
        self._hsa_topk = topk

    def set_swa_window(self, window: int) -> None:
        """Change the window of the SWA blocks (not of the HSA blocks' own SWA sub-layer)."""
        if self.cfg.attention == "full":
            raise ValueError("model.attention is 'full': there is no sliding window to change")
        if window < 1:
            raise ValueError(f"swa_window must be >= 1, got {window}")
        for m in self.modules():
            if isinstance(m, Block):
                m.window = window
        self._swa_window = window

    def running_config(self) -> ModelConfig:
        """The config the model computes with now: ``cfg`` with the scheduled top-k and SWA window (for FLOPs
        accounting and statistics; the model's own ``cfg`` is never rewritten)."""
        return replace(self.cfg, hsa_topk=self._hsa_topk, swa_window=self._swa_window)

    def blocks(self) -> list[nn.Module]:
        return [*self.lower, *self.upper]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def hsa_blocks(self) -> list[HSABlock]:
        return [m for m in self.modules() if isinstance(m, HSABlock)]

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def windows(self) -> set[int | None]:
        """The attention windows the blocks use (None: full attention): one mask per window per forward."""
        windows = {None if self.cfg.attention == "full" else self._swa_window}
        if self.hsa_swa_window is not None:
            windows.add(self.hsa_swa_window)
        return windows

    def make_context(self, T: int, device, doc_ids: torch.Tensor | None) -> Context:
        backend = self.cfg.attn_backend
        if backend == "auto":
            backend = "flex" if torch.device(device).type == "cuda" else "sdpa"
        masks = {w: build_mask(T, w, doc_ids, device, backend) for w in self.windows()}
        cos, sin = self.rotary.cos_sin(torch.arange(T, device=device))
        return Context(cos, sin, masks, doc_ids)

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_weight: torch.Tensor | None = None,
                shard: SequenceShard | None = None) -> torch.Tensor:
        """Logits [B, T, V] for the tokens, or with ``labels`` [B, T] the mean cross-entropy (weighted by
        ``loss_weight`` [B, T] when given), computed in row chunks so [T, V] logits never exist (and inside forward,
        so FSDP has the head weight gathered). Decoding with caches: ``lit_hsa.inference.decode.decode_forward``.

        ``shard``: the tokens are one slice of longer sequences (context parallelism); the loss is then this slice's
        mean, which ``lit_hsa.training.context_parallel`` weighs into the whole sequence's."""
        T = input_ids.shape[1]
        h = self.embed(input_ids)
        ctx = self.make_context(T, input_ids.device, doc_ids) if shard is None else \
            shard.context(self, T, input_ids.device, doc_ids)
        for block in self.lower:
            h = block(h, ctx, None)
        memory = self.memory(h) if self.memory is not None else None
        if memory is not None and shard is not None:
            memory = shard.gather_memory(memory)
        for block in self.upper:
            h = block(h, ctx, memory)
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
