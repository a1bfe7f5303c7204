"""Cross-entropy over the LM head without materialising [T, vocab] logits: at 512K tokens × 32K vocabulary the
fp32 logits alone would take 64 GiB. Rows are processed in chunks whose logits are recomputed in backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_rows: int = 8192) -> torch.Tensor:
    """h: [N, d] final hidden states, weight: [V, d] LM head, labels: [N] (−100 ignored) → mean loss (fp32).
    Peak extra memory O(chunk_rows · V) instead of O(N · V)."""
    n_targets = (labels != IGNORE_INDEX).sum().clamp_min(1)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h[rows], weight, labels[rows], use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h[rows], weight, labels[rows])
    return total / n_targets
