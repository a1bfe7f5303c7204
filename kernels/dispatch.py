"""Every kernel-or-reference decision of lit-hsa, with the thresholds behind them: one place
(``tests/kernels/test_dispatch.py`` has a test per branch). Callers ask here and never decide themselves.

The backend switch (``HSA_BACKEND`` in the environment, or ``set_backend``) governs the HSA and decoding ops:
``auto`` sends ops on CUDA tensors to the Triton kernels (when Triton is installed), ``triton`` sends them there on any
device (the CPU runs them under ``TRITON_INTERPRET=1``, which is how tests check kernels without a GPU), and
``reference`` keeps the PyTorch references everywhere (e.g. to compare training runs). The MoE experts' switch
(``LIT_HSA_MOE_BACKEND`` / ``set_expert_backend``) picks between grouped GEMMs and a loop over experts.

Decisions, by the op they serve:
- ``hsa_attention`` (training, prefill): ``hsa_attention_uses_kernel``;
- ``select_chunks``: ``select_chunks_uses_kernel``;
- a static decoding step's HSA ops, traced into compiled blocks: ``static_step_uses_references``;
- a sliding-window decoding step: ``use_ring_kernel`` (``RING_KERNEL_MAX_WINDOW``, ``..._MAX_HEAD_DIM_COMPILED``);
- static decoding's fused block steps: ``fused_blocks_apply``, and for HSA blocks ``hsa_decode_kernel_fits``
  (``MAX_DECODE_CHUNKS``);
- MoE experts: ``grouped_mm_applies``; the MoE layer's fused combine and activation: ``moe_kernels_apply``.
"""
from __future__ import annotations

import os

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# ------------------------------------------------------------------------------------------------ backend switches

BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("HSA_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"HSA_BACKEND must be one of {BACKENDS}, got {_backend!r}")

EXPERT_BACKENDS = ("auto", "grouped", "loop")
_expert_backend = os.environ.get("LIT_HSA_MOE_BACKEND", "auto")
if _expert_backend not in EXPERT_BACKENDS:
    raise ValueError(f"LIT_HSA_MOE_BACKEND must be one of {EXPERT_BACKENDS}, got {_expert_backend!r}")


def set_backend(name: str) -> None:
    """``auto``: fast paths on CUDA, reference elsewhere; ``triton``: fast paths wherever they run (CUDA, or CPU
    under ``TRITON_INTERPRET=1``); ``reference``: the PyTorch reference everywhere."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def set_expert_backend(name: str) -> None:
    """``auto``: grouped GEMMs where ``grouped_mm_applies``, else a loop over experts; ``grouped``: the same (the
    grouped path where it can run); ``loop``: the loop everywhere (benchmarks compare the two)."""
    global _expert_backend
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"expert backend must be one of {EXPERT_BACKENDS}, got {name!r}")
    _expert_backend = name


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fast_paths(t: torch.Tensor) -> bool:
    """Whether the backend switch sends ops on ``t`` to Triton: ``auto`` on CUDA with Triton installed, ``triton``
    everywhere, ``reference`` never."""
    if _backend == "reference":
        return False
    if _backend == "triton":
        return True
    return t.is_cuda and triton_importable()


def capturing() -> bool:
    """Inside a CUDA-graph capture (static decoding), where the fast paths' host synchronisations are not allowed."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def power_of_two_in(n: int, low: int, high: int | None = None) -> bool:
    return n >= low and (high is None or n <= high) and n & (n - 1) == 0


# ------------------------------------------------------------------------------------------------ HSA ops

# (token, slot) pairs up to which the gather-first reference serves ``auto`` on CUDA too: a decoding step selects a
# few dozen chunks, and the kernel's work list (sorts, counts, a few host synchronisations to size its grid) would
# cost more than the attention itself, once per HSA layer and token.
DECODE_MAX_PAIRS = 256


def hsa_attention_kernel_fits(q: torch.Tensor, chunk_size: int) -> bool:
    """Shapes the Triton HSA kernels cover: fp32/fp16/bf16, a power-of-two head dim in [16, 256], a power-of-two
    chunk size of at least 16."""
    return q.dtype in FLOATS and power_of_two_in(q.shape[-1], 16, 256) and power_of_two_in(chunk_size, 16)


def hsa_attention_uses_kernel(q: torch.Tensor, weights: torch.Tensor, chunk_size: int) -> bool:
    """``hsa_attention`` on the Triton kernel: the backend switch allows it, the kernel covers the shape, the call is
    not decoding-sized under ``auto`` (at most ``DECODE_MAX_PAIRS`` (token, slot) pairs), and no CUDA graph is
    being captured."""
    decode_sized = _backend == "auto" and weights.numel() <= DECODE_MAX_PAIRS
    return use_fast_paths(q) and hsa_attention_kernel_fits(q, chunk_size) and not decode_sized and not capturing()


def select_chunks_uses_kernel(q_slc: torch.Tensor, q_start: int | torch.Tensor) -> bool:
    """``select_chunks`` on the fast path: the backend switch allows it, the position is a host integer (a tensor
    position is a static decoding step: the reference), and no CUDA graph is being captured."""
    return use_fast_paths(q_slc) and not torch.is_tensor(q_start) and not capturing()


def static_step_uses_references(q_start: int | torch.Tensor) -> bool:
    """Whether the public HSA ops (``hsa.select_chunks``, ``hsa.hsa_attention``) run their references, traced, rather
    than their opaque dispatch: in a static-shape decoding step (``StaticDecodeState``: the position lives on the
    device, ``q_start`` is a tensor). Such a step selects a few dozen chunks per layer, which the references serve
    anyway (the fast paths size their work lists on the host, which a CUDA graph cannot hold); traced rather than
    behind a ``torch.compiler.disable`` graph break, they join a compiled decoding block, so inductor fuses their
    casts, masks and softmax with the projections around them."""
    return torch.is_tensor(q_start)


# ------------------------------------------------------------------------------------------------ decoding steps

# The ring kernel against the references, bf16 on an H200 (µs per call replayed from a CUDA graph;
# benchmarks/results/decode_kernels_h200_2026-11-29.json): it wins up to 1,024 slots, and against a compiled
# reference only for head dims up to 64.
RING_KERNEL_MAX_WINDOW = 1024
RING_KERNEL_MAX_HEAD_DIM_COMPILED = 64


def ring_kernel_fits(q: torch.Tensor, ck: torch.Tensor) -> bool:
    """Shapes and dtypes the ring kernel covers: fp32/fp16/bf16, a power-of-two head dim in [16, 256]."""
    return q.dtype in FLOATS and ck.dtype in FLOATS and power_of_two_in(q.shape[-1], 16, 256)


def use_ring_kernel(x: torch.Tensor, head_dim: int, window: int, compiled_fallback: bool = False) -> bool:
    """Whether a ring step of ``window`` slots takes the kernel, for queries and rings of x's dtype and device (x:
    any tensor of the step): the backend switch sends x's ops to Triton, the kernel covers the shape, and it
    measured faster than the alternative (``compiled_fallback``: the reference compiled by inductor, else eager)."""
    if compiled_fallback and head_dim > RING_KERNEL_MAX_HEAD_DIM_COMPILED:
        return False
    return (use_fast_paths(x) and x.dtype in FLOATS and power_of_two_in(head_dim, 16, 256)
            and window <= RING_KERNEL_MAX_WINDOW)


def fused_blocks_apply(t: torch.Tensor) -> bool:
    """Whether static decoding's blocks may step in fused Triton kernels (``lit_hsa.inference.fused_step``), for caches
    on t's device: where the backend switch sends ops to Triton."""
    return use_fast_paths(t)


# Past this many chunks the HSA decoding kernels' landmark scoring dominates and inductor's compiled reference is as
# fast: a compiled `small` step at 4M tokens took 0.49 ms through the kernels against 0.56 through the modules, and
# 0.73 against 0.70 at 16M (benchmarks/results/generate_hsa_long_*_small_h200_2026-11-29.json).
MAX_DECODE_CHUNKS = 1 << 17  # 8M tokens at S=64


def hsa_decode_kernel_fits(chunk_size: int, head_dim: int, n_chunks: int, compiled: bool) -> bool:
    """Whether an HSA block's decoding step may take the fused kernels (``kernels.decode.triton_hsa``), as far as
    shapes go: power-of-two chunk size and head dim of at least 16, a memory holding chunks, and where the
    alternative is the modules compiled (``compiled``), at most ``MAX_DECODE_CHUNKS`` of them."""
    return (power_of_two_in(chunk_size, 16) and power_of_two_in(head_dim, 16) and n_chunks > 0
            and (n_chunks <= MAX_DECODE_CHUNKS or not compiled))


# ------------------------------------------------------------------------------------------------ MoE experts


def grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` serves x [n, in] @ w [E, in, out]: rows of 16-byte multiples (both widths) and
    one dtype, on the CPU (a reference implementation) and the meta device (shapes only: memory plans, and the
    no-synchronisation test) in bf16 (fp32: below), or on CUDA for bf16 on Hopper or newer (CUTLASS kernels)."""
    if _expert_backend == "loop" or not hasattr(torch, "_grouped_mm"):
        return False
    if not all(n * x.element_size() % 16 == 0 for n in (w.shape[1], w.shape[2])) or x.dtype != w.dtype:
        return False
    if x.device.type in ("cpu", "meta"):
        if x.dtype == torch.bfloat16 or grouped_mm_traces_fp32():
            return True
        # fp32: the CPU kernel computes it, but torch's shape function (meta tensors, and the fake tensors
        # torch.compile traces with) refuses it on 2.11 and 2.13. "auto" then loops everywhere, so eager and compiled
        # code (activation checkpointing recomputes one with the other) take one path; "grouped" (the tests
        # comparing the two) runs it where it can, eagerly on the CPU.
        return _expert_backend == "grouped" and x.device.type == "cpu" and not torch.compiler.is_compiling()
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


def _probe_grouped_mm_fp32() -> bool:
    try:
        torch._grouped_mm(torch.empty(16, 16, device="meta"), torch.empty(1, 16, 16, device="meta"),
                          offs=torch.empty(1, dtype=torch.int32, device="meta"))
    except RuntimeError:
        return False
    return True


# Asked once, at import: asked first inside a compiled region, the probe would itself be traced.
_GROUPED_MM_TRACES_FP32 = hasattr(torch, "_grouped_mm") and _probe_grouped_mm_fp32()


def grouped_mm_traces_fp32() -> bool:
    """Whether this torch's shape function for ``torch._grouped_mm`` accepts fp32 (2.11 and 2.13 do not)."""
    return _GROUPED_MM_TRACES_FP32


def moe_kernels_apply(x: torch.Tensor) -> bool:
    """Whether the MoE layer's fused steps (``kernels.moe``: ``gather_sum``, ``gated_swiglu``) run their Triton kernels
    on x: the backend switch sends x's ops to Triton (CUDA under ``auto``; anywhere under ``triton``, the CPU through
    the interpreter), x is fp32/fp16/bf16, and x has data (never on the meta device: memory plans and the
    no-synchronisation test trace shapes there, which only the references can)."""
    return x.device.type != "meta" and x.dtype in FLOATS and use_fast_paths(x)
