"""Cross-entropy over the LM head without materialising [T, vocab] logits: at 512K tokens × 32K vocabulary the
fp32 logits alone would take 64 GiB. Rows are processed in chunks whose logits are recomputed in backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    token_weight: torch.Tensor | None) -> torch.Tensor:
    """Summed (weighted) cross-entropy of one row chunk. Compiled (``apply_compile``), the fp32 cast, log-softmax
    and label pick fuse into one pass over the logits instead of three [rows, V] fp32 round trips."""
    logits = F.linear(h, weight).float()
    if token_weight is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (losses * token_weight).sum()


def target_mass(labels: torch.Tensor, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """What the mean loss divides by (fp32, 0-d, before any clamp): the number of targets (labels != −100), or, with
    ``token_weight``, the targets' summed weights."""
    targets = labels != IGNORE_INDEX
    return targets.sum().float() if token_weight is None else (token_weight.float() * targets).sum()


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          token_weight: torch.Tensor | None = None, chunk_rows: int = 8192,
                          chunk_loss=chunk_loss_sum) -> torch.Tensor:
    """h: [N, d] final hidden states, weight: [V, d] LM head, labels: [N] (−100 ignored) → mean loss (fp32).

    ``token_weight`` [N] (optional): per-target weights, e.g. synthetic-task answers up-weighted so a few answer
    tokens are not drowned by thousands of text tokens; the result is then the weighted mean Σ w·ce / Σ w.
    Peak extra memory O(chunk_rows · V) instead of O(N · V). ``chunk_loss``: ``chunk_loss_sum`` or a compiled
    version of it."""
    denominator = target_mass(labels, token_weight).clamp_min(1 if token_weight is None else 1e-6)
    if token_weight is not None:
        token_weight = token_weight.float() * (labels != IGNORE_INDEX)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        w = token_weight[rows] if token_weight is not None else None
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, h[rows], weight, labels[rows], w, use_reentrant=False)
        else:
            total = total + chunk_loss(h[rows], weight, labels[rows], w)
    return total / denominator
