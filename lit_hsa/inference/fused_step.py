"""A block's static decoding step in fused Triton launches, where its modules would run about ten (dense) or twenty
(HSA) kernels per step even compiled: at batch 1 a step's latency is the sum of its kernels' latencies, and a
`small` model runs 18 blocks per token. A dense block (``kernels.decode.triton_block``), five launches:

    gemv(h; norm, [wq, wk, wv])  RMSNorm, the q/k/v projections stacked                (one launch)
    attention + o_proj + h       ring kernel (q/k head norms, RoPE, attention) leaving partials, merged by the
                                 projection (two launches; other caches: ``qkv_rope`` instead of the stacked
                                 ``gemv``, with the norms and RoPE; the cache's attention, then ``gemv``)
    gemv(h; norm, gate, up)      RMSNorm, gate and up projections, SwiGLU               (one launch)
    gemv(a; down) + h            down projection and residual                            (one launch)

An HSA block (``kernels.decode.triton_hsa``), eight: [its SWA sub-layer as above,] retrieval query (``gemv``), chunk
scores and each range's top k, selection and fusion weights, HSA query (``gemv``), attention to the selected chunks
(partial outputs), output projection summing them + h (``gemv``), the feed-forward's two ``gemv``s.

``StaticKVCache`` calls it for each ``Block`` when its ``fuse_blocks`` is on (``GraphDecoder(fuse_blocks=)``), and
for each ``HSABlock`` where ``hsa_fusable`` also holds. A part of a dense block whose modules are not the plain ones
(LoRA adapters not merged, biases, MoE feed-forwards, norms with different epsilons) runs its modules as usual. The
first step tunes the kernels' launch shapes (seconds, once per shape and process; Triton keeps the compiled kernels
on disk).
"""
from __future__ import annotations

import torch
from torch import nn

from lit_hsa.inference.decode import OffloadedMemory
from lit_hsa.kernels.decode.reference import HeadRope
from lit_hsa.kernels.dispatch import hsa_decode_kernel_fits
from lit_hsa.model.attention import RMSNorm, SelfAttention
from lit_hsa.model.hsa import HSABlock
from lit_hsa.model.moe import SwiGLU


def _plain(*linears: nn.Module) -> bool:
    # exactly nn.Linear: a LoRALinear (a subclass) adds its update in forward, which the kernels would skip
    return all(type(m) is nn.Linear and m.bias is None and m.weight.is_contiguous() for m in linears)


def _norm_eps(*norms: nn.Module) -> float | None:
    """The one epsilon of these RMSNorms (Identity: no norm, any epsilon), or None when they differ."""
    eps = {m.eps for m in norms if isinstance(m, RMSNorm)}
    if len(eps) != 1 or not all(isinstance(m, (RMSNorm, nn.Identity)) for m in norms):
        return None
    return eps.pop()


def attention_fusable(norm: nn.Module, attn: SelfAttention) -> bool:
    return (_plain(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj) and isinstance(norm, RMSNorm)
            and type(attn.q_norm) is type(attn.k_norm) and _norm_eps(norm, attn.q_norm, attn.k_norm) is not None)


def ffn_fusable(norm: nn.Module, ffn: nn.Module) -> bool:
    return (type(ffn) is SwiGLU and _plain(ffn.w_gate, ffn.w_up, ffn.w_down) and isinstance(norm, RMSNorm))


def _head_norm_weight(norm: nn.Module) -> torch.Tensor | None:
    return norm.weight if isinstance(norm, RMSNorm) else None


def attention_inputs(norm: nn.Module, attn: SelfAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v of a fusable attention (``norm``, ``attn``) from h [B, 1, d], in one launch (``qkv_rope``)."""
    from lit_hsa.kernels.decode.triton_block import qkv_rope

    return qkv_rope(h, norm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                    _head_norm_weight(attn.q_norm), _head_norm_weight(attn.k_norm), cos, sin, norm.eps)


def attention_step(norm: nn.Module, attn: SelfAttention, window: int | None, h: torch.Tensor, ctx, kv) -> torch.Tensor:
    """h + attn(norm h) for one token, h [B, 1, d]: fused kernels where the attention is fusable. Where the ring
    kernel attends, q, k, v come from one plain ``gemv`` over the three stacked projections (spread over many
    programs) and the ring kernel applies the heads' norms and RoPE; elsewhere ``qkv_rope`` does (one program per
    head)."""
    if not attention_fusable(norm, attn):
        return h + attn(norm(h), ctx.cos, ctx.sin, ctx.masks[window])
    if kv.ring_kernel_applies(window, h, attn.head_dim):
        from lit_hsa.kernels.decode.triton_block import gemv

        qkv = gemv(h, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], norm_w=norm.weight, eps=norm.eps)
        B, D = h.shape[0], attn.head_dim
        q, k, v = qkv.view(B, 1, -1, D).split([attn.n_heads, attn.n_kv_heads, attn.n_kv_heads], dim=2)
        rope = HeadRope(ctx.cos, ctx.sin, _head_norm_weight(attn.q_norm), _head_norm_weight(attn.k_norm), norm.eps)
        return kv.attend_and_project(attn, q, k, v, window, attn.o_proj.weight, h, rope)
    q, k, v = attention_inputs(norm, attn, h, ctx.cos, ctx.sin)
    return kv.attend_and_project(attn, q, k, v, window, attn.o_proj.weight, h)


def feed_forward(block: nn.Module, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + FFN(norm h) of a block (``ffn_norm``, ``ffn``) whose feed-forward is fusable, h [B, 1, d] →
    [B, 1, d], in two launches; the residual is h unless given."""
    from lit_hsa.kernels.decode.triton_block import gemv

    ffn, norm = block.ffn, block.ffn_norm
    act = gemv(h, ffn.w_gate.weight, norm_w=norm.weight, eps=norm.eps, w_up=ffn.w_up.weight)
    return gemv(act, ffn.w_down.weight, residual=h if residual is None else residual).view_as(h)


