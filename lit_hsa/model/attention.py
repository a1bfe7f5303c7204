"""Dense-key attention used by the SWA and full-attention blocks: RoPE, causal / sliding-window / document masks,
and the backend that computes them (SDPA with an explicit mask on CPU, flex_attention with a block mask on CUDA)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight in x's dtype (bf16 under autocast): with mixed dtypes torch falls back from its fused kernel
        # to ~8 elementwise kernels per call, a large share of a long-context training step.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_frequencies(head_dim: int, base: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [D/2] (fp32) and the factor that multiplies cos and sin (YaRN's attention factor,
    else 1.0), for ``model.rope_scaling`` ``scaling`` (validated by ``config.check_rope_scaling``; None: plain RoPE).

    Each formula is transformers' ``modeling_rope_utils`` (``_compute_{linear_scaling,llama3,yarn}_parameters``)
    operation for operation, so an imported model's tables equal its Hugging Face original's bit for bit."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":  # positions / factor, folded into the frequencies
        return inv_freq / factor, 1.0
    original = scaling["original_max_position_embeddings"]
    if kind == "llama3":  # long wavelengths / factor, short ones kept, a smooth blend between
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # interpolate slow dimensions, extrapolate fast ones, linear ramp between; scale attention
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = (float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
                                if mscale and mscale_all_dim else _yarn_mscale(factor))
        # HF reads these with `or`: 0 or None means the paper's defaults
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in `original`
            return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001  # HF's guard against a zero-width ramp
        ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        extrapolation = 1 - ramp  # share of the unscaled frequency
        inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
        return inv_freq, float(attention_factor)
    raise ValueError(f"rope_scaling: unsupported rope_type {kind!r}")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (paper Eq. 21), HF's ``yarn_get_mscale``."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class Rotary(nn.Module):
    """Rotary position embedding; ``cos_sin(positions)`` → cos, sin: [T, D/2] in fp32.

    ``scaling``: ``model.rope_scaling`` (``rope_frequencies``). The scaled frequencies are the ``inv_freq`` buffer
    every consumer reads (the decoding kernels' ``rope_cos_sin`` too); a factor other than 1
    (``attention_scaling``, YaRN) multiplies cos and sin, as in Hugging Face's rotary embeddings."""

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        inv_freq, self.attention_scaling = rope_frequencies(head_dim, base, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the frequencies in place (a model built on the meta device has none yet)."""
        with torch.no_grad():
            self.inv_freq.copy_(rope_frequencies(self.head_dim, self.base, self.scaling)[0])

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return self.scale(freqs.cos(), freqs.sin())

    def scale(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin × ``attention_scaling`` (untouched, no kernel, when it is 1)."""
        if self.attention_scaling == 1.0:
            return cos, sin
        return cos * self.attention_scaling, sin * self.attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [T, D/2]. Rotates the two halves of each head (GPT-NeoX layout)."""
    # fp32 cos/sin promote each product to fp32 inside its kernel: no fp32 copy of x is written first.
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class AttentionMask:
    """Which keys each query may see: causal, optionally within ``window`` tokens and the same document.

    Built once per forward and shared by every layer with the same window. ``dense``: bool [B|1, 1, T, T] for SDPA
    (True = attend); ``block``: a flex_attention BlockMask (CUDA). A layer attends through its mask (``attend``), so
    whoever builds the masks decides how attention reads its keys (``lit_hsa.inference`` passes masks that read and
    extend decoding caches).
    """

    window: int | None
    dense: torch.Tensor | None = None
    block: object | None = None

    def attend(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, T, Hq, D], k/v: [B, T, Hkv, D] of ``layer`` → [B, T, Hq, D]."""
        return attend(q, k, v, self)


def build_mask(T: int, window: int | None, doc_ids: torch.Tensor | None, device, backend: str) -> AttentionMask:
    """window None = full causal attention; doc_ids: [B, T] or None."""
    if window is None and doc_ids is None:
        return AttentionMask(None)  # plain causal: SDPA's flash kernel, no mask at all
    if backend == "flex":
        return AttentionMask(window, block=_flex_block_mask(T, window, doc_ids, device))
    pos = torch.arange(T, device=device)
    allowed = pos[:, None] >= pos[None, :]
    if window is not None:
        allowed = allowed & (pos[:, None] - pos[None, :] < window)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return AttentionMask(window, dense=allowed)


def _flex_block_mask(T: int, window: int | None, doc_ids: torch.Tensor | None, device):
    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return keep

    return block_mask_from_rules(T, window, doc_ids, device, mask_mod)


FLEX_BLOCK = 128  # flex_attention's default block size (queries and keys)


def block_mask_from_rules(T: int, window: int | None, doc_ids: torch.Tensor | None, device, mask_mod,
                          block: int = FLEX_BLOCK):
    """The flex_attention ``BlockMask`` of causal attention (within ``window`` when given, within documents when
    ``doc_ids`` [B, T] is given), classified block by block from the rules with a few tensor ops: a [q-block,
    kv-block] pair is skipped when no query of the one may see a key of the other, *full* when every query sees
    every key (no mask_mod evaluated), *partial* otherwise (``mask_mod`` decides per element).

    Why not ``create_block_mask``: it evaluates mask_mod on every element, which needs ``_compile=True`` beyond a
    few thousand tokens, and that inductor compilation took 3.5 minutes on a fresh H100 at 16K tokens
    (benchmarks/results/moe_fit_timeline_h100_2026-12-07.log), again for every new sequence length."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-T // block)
    first = torch.arange(n, device=device) * block
    last = (first + block).clamp(max=T) - 1
    complete = (last - first + 1) == block  # a ragged last block is never full
    q_first, q_last, k_first, k_last = first[:, None], last[:, None], first[None, :], last[None, :]
    some = k_first <= q_last  # [nq, nk]: some query sees some key
    every = (k_last <= q_first) & complete[:, None] & complete[None, :]
    if window is not None:
        some = some & (q_first - k_last < window)
        every = every & (q_last - k_first < window)
    some, every = some[None], every[None]  # [B (1 without documents), nq, nk]
    if doc_ids is not None:
        ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(-1, n * block - T)], dim=1).view(-1, n, block)
        low, high = ids.amin(-1), ids.amax(-1)  # [B, n]: a block holds ids in [low, high]
        some = some & (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None])
        one_doc = low == high
        every = every & one_doc[:, :, None] & one_doc[:, None, :] & (low[:, :, None] == low[:, None, :])

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nq, nk] bool → (count [B, 1, nq], kv block indices [B, 1, nq, nk], the chosen first, ascending)."""
        counts = blocks.sum(-1, dtype=torch.int32)
        indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None], indices[:, None]

    partial, full = ordered(some & ~every), ordered(every)
    return BlockMask.from_kv_blocks(*partial, *full, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T))


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """q: [B, T, Hq, D], k/v: [B, T, Hkv, D] → [B, T, Hq, D] (GQA: Hq a multiple of Hkv)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mask.block is not None:
        out = _compiled_flex_attention()(q, k, v, block_mask=mask.block, enable_gqa=True)
    elif mask.dense is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=True)
    return out.transpose(1, 2)


def sliding_window_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                          block: int = 1024, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sliding-window attention of the n newest positions: q [B, n, Hq, D] against k/v [B, L, Hkv, D] (L >= n; the
    last n keys belong to the queries). Queries go ``block`` at a time against only the keys their window reaches,
    so a long prefill segment costs O(n · (block + window)) instead of an [n, L] mask and O(n · L) work.

    ``window`` None: causal attention to every earlier key. ``doc_ids`` [B, L] (optional): the document of every key
    (the queries' are the last n); a query then sees only keys of its own document (context-parallel shards)."""
    n, L = q.shape[1], k.shape[1]
    outs = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        q_pos = torch.arange(L - n + start, L - n + stop, device=q.device)  # positions within k
        first = 0 if window is None else max(0, L - n + start - window + 1)
        k_pos = torch.arange(first, L - n + stop, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        allowed = allowed[None, None]
        if doc_ids is not None:
            q_doc, k_doc = doc_ids[:, L - n + start : L - n + stop], doc_ids[:, first : L - n + stop]
            allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
        keys = slice(first, L - n + stop)
        outs.append(attend(q[:, start:stop], k[:, keys], v[:, keys], AttentionMask(window, dense=allowed)))
    return torch.cat(outs, dim=1)


class SelfAttention(nn.Module):
    """Causal multi-head attention with GQA, QK-RMSNorm and RoPE; the mask decides full vs sliding window. ``bias``:
    biases on the q/k/v projections; ``out_bias``: on the output projection.

    ``bidirectional=True`` (the chunk encoder) attends to every position with no mask.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm: bool = True,
                 bias: bool = False, eps: float = 1e-6, out_bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask | None) -> torch.Tensor:
        """x: [B, T, d]; mask None = bidirectional."""
        q, k, v = self.qkv(x, cos, sin)
        if mask is None:
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                 enable_gqa=True).transpose(1, 2)
        else:
            out = mask.attend(self, q, k, v)
        return self.o_proj(out.reshape(*x.shape[:2], -1))


@dataclass
class Context:
    """Per-forward state shared by all blocks: rotary tables, attention masks by window, document ids."""

    cos: torch.Tensor
    sin: torch.Tensor
    masks: dict
    doc_ids: torch.Tensor | None
    q_start: int | torch.Tensor = 0  # absolute position of the first token (decoding, context-parallel shards)
    # [B, C]: the document of every chunk of the memory, where it holds chunks beyond this forward's tokens (a
    # context-parallel shard reads the whole sequence's chunks); None: read from doc_ids
    chunk_doc_ids: torch.Tensor | None = None
