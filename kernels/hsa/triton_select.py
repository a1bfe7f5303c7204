"""GPU path of ``select_chunks`` (spec §3): blocked scoring + top-k with bounded memory.

Same results as ``reference.select_chunks_reference`` (slots most recent chunk first, empty slots last with index
−1 and score −inf, visibility ``t >= (i+1)·S``, document masking, ``q_start``, ``gumbel_noise``); what changes is
the cost:
- a query block scores only the chunks that are visible to its last query (on average half of them), and the
  visibility mask is applied only to the few trailing chunks that are visible to some of the block's queries but
  not all;
- the block size is chosen so that one block's fp32 scores take about ``score_budget_bytes`` (256 MiB by default)
  instead of a fixed 1024 rows: peak extra memory stays O(block · T/S), launches stay few at long T;
- the differentiable scores of the kept chunks are computed by a custom autograd function that works on blocks of
  queries, so no ``[B, T, H, topk, Dr]`` gather of landmarks is ever held for backward (16 GiB at 1M tokens,
  top-64, Dr=128 in bf16).
"""
from __future__ import annotations

import math

import torch

from .reference import check_select_inputs

__all__ = ["select_chunks_fast", "gathered_scores"]


def _auto_block(B: int, H: int, C: int, budget_bytes: int) -> int:
    rows = budget_bytes // max(1, B * H * max(C, 1) * 4)
    return int(max(256, min(1 << 16, rows)))


class _GatheredScores(torch.autograd.Function):
    """scores[b,t,h,j] = q[b,t,h] · lmk[b, idx[b,t,h,j], h] · scale (−inf where idx < 0), computed in blocks."""

    @staticmethod
    def forward(ctx, q, lmk, idx, scale, block):
        B, T, H, K = idx.shape
        out = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
        b_ix = torch.arange(B, device=q.device)[:, None, None, None]
        h_ix = torch.arange(H, device=q.device)[None, None, :, None]
        for start in range(0, T, block):
            stop = min(start + block, T)
            sel = lmk[b_ix, idx[:, start:stop].clamp(min=0), h_ix].float()  # [B, Tb, H, K, Dr]
            out[:, start:stop] = torch.einsum("bthd,bthkd->bthk", q[:, start:stop].float(), sel) * scale
        out.masked_fill_(idx < 0, float("-inf"))
        ctx.save_for_backward(q, lmk, idx)
        ctx.scale, ctx.block = scale, block
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dscores):
        q, lmk, idx = ctx.saved_tensors
        B, T, H, K = idx.shape
        C, Dr = lmk.shape[1], lmk.shape[3]
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        dlmk = torch.zeros(lmk.shape, device=q.device, dtype=torch.float32)
        ds = (dscores.float() * ctx.scale).masked_fill(idx < 0, 0.0)
        b_ix = torch.arange(B, device=q.device)[:, None, None, None]
        h_ix = torch.arange(H, device=q.device)[None, None, :, None]
        # Flat row of (b, c, h) in dlmk viewed as [B*C*H, Dr], for index_add_.
        flat_base = b_ix * (C * H) + h_ix
        for start in range(0, T, ctx.block):
            stop = min(start + ctx.block, T)
            ci = idx[:, start:stop].clamp(min=0)
            d = ds[:, start:stop]  # [B, Tb, H, K]
            sel = lmk[b_ix, ci, h_ix].float()
            dq[:, start:stop] = torch.einsum("bthk,bthkd->bthd", d, sel)
            contrib = d[..., None] * q[:, start:stop, :, None, :].float()  # [B, Tb, H, K, Dr]
            rows = (flat_base + ci * H).reshape(-1)
            dlmk.view(-1, Dr).index_add_(0, rows, contrib.reshape(-1, Dr))
        return dq.to(q.dtype), dlmk.to(lmk.dtype), None, None, None


def gathered_scores(q: torch.Tensor, lmk: torch.Tensor, idx: torch.Tensor, scale: float, block: int | None = None):
    """q: [B, T, H, Dr], lmk: [B, C, H, Dr], idx: [B, T, H, K] → scores [B, T, H, K] in q.dtype (−inf where
    idx < 0), differentiable in q and lmk, with memory O(block · K · Dr) (default block: ~256 MiB of gather)."""
    B, T, H, K = idx.shape
    if block is None:
        block = int(max(64, (256 << 20) // max(1, B * H * K * q.shape[-1] * 4)))
    return _GatheredScores.apply(q, lmk, idx, scale, block)


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
        for start in range(0, T, block):
            stop = min(start + block, T)
            hi = min(C, (stop - 1 + q_start) // S)  # chunks >= hi are invisible to every query of the block
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
    scores = gathered_scores(q_slc, landmarks, idx_out, scale)
    return scores, idx_out
