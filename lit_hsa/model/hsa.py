"""The HSA parts of the model (spec §2–§3): the chunk memory (a bidirectional encoder over each chunk with a learned
[CLS] appended last → landmarks, and K/V for HSA), retrieval (top-k visible chunks + fusion weights), and the HSA
block. Plain ``nn.Module``s; the HSA math itself lives in ``kernels/hsa/reference.py``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lit_hsa.kernels.hsa import fusion_weights, hsa_attention, select_chunks
from lit_hsa.model.attention import Context, RMSNorm, Rotary, SelfAttention
from lit_hsa.model.config import ModelConfig
from lit_hsa.model.moe import SwiGLU, make_ffn


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

    @property
    def n_chunks(self) -> int:
        return self.landmarks.shape[1]

    def chunks_for(self, indices: torch.Tensor, chunk_size: int, device) -> tuple["Memory", torch.Tensor]:
        """The memory holding the chunks that ``indices`` [B, T, H, K] select, on ``device``, and the indices into
        it: this memory itself (``lit_hsa.inference`` keeps chunk K/V in host memory and fetches only those)."""
        return self, indices


# A pytree node, so code that walks a module's outputs finds the tensors inside: FSDP2 registers its pre-backward
# hook (which re-gathers the chunk encoder's weights) on the tensors tree_flatten finds in a unit's output; as an
# opaque leaf, torch <= 2.11 hooked nothing and backward read the encoder's freed shards.
pytree.register_pytree_node(
    Memory, lambda m: ((m.landmarks, m.k, m.v), type(m)), lambda children, cls: cls(*children),
    serialized_type_name="lit_hsa.Memory")


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
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.landmark = nn.Linear(cfg.d_model, self.n_r * self.dr, bias=False)
        self.landmark_norm = RMSNorm(self.dr, cfg.norm_eps) if cfg.retrieval_norm else nn.Identity()
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.cls)  # as built; the model's initialisation draws it

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


def upgrade_pos_decay(state: dict) -> None:
    """Checkpoints written before ``pos_decay`` became [1] hold it as a 0-d tensor: reshaped in place."""
    for key, value in state.items():
        if key.endswith("pos_decay") and value.dim() == 0:
            state[key] = value.reshape(1)


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
        # Shape [1], not a scalar: FSDP2 shards along dim 0 and refuses 0-d parameters.
        self.pos_decay = nn.Parameter(torch.zeros(1)) if cfg.pos_decay else None
        self.topk = cfg.hsa_topk  # chunks retrieved per query; HSATransformer.set_hsa_topk changes it

    def reset_parameters(self) -> None:
        if self.pos_decay is not None:
            nn.init.zeros_(self.pos_decay)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        upgrade_pos_decay(state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, h: torch.Tensor, memory: Memory, doc_ids: torch.Tensor | None, q_start: int | torch.Tensor = 0,
                chunk_doc_ids: torch.Tensor | None = None):
        """→ weights [B, T, Hkv, K] (float32), indices [B, T, Hkv, K] (int64, −1 empty). ``chunk_doc_ids`` [B, C]:
        the document of every chunk of ``memory`` (default: read from ``doc_ids`` at the chunk starts)."""
        cfg = self.cfg
        B, T, _ = h.shape
        q_slc = self.q_norm(self.q_proj(self.norm(h)).view(B, T, cfg.retrieval_heads, cfg.retrieval_head_dim))
        # No more slots than chunks exist: a dense top-k (warm-up) on a short sequence would otherwise carry
        # empty slots that still cost gather and attention work.
        topk = max(1, min(self.topk, memory.landmarks.shape[1]))
        scores, indices = select_chunks(q_slc, memory.landmarks, topk, cfg.chunk_size, doc_ids,
                                        q_start=q_start, chunk_doc_ids=chunk_doc_ids,
                                        gumbel_noise=cfg.gumbel_noise and self.training)
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
            self.swa = SelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm,
                                     cfg.qkv_bias, cfg.norm_eps, cfg.attn_out_bias)
        self.retrieval = Retrieval(cfg)
        self.hsa_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.hsa_q_heads * cfg.head_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.hsa_q_heads * cfg.head_dim, cfg.d_model, bias=False)
        # Shape [1], not a scalar: FSDP2 shards along dim 0 and refuses 0-d parameters.
        self.gate = nn.Parameter(torch.ones(1)) if cfg.hsa_gate else None
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = make_ffn(cfg, layer_idx)
        self.last_selection: tuple[torch.Tensor, torch.Tensor] | None = None  # for retrieval statistics

    def reset_parameters(self) -> None:
        if self.gate is not None:
            nn.init.ones_(self.gate)

    def output_weight(self) -> torch.Tensor:
        """The output projection's weight with the gate folded in: [d, hsa_q_heads·head_dim]."""
        w = self.o_proj.weight
        return w if self.gate is None else w * self.gate.to(w.dtype)

    def forward(self, h: torch.Tensor, ctx: Context, memory: Memory) -> torch.Tensor:
        h_in = h  # the retrieval reads the block's input, before the SWA sub-layer (spec §2)
        if self.swa_window is not None:
            h = h + self.swa(self.swa_norm(h), ctx.cos, ctx.sin, ctx.masks[self.swa_window])
        return self.feed_forward(h, h + self.hsa_output(h, ctx, memory, h_in))

    def hsa_output(self, h: torch.Tensor, ctx: Context, memory: Memory,
                   h_retrieval: torch.Tensor | None = None) -> torch.Tensor:
        """o = o_proj(HSA(norm h)) (× gate with ``model.hsa_gate``) with the chunks the retrieval selects from
        ``h_retrieval`` (the block's input; default h): h [B, T, d] → [B, T, d]."""
        cfg = self.cfg
        B, T, _ = h.shape
        if memory.n_chunks == 0:  # nothing retrievable yet (sequence shorter than one chunk)
            return torch.zeros_like(h)
        h_retrieval = h if h_retrieval is None else h_retrieval
        weights, indices = self.retrieval(h_retrieval, memory, ctx.doc_ids, ctx.q_start, ctx.chunk_doc_ids)
        self.last_selection = (weights.detach(), indices.detach())
        q = self.q_norm(self.q_proj(self.hsa_norm(h)).view(B, T, cfg.hsa_q_heads, cfg.head_dim))
        memory, indices = memory.chunks_for(indices, cfg.chunk_size, h.device)
        o = hsa_attention(q, memory.k.to(q.dtype), memory.v.to(q.dtype), weights, indices, cfg.chunk_size,
                          off_by_one=cfg.softmax_off_by_one, q_start=ctx.q_start)
        o = self.o_proj(o.reshape(B, T, -1))
        return o if self.gate is None else o * self.gate.to(o.dtype)

    def feed_forward(self, h: torch.Tensor, h_o: torch.Tensor) -> torch.Tensor:
        """The block's output from h and h_o = h + o: bypass h + FFN(norm(h + o)), standard h_o + FFN(norm h_o)."""
        return self.ffn_residual(h, h_o) + self.ffn(self.ffn_norm(h_o))

    def ffn_residual(self, h: torch.Tensor, h_o: torch.Tensor) -> torch.Tensor:
        """What the feed-forward's output is added to: h (bypass, HSA's output feeds only the FFN) or h_o = h + o."""
        return h if self.cfg.hsa_residual == "bypass" else h_o
