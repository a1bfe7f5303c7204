"""Held-out perplexity of a trained model: the mean next-token loss over windows of the training length, each
window without context (as in training), on the held-out split (``eval.run.held_out_tokens``)."""
from __future__ import annotations

import zlib
from contextlib import nullcontext

import numpy as np
import torch

from lit_hsa.model.transformer import HSATransformer


@torch.no_grad()
def held_out_perplexity(net: HSATransformer, tokens: np.ndarray, n_windows: int, window: int,
                        device: torch.device, batch_tokens: int = 65536) -> dict:
    """Mean next-token loss over ``n_windows`` consecutive windows of ``window`` tokens (window i: inputs
    ``tokens[i·W : (i+1)·W]``, targets shifted by one; each window starts without context, as in training).
    tokens: [≥ n_windows·W + 1] int → {windows, window_length, tokens, tokens_crc32, loss, ppl}."""
    net.eval()
    x = torch.as_tensor(tokens[: n_windows * window + 1].astype(np.int64))
    inputs, targets = x[:-1].view(n_windows, window), x[1:].view(n_windows, window)
    per_batch = max(1, batch_tokens // window)
    total = 0.0
    for i in range(0, n_windows, per_batch):
        rows = slice(i, i + per_batch)
        with autocast(device):  # the model returns the mean over the batch's tokens (every label counts)
            loss = net(inputs[rows].to(device), labels=targets[rows].to(device))
        total += float(loss) * inputs[rows].numel()
    loss = total / inputs.numel()
    return {"windows": n_windows, "window_length": window, "tokens": inputs.numel(),
            "tokens_crc32": zlib.crc32(x.numpy().tobytes()), "loss": loss, "ppl": float(np.exp(loss))}


def autocast(device: torch.device):
    # bf16 autocast on CUDA, as the models train
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
