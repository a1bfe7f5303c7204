"""GPU path of ``select_chunks`` (spec §3): blocked scoring + top-k with bounded memory.

Same results as ``reference.select_chunks_reference`` (slots most recent chunk first, empty slots last with index
−1 and score −inf, visibility ``t >= (i+1)·S``, document masking, ``q_start``, ``gumbel_noise``); what changes is
the cost:
- a query block scores only the chunks that are visible to its last query (on average half of them), and the
  visibility mask is applied only to the few trailing chunks that are visible to some of the block's queries but
  not all;
- the block size is chosen so that one block's fp32 scores take about ``score_budget_bytes`` (256 MiB by default)
  instead of a fixed 1024 rows: peak extra memory stays O(block · T/S), launches stay few at long T;
- the differentiable scores of the kept chunks come from a custom autograd function that works on the same query
  blocks with dense GEMMs (score, then gather the kept entries; backward: scatter into the dense block, two GEMMs),
  so no ``[B, T, H, topk, Dr]`` gather of landmarks is ever built (16 GiB at 1M tokens, top-64, Dr=128 in bf16).
"""
from __future__ import annotations

import math

import torch

from .reference import check_select_inputs

__all__ = ["select_chunks_fast", "gathered_scores"]


def _auto_block(B: int, H: int, C: int, budget_bytes: int) -> int:
    rows = budget_bytes // max(1, B * H * max(C, 1) * 4)
    return int(max(256, min(1 << 16, rows)))


def _query_blocks(T: int, block: int, C: int, visible: tuple[int, int] | None):
    """(start, stop, hi) per block of queries; chunks >= hi are invisible to every query of the block
    (``visible`` = (q_start, chunk_size); None: all C chunks)."""
    for start in range(0, T, block):
        stop = min(start + block, T)
        hi = C if visible is None else min(C, (stop - 1 + visible[0]) // visible[1])
        yield start, stop, hi


class _GatheredScores(torch.autograd.Function):
    """scores[b,t,h,j] = q[b,t,h] · lmk[b, idx[b,t,h,j], h] · scale (−inf where idx < 0), computed in blocks.

    Per block of queries, one GEMM scores the block against every chunk it can see ([B, H, Tb, hi]) and the
    selected scores are gathered from it; backward scatters dscores into the same dense block and runs two GEMMs
    (dq = dS·L, dL += dSᵀ·q). Gathering [B, Tb, H, K, Dr] landmark copies instead moves ~K·Dr·12 bytes per query
    through index kernels: at 64K tokens, top-32, Dr=640 that was the largest item of a training step on an H100,
    while the GEMMs run on tensor cores."""

    @staticmethod
    def forward(ctx, q, lmk, idx, scale, block, visible):
        B, T, H, K = idx.shape
        # [B, H, ·, ·]; landmarks in q's dtype once, not per block
        q_t, l_t, idx_t = q.transpose(1, 2), lmk.to(q.dtype).transpose(1, 2), idx.transpose(1, 2)
        out = torch.full((B, H, T, K), float("-inf"), device=q.device, dtype=torch.float32)
        for start, stop, hi in _query_blocks(T, block, lmk.shape[1], visible):
            if hi <= 0:
                continue  # no chunk is visible yet: every slot of the block is empty
            s = torch.matmul(q_t[:, :, start:stop], l_t[:, :, :hi].transpose(-1, -2))  # [B, H, Tb, hi]
            out[:, :, start:stop] = s.gather(-1, idx_t[:, :, start:stop].clamp(0, hi - 1)).float() * scale
        out.masked_fill_(idx_t < 0, float("-inf"))
        ctx.save_for_backward(q, lmk, idx)
        ctx.scale, ctx.block, ctx.visible = scale, block, visible
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dscores):
        q, lmk, idx = ctx.saved_tensors
        B, T, H, K = idx.shape
        q_t, l_t, idx_t = q.transpose(1, 2), lmk.to(q.dtype).transpose(1, 2), idx.transpose(1, 2)
        ds_t = (dscores.float() * ctx.scale).transpose(1, 2).masked_fill(idx_t < 0, 0.0)  # [B, H, T, K]
        dq_t = torch.zeros(q_t.shape, device=q.device, dtype=q.dtype)
        dl_t = torch.zeros(l_t.shape, device=q.device, dtype=torch.float32)  # summed over blocks in fp32
        for start, stop, hi in _query_blocks(T, ctx.block, lmk.shape[1], ctx.visible):
            if hi <= 0:
                continue
            dense = torch.zeros(B, H, stop - start, hi, device=q.device, dtype=torch.float32)
            dense.scatter_add_(-1, idx_t[:, :, start:stop].clamp(0, hi - 1), ds_t[:, :, start:stop])
            dense = dense.to(q.dtype)
            dq_t[:, :, start:stop] = torch.matmul(dense, l_t[:, :, :hi])
            dl_t[:, :, :hi] += torch.matmul(dense.transpose(-1, -2), q_t[:, :, start:stop])
        return dq_t.transpose(1, 2), dl_t.transpose(1, 2).to(lmk.dtype), None, None, None, None