def hsa_fusable(block: nn.Module, ctx, memory, compiled: bool = False) -> bool:
    """Whether an ``HSABlock``'s step takes the fused kernels (``kernels.decode.triton_hsa`` for retrieval and HSA
    attention): plain projections and norms, the plain per-chunk softmax, no document masking, the memory on the
    device, and shapes the kernels serve (``kernels.dispatch.hsa_decode_kernel_fits``: with ``compiled``, where the
    alternative is the modules compiled, memories up to a bound). Otherwise the block runs its modules, compiled with
    the model where it is."""
    ret, cfg = block.retrieval, block.cfg
    return (not block.training and ctx.doc_ids is None and not isinstance(memory, OffloadedMemory)
            and not cfg.softmax_off_by_one  # the decoding kernel has the plain per-chunk softmax only
            and hsa_decode_kernel_fits(cfg.chunk_size, cfg.head_dim, memory.n_chunks, compiled)
            and _plain(ret.q_proj, block.q_proj, block.o_proj) and isinstance(ret.norm, RMSNorm)
            and isinstance(ret.q_norm, (RMSNorm, nn.Identity)) and isinstance(block.hsa_norm, RMSNorm)
            and isinstance(block.q_norm, RMSNorm))


def hsa_attention_step(block: nn.Module, h: torch.Tensor, kv, memory, h_retrieval: torch.Tensor) -> torch.Tensor:
    """h + o_proj(HSA(norm h)) of a fusable ``HSABlock`` for one token, h [B, 1, d], in five launches: retrieval
    query from ``h_retrieval`` [B, 1, d] (the block's input; ``gemv``), chunk scores and top k, selection and
    fusion weights (``select_chunks_decode``), HSA query (``gemv``), attention to the selected chunks
    (``hsa_chunks_decode``), output projection summing its partial outputs, plus h (``gemv``)."""
    from lit_hsa.kernels.decode.triton_block import gemv
    from lit_hsa.kernels.decode.triton_hsa import hsa_chunks_decode, select_chunks_decode

    cfg, ret = block.cfg, block.retrieval
    q_slc = gemv(h_retrieval, ret.q_proj.weight, norm_w=ret.norm.weight, eps=ret.norm.eps)
    _, indices, weights = select_chunks_decode(q_slc, _head_norm_weight(ret.q_norm), getattr(ret.q_norm, "eps", 0.0),
                                               memory.landmarks, kv.pos_t, ret.topk, cfg.chunk_size, cfg.fusion,
                                               ret.pos_decay)
    block.last_selection = (weights.unsqueeze(1), indices.unsqueeze(1))  # [B, 1, Hr, K], as the module's
    q = gemv(h, block.q_proj.weight, norm_w=block.hsa_norm.weight, eps=block.hsa_norm.eps)
    parts = hsa_chunks_decode(q, block.q_norm.weight, block.q_norm.eps, memory.k, memory.v, indices, weights,
                              cfg.chunk_size)
    return gemv(parts, block.output_weight(), residual=h).view_as(h)


def block_step(block: nn.Module, h: torch.Tensor, ctx, kv, memory=None) -> torch.Tensor:
    """One decoding step of ``block`` (a ``model.Block`` or ``model.HSABlock``): h [B, 1, d] → [B, 1, d]; ``kv``:
    the ``StaticKVCache``; ``memory``: the chunk memory (HSA blocks)."""
    if isinstance(block, HSABlock):  # which steps here only where ``hsa_fusable``
        h_in = h  # the retrieval reads the block's input, before the SWA sub-layer
        if block.swa_window is not None:
            h = attention_step(block.swa_norm, block.swa, block.swa_window, h, ctx, kv)
        h_o = hsa_attention_step(block, h, kv, memory, h_in)
        if ffn_fusable(block.ffn_norm, block.ffn):
            return feed_forward(block, h_o, block.ffn_residual(h, h_o))
        return block.feed_forward(h, h_o)
    h = attention_step(block.attn_norm, block.attn, block.window, h, ctx, kv)
    if ffn_fusable(block.ffn_norm, block.ffn):
        return feed_forward(block, h)
    return h + block.ffn(block.ffn_norm(h))

