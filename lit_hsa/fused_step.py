"""A dense block's static decoding step in five Triton launches (``kernels.decode.triton_block``), where the block's
modules would run about ten kernels per step even compiled (see that module): at batch 1 a step's latency is the
sum of its kernels' latencies, and a `small` model runs 18 blocks per token.

    qkv_rope(h)                  RMSNorm, q/k/v projections, q/k head norms, RoPE       (one launch)
    attention + o_proj + h       ring kernel leaving partials, merged by the projection (two launches; other caches:
                                 the cache's attention, then ``gemv``)
    gemv(h; norm, gate, up)      RMSNorm, gate and up projections, SwiGLU               (one launch)
    gemv(a; down) + h            down projection and residual                            (one launch)

``StaticKVCache`` calls it for each ``Block`` when its ``fuse_blocks`` is on (``GraphDecoder(fuse_blocks=)``). A part
whose modules are not the plain ones (LoRA adapters not merged, biases, MoE feed-forwards, norms with different
epsilons) runs its modules as usual; so do the HSA blocks (their few kernels are the selection and HSA attention,
which inductor fuses with their projections when the step is compiled). The first step tunes the kernels' launch
shapes (seconds, once per shape and process; Triton keeps the compiled kernels on disk).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import RMSNorm, SelfAttention
from .moe import SwiGLU


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


def attention_inputs(block: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v of a ``Block`` whose attention is fusable, from h [B, 1, d], in one launch (``qkv_rope``)."""
    from kernels.decode.triton_block import qkv_rope

    attn = block.attn
    return qkv_rope(h, block.attn_norm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                    _head_norm_weight(attn.q_norm), _head_norm_weight(attn.k_norm), cos, sin, block.attn_norm.eps)


def feed_forward(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """h + FFN(norm h) of a ``Block`` whose feed-forward is fusable, h [B, 1, d] → [B, 1, d], in two launches."""
    from kernels.decode.triton_block import gemv

    ffn, norm = block.ffn, block.ffn_norm
    act = gemv(h, ffn.w_gate.weight, norm_w=norm.weight, eps=norm.eps, w_up=ffn.w_up.weight)
    return gemv(act, ffn.w_down.weight, residual=h).view_as(h)


def block_step(block: nn.Module, h: torch.Tensor, ctx, kv) -> torch.Tensor:
    """One decoding step of ``block`` (a ``model.Block``): h [B, 1, d] → [B, 1, d]; ``kv``: the ``StaticKVCache``."""
    attn = block.attn
    if attention_fusable(block.attn_norm, attn):
        q, k, v = attention_inputs(block, h, ctx.cos, ctx.sin)
        h = kv.attend_and_project(attn, q, k, v, block.window, attn.o_proj.weight, h)
    else:
        h = h + attn(block.attn_norm(h), ctx.cos, ctx.sin, ctx.masks[block.window])
    if ffn_fusable(block.ffn_norm, block.ffn):
        return feed_forward(block, h)
    return h + block.ffn(block.ffn_norm(h))