def gathered_scores(q: torch.Tensor, lmk: torch.Tensor, idx: torch.Tensor, scale: float, block: int | None = None,
                    visible: tuple[int, int] | None = None):
    """q: [B, T, H, Dr], lmk: [B, C, H, Dr], idx: [B, T, H, K] → scores [B, T, H, K] in q.dtype (−inf where
    idx < 0), differentiable in q and lmk, with memory O(block · C) (default block: ~256 MiB of fp32 scores).
    ``visible`` = (q_start, chunk_size): query t sees only chunks i with (i+1)·S <= t + q_start (as the selection
    guarantees), so a block scores only the chunks its last query can see."""
    B, T, H, K = idx.shape
    block = block or _auto_block(B, H, lmk.shape[1], 256 << 20)
    return _GatheredScores.apply(q, lmk, idx, scale, block, visible)


def select_chunks_fast(
    q_slc: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    chunk_size: int = 64,
    doc_ids: torch.Tensor | None = None,
    *,
    q_start: int = 0,
    chunk_doc_ids: torch.Tensor | None = None,
    gumbel_noise: bool = False,
    block_size: int | None = None,
    score_budget_bytes: int = 256 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.select_chunks_reference``.

    q_slc: [B, T, H, Dr]; landmarks: [B, C, H, Dr]; doc_ids: [B, T] → scores, indices: [B, T, H, topk]
    (indices int64, most recent chunk first, −1 / −inf in empty slots). ``block_size``: queries scored at once
    (default: as many as fit in ``score_budget_bytes`` of fp32 scores).
    """
    check_select_inputs(q_slc, landmarks, topk, chunk_size, doc_ids)
    B, T, H, Dr = q_slc.shape
    C, S = landmarks.shape[1], chunk_size
    dev = q_slc.device
    scale = 1.0 / math.sqrt(Dr)
    if doc_ids is not None and chunk_doc_ids is None:
        chunk_doc_ids = doc_ids[:, : C * S : S]
    block = block_size or _auto_block(B, H, C, score_budget_bytes)
    idx_out = torch.full((B, T, H, topk), -1, dtype=torch.long, device=dev)
    with torch.no_grad():
        lmk_t = landmarks.float().permute(0, 2, 3, 1)  # [B, H, Dr, C]
        q_t = q_slc.permute(0, 2, 1, 3)  # [B, H, T, Dr]
        for start, stop, hi in _query_blocks(T, block, C, (q_start, S)):
            if hi <= 0:
                continue
            s = torch.matmul(q_t[:, :, start:stop].float(), lmk_t[..., :hi])  # [B, H, Tb, hi]
            s.mul_(scale)
            if gumbel_noise:
                # + Gumbel(0, 1) noise, before the masks as in the reference (a masked score stays -inf).
                s.sub_(torch.empty_like(s).exponential_().log_())
            lo = max(0, (start + q_start) // S)  # chunks < lo are visible to every query of the block
            if lo < hi:
                pos = torch.arange(start + q_start, stop + q_start, device=dev)
                hidden = pos[:, None] < (torch.arange(lo, hi, device=dev) + 1) * S  # [Tb, hi - lo]
                s[..., lo:].masked_fill_(hidden, float("-inf"))
            if doc_ids is not None:
                other_doc = doc_ids[:, start:stop, None] != chunk_doc_ids[:, None, :hi]  # [B, Tb, hi]
                s.masked_fill_(other_doc[:, None], float("-inf"))
            kk = min(topk, hi)
            top_s, idx = s.topk(kk, dim=-1, sorted=False)
            idx.masked_fill_(top_s == float("-inf"), -1)
            idx_out[:, start:stop, :, :kk] = idx.permute(0, 2, 1, 3)
            del s, top_s, idx
        # Most recent chunk first; empty slots (-1) sort last.
        idx_out = idx_out.sort(dim=-1, descending=True).values
    scores = gathered_scores(q_slc, landmarks, idx_out, scale, block, visible=(q_start, S))
    return scores, idx_out
