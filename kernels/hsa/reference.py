"""Plain PyTorch definition of Hierarchical Sparse Attention (spec §3–§4).

This file is the single source of truth for the HSA math; every kernel is tested against it.

Conventions
- ``q: [B, T, Hq, D]`` queries; ``k, v: [B, Tk, Hkv, D]`` chunk memory, token ``i`` of chunk ``c`` is row
  ``c * S + i`` (``Tk % S == 0``; ``Tk`` is usually ``T`` but may differ, e.g. during decoding).
- ``weights, indices: [B, T, Hkv, K]``: fusion weights and chunk ids of the ``K`` retrieval slots of each query
  token and KV head; an empty slot has index ``-1`` (its weight is ignored and its contribution is 0).
- Query head ``h`` reads KV head ``h // (Hq // Hkv)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference computes in fp32 (fp64 when given fp64) so it can judge low-precision kernels."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_hsa_inputs(q, k, v, weights, indices, chunk_size: int) -> None:
    """Raise ``ValueError`` naming the first argument whose shape or dtype breaks the spec §4 contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must be [B={B}, Tk, Hkv, D={D}]")
    Tk, Hkv = k.shape[1], k.shape[2]
    if Tk % chunk_size != 0:
        raise ValueError(f"chunk memory length {Tk} must be a multiple of chunk_size={chunk_size}")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if weights.shape != indices.shape or tuple(weights.shape[:3]) != (B, T, Hkv):
        raise ValueError(
            f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be [B={B}, T={T}, "
            f"Hkv={Hkv}, K]"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")


def hsa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int = 64,
    sm_scale: float | None = None,
    off_by_one: bool = False,
) -> torch.Tensor:
    """``o[b,t,h] = Σ_j w[b,t,g,j] · softmax(q[b,t,h] · K_c^T · sm_scale) · V_c`` with ``c = indices[b,t,g,j]``.

    The softmax runs over the ``chunk_size`` keys of chunk ``c`` only; ``off_by_one`` adds 1 to its denominator
    (``exp(s_i) / (1 + Σ_j exp(s_j))``, spec §2: a chunk with nothing relevant can give little instead of a
    forced average). Returns ``o: [B, T, Hq, D]`` in ``q.dtype``.
    Differentiable in q, k, v and weights. Memory is ``O(B·T·Hq·K·S)`` for the scores plus a gather of
    ``O(B·T·Hkv·K·S·D)``: fine for CPU-sized problems and for decoding steps (a few queries), which is what this
    path is for.
    """
    check_hsa_inputs(q, k, v, weights, indices, chunk_size)
    B, T, Hq, D = q.shape
    Hkv, S = k.shape[2], chunk_size
    G = Hq // Hkv
    n_chunks = k.shape[1] // S
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    cdt = _compute_dtype(q.dtype)

    valid = indices >= 0  # [B, T, Hkv, K]
    K = indices.shape[-1]
    idx = indices.long().clamp(0, max(n_chunks - 1, 0)).permute(0, 2, 1, 3)  # [B, Hkv, T, K]
    # Gather the selected chunks first, then convert: the work is O(selected keys), not O(memory), which keeps a
    # decoding step against millions of cached tokens cheap. [B, Hkv, T, K·S, D] each.
    b_ix = torch.arange(B, device=q.device)[:, None, None, None]
    h_ix = torch.arange(Hkv, device=q.device)[None, :, None, None]

    def selected(x: torch.Tensor) -> torch.Tensor:
        chunks = x.view(B, n_chunks, S, Hkv, D).permute(0, 3, 1, 2, 4)  # [B, Hkv, C, S, D] (a view)
        return chunks[b_ix, h_ix, idx].reshape(B, Hkv, T, K * S, D).to(cdt)

    k_sel, v_sel = selected(k), selected(v)

    qg = q.to(cdt).view(B, T, Hkv, G, D).permute(0, 2, 1, 3, 4)  # [B, Hkv, T, G, D]
    scores = (qg @ k_sel.transpose(-1, -2)) * scale  # [B, Hkv, T, G, K·S]
    probs = chunk_softmax(scores.view(B, Hkv, T, G, K, S), off_by_one)  # inside each chunk separately

    w = (weights.to(cdt) * valid).permute(0, 2, 1, 3)  # [B, Hkv, T, K]; empty slots contribute exactly 0
    # Σ_j w_j · P_j V_j as one matmul: scale each chunk's probabilities by its weight, then multiply by all K·S values.
    out = (probs * w[:, :, :, None, :, None]).view(B, Hkv, T, G, K * S) @ v_sel  # [B, Hkv, T, G, D]
    return out.permute(0, 2, 1, 3, 4).reshape(B, T, Hq, D).to(q.dtype)


def chunk_softmax(scores: torch.Tensor, off_by_one: bool = False) -> torch.Tensor:
    """Softmax over the last dim (one chunk's keys); ``off_by_one``: ``exp(s_i) / (1 + Σ_j exp(s_j))``, i.e. a
    virtual extra key of score 0 and value 0."""
    if not off_by_one:
        return scores.softmax(dim=-1)
    m = scores.amax(dim=-1, keepdim=True).clamp_min(0)
    e = (scores - m).exp()
    return e / (e.sum(dim=-1, keepdim=True) + (-m).exp())


def check_select_inputs(q_slc, landmarks, topk: int, chunk_size: int, doc_ids) -> None:
    if q_slc.dim() != 4 or landmarks.dim() != 4:
        raise ValueError(
            f"q_slc must be [B, T, H, Dr] and landmarks [B, C, H, Dr]; got {tuple(q_slc.shape)} and "
            f"{tuple(landmarks.shape)}"
        )
    B, T, H, Dr = q_slc.shape
    if landmarks.shape[0] != B or landmarks.shape[2:] != (H, Dr):
        raise ValueError(f"landmarks {tuple(landmarks.shape)} must be [B={B}, C, H={H}, Dr={Dr}]")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, T):
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must be [B={B}, T={T}]")


