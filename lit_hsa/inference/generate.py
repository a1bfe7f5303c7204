"""Incremental decoding with bounded caches: the prompt is prefilled in segments, then tokens are sampled one at a
time. SWA layers keep W positions, the chunk memory (landmarks + K/V) grows by one entry per completed chunk, and
full-attention layers (the `full` baseline) keep everything."""
from __future__ import annotations

from collections.abc import Callable

import torch

from lit_hsa.inference.decode import DecodeState, decode_forward, uncompiled
from lit_hsa.inference.static_decode import GraphDecoder
from lit_hsa.model.transformer import HSATransformer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] → token ids [B]. temperature 0 = greedy; top_p < 1 keeps the smallest set of tokens whose
    probability mass reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # tokens entirely beyond the nucleus
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefill(model: HSATransformer, prompt: torch.Tensor, segment_size: int = 4096,
            state: DecodeState | None = None, offload_memory: bool = False) -> tuple[torch.Tensor, DecodeState]:
    """Feed prompt [B, P] in segments of ``segment_size`` tokens (memory bounded by the segment, not P).
    ``offload_memory``: chunk K/V go to host memory, only landmarks stay on the accelerator.
    Returns the logits of the last prompt token [B, V] and the decode state."""
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty")
    state = state or DecodeState(offload_memory=offload_memory)
    with uncompiled():
        for start in range(0, prompt.shape[1], segment_size):
            logits = decode_forward(model, prompt[:, start : start + segment_size], state)
    return logits[:, -1], state


@torch.no_grad()
def generate(model: HSATransformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, segment_size: int = 4096,
             generator: torch.Generator | None = None, offload_memory: bool = False,
             cuda_graphs: bool | None = None, compile: str | None = None,
             stop: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """prompt: [B, P] int64 → [B, P + n] with n ≤ max_new_tokens (stops early once every row has produced EOS, or
    once ``stop`` of the new tokens so far, [B, n], is true: the token that made it true is kept).

    ``cuda_graphs`` (default: on CUDA without ``offload_memory``): decode with static caches, one CUDA graph
    replayed per token (``static_decode.GraphDecoder``) instead of launching every layer's kernels from Python.
    ``compile``: a torch.compile backend ("inductor") for those steps' blocks (fewer, fused kernels per step; takes
    tens of seconds once, so worth it for long generations)."""
    if cuda_graphs is None:
        cuda_graphs = prompt.is_cuda and not offload_memory
    if compile is not None and not cuda_graphs:
        raise ValueError("compile= applies to static (CUDA-graph) decoding: pass cuda_graphs=True, without "
                         "offload_memory")
    logits, state = prefill(model, prompt, segment_size, offload_memory=offload_memory)
    # (the last new token is never fed back, so one new token needs no decoding step at all)
    static = cuda_graphs and max_new_tokens > 1
    decoder = GraphDecoder(model, state, prompt.shape[1] + max_new_tokens, compile) if static else None
    out = [prompt]
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        out.append(token[:, None])
        if i == max_new_tokens - 1 or (eos_id is not None and finished.all()) or \
                (stop is not None and stop(torch.cat(out[1:], dim=1))):
            break
        if decoder is not None:
            logits = decoder.step(token)
        else:
            with uncompiled():
                logits = decode_forward(model, token[:, None], state)[:, -1]
    return torch.cat(out, dim=1)
