"""Programmatic dependent launch (PDL, Hopper and later) for the decoding kernels.

A decoding step at batch 1 is a chain of short kernels, each waiting for the previous one's output: between two
kernels the GPU drains, launches, and the new kernel then waits for its first loads from memory. Launched with PDL,
a kernel may start while the previous one still runs; it loads what does not depend on it (its weights, the key
blocks of past positions), then waits (``gdc_wait``) for every earlier kernel to finish before it reads their
outputs or writes anything, which hides most of the gap between kernels
(benchmarks/results/generate_pdl_on_off_small_h200_2026-11-29.json).

Rules for a kernel taking part: call ``wait_for_inputs(PDL)`` before its first read of anything an earlier kernel
of the step may write (activations, the position, scratch buffers) and before its first write; before it, read only
weights and caches written in earlier steps (those kernels finished: every step also runs kernels launched without
PDL — embedding, head, compiled blocks — which start only after all earlier work has finished).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: kernels launch as usual (the PDL branch is never compiled)
    gdc_launch_dependents = gdc_wait = None

__all__ = ["use_pdl", "pdl_args", "wait_for_inputs", "ENABLED"]

# LIT_HSA_PDL=0 turns it off (e.g. to measure what it brings: benchmarks/bench_generate.py --pdl both).
ENABLED = os.environ.get("LIT_HSA_PDL", "1") != "0"


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels working on ``t`` launch with PDL: CUDA compute capability >= 9, a Triton that has it, and not
    switched off (``ENABLED``)."""
    return (ENABLED and gdc_wait is not None and t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


def pdl_args(t: torch.Tensor) -> dict:
    """Launch arguments of a kernel with a ``PDL`` constexpr (the launch option only where it is on: the interpreter
    takes no launch options)."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(t) else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Lets the next kernel launch, then waits until every earlier kernel has finished and its writes are visible."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