def visible_chunk_mask(
    t_pos: torch.Tensor,
    n_chunks: int,
    chunk_size: int,
    q_doc: torch.Tensor | None = None,
    chunk_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which chunks each query may retrieve: chunk ``i`` is visible at position ``t`` iff ``t >= (i+1)·S``
    (it lies wholly in the past; the current chunk is SWA's job) and, with document ids, it belongs to the
    query's own document.

    t_pos: [Tb] absolute positions; q_doc: [B, Tb]; chunk_doc: [B, C]. Returns bool [1 or B, Tb, C].
    """
    chunk_ids = torch.arange(n_chunks, device=t_pos.device)
    mask = (t_pos[:, None] >= (chunk_ids[None, :] + 1) * chunk_size)[None]
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == chunk_doc[:, None, :])
    return mask


TOPK_GROUP = 256


def topk_last_dim(s: torch.Tensor, k: int, group: int = TOPK_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``s.topk(k, dim=-1, sorted=False)`` (values, indices in no particular order; ties may resolve to other
    indices; the caller orders the slots by chunk), for few rows of many entries in stages: the top k of every group
    of ``group`` entries, then the top k of those candidates, and so on (the top k of the whole row are among them).
    A row of 16K chunk scores (a decoding step at 1M tokens) otherwise goes to a single-block radix select: 60 µs on
    an H200, staged 33 µs (``benchmarks/bench_decode_kernels.py``). Many rows (prefill, training) are parallel
    already and take one ``topk``. Among -inf entries the index returned is arbitrary."""
    C = s.shape[-1]
    rows = s.numel() // max(C, 1)
    if C <= 4 * group or k > group // 4 or rows > 64:
        return s.topk(k, dim=-1, sorted=False)  # sorted=True would order each row's top k in one more kernel
    n = -(-C // group)
    padded = torch.nn.functional.pad(s, (0, n * group - C), value=float("-inf"))  # pads sort last
    top_s, idx = padded.view(*s.shape[:-1], n, group).topk(k, dim=-1, sorted=False)  # [..., n, k]
    idx = idx + torch.arange(0, n * group, group, device=s.device).unsqueeze(-1)
    top_s, pick = topk_last_dim(top_s.flatten(-2), k, group)
    return top_s, idx.flatten(-2).gather(-1, pick).clamp(max=C - 1)  # a pad is -inf: any index will do


def select_chunks_reference(
    q_slc: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    chunk_size: int = 64,
    doc_ids: torch.Tensor | None = None,
    *,
    q_start: int = 0,
    chunk_doc_ids: torch.Tensor | None = None,
    gumbel_noise: bool = False,
    block_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k visible chunks per query token and head, by ``s[t,i] = q_slc[t] · landmarks[i] / sqrt(Dr)``.

    q_slc: [B, T, H, Dr]; landmarks: [B, C, H, Dr]; doc_ids: [B, T] document id of every query token (optional;
    with it, only chunks of the query's own document are visible; the document of chunk ``i`` is
    ``doc_ids[:, i*S]`` unless ``chunk_doc_ids: [B, C]`` is given). ``q_start``: absolute position of the first
    query (decoding; an int, or a 0-d tensor on the device for static-shape decoding). ``gumbel_noise``: perturb
    the scores for the *choice* only (the returned scores are clean).

    Returns ``scores, indices: [B, T, H, topk]``: slots ordered most recent chunk first, empty slots last with
    index -1 and score -inf. ``scores`` is differentiable in q_slc and landmarks; ``indices`` is int64.
    Memory: the full score matrix is never built; queries are scored ``block_size`` at a time without autograd
    and only the selected ``[T, topk]`` scores are recomputed with autograd.
    """
    check_select_inputs(q_slc, landmarks, topk, chunk_size, doc_ids)
    B, T, H, Dr = q_slc.shape
    n_chunks = landmarks.shape[1]
    scale = 1.0 / math.sqrt(Dr)
    if doc_ids is not None and chunk_doc_ids is None:
        chunk_doc_ids = doc_ids[:, : n_chunks * chunk_size : chunk_size]
    k_eff = min(topk, n_chunks)
    idx_blocks = []
    with torch.no_grad():
        lmk = landmarks.float()
        for start in range(0, T, block_size):
            stop = min(start + block_size, T)
            pos = torch.arange(start, stop, device=q_slc.device) + q_start  # q_start: int or 0-d tensor
            s = torch.einsum("bthd,bchd->bthc", q_slc[:, start:stop].float(), lmk) * scale  # [B, Tb, H, C]
            q_doc = doc_ids[:, start:stop] if doc_ids is not None else None
            visible = visible_chunk_mask(pos, n_chunks, chunk_size, q_doc, chunk_doc_ids)[:, :, None, :]
            if gumbel_noise:
                s = s - torch.empty_like(s).exponential_().log()  # + Gumbel(0, 1) noise
            s = s.masked_fill(~visible, float("-inf"))
            if k_eff == 0:
                idx = torch.empty(B, stop - start, H, 0, dtype=torch.long, device=q_slc.device)
            else:
                top_s, idx = topk_last_dim(s, k_eff)
                idx = idx.masked_fill(top_s == float("-inf"), -1)
            idx_blocks.append(idx)
        idx = torch.cat(idx_blocks, dim=1)
        if k_eff < topk:
            idx = torch.nn.functional.pad(idx, (0, topk - k_eff), value=-1)
        # Most recent chunk first; empty slots (-1) sort last.
        idx = idx.sort(dim=-1, descending=True).values
    valid = idx >= 0
    lmk_sel = _gather_chunks(landmarks, idx.clamp(min=0))  # [B, T, H, K, Dr]
    scores = torch.einsum("bthd,bthkd->bthk", q_slc, lmk_sel.to(q_slc.dtype)) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    return scores, idx


def _gather_chunks(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, C, H, Dr], idx: [B, T, H, K] (all >= 0) → [B, T, H, K, Dr]."""
    B, T, H, K = idx.shape
    if x.shape[1] == 0:
        return x.new_zeros(B, T, H, K, x.shape[-1])
    b_ix = torch.arange(B, device=x.device)[:, None, None, None]
    h_ix = torch.arange(H, device=x.device)[None, None, :, None]
    return x[b_ix, idx, h_ix]


def fusion_weights(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """scores: [..., K] with −inf on empty slots, slots ordered most recent first → weights [..., K], 0 on empty.

    softmax: w = softmax over the kept chunks (paper Eq. 2). stick_breaking: w_j = σ(s_j) Π_{l<j} σ(−s_l).
    A row with no kept chunk gets all-zero weights (never NaN).
    """
    valid = torch.isfinite(scores)
    s = torch.where(valid, scores, torch.zeros_like(scores)).float()
    if kind == "softmax":
        s = s - torch.where(valid, s, torch.full_like(s, float("-inf"))).amax(-1, keepdim=True).nan_to_num(0, 0, 0)
        e = torch.where(valid, s.exp(), torch.zeros_like(s))
        w = e / e.sum(-1, keepdim=True).clamp_min(1e-30)
    else:
        log_keep = torch.where(valid, F.logsigmoid(-s), torch.zeros_like(s))
        log_before = torch.cumsum(log_keep, dim=-1) - log_keep  # Σ_{l<j} log σ(−s_l)
        w = torch.where(valid, torch.exp(F.logsigmoid(s) + log_before), torch.zeros_like(s))
    return w
