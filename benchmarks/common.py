"""What the benchmarks share: the repository on ``sys.path``, timers, and result files.

Benchmarks run as ``python benchmarks/<name>.py``, so ``benchmarks/`` is ``sys.path[0]`` and ``from common import ...``
works; importing this module puts the repository root on ``sys.path`` as well, so ``kernels``, ``lit_hsa`` and
``data_modules`` import after it. Every benchmark imports it before the project's packages.

Timers (milliseconds unless the name says otherwise):
- ``time_ms``: median of ``iters`` calls after ``warmup`` untimed ones, each call timed alone (CUDA-synchronised
  ``perf_counter`` on a GPU, or CUDA events with ``cuda_events=True``; plain ``perf_counter`` on the CPU);
- ``loop_ms``: mean per call of ``iters`` back-to-back calls, synchronised only at both ends (launches overlap);
- ``graph_us``: µs per call replayed from a CUDA graph of ``calls`` calls (latency-bound steps, no Python launches).

Result files: ``benchmarks/results/<name>_<gpu>_<date>.json`` (``result_path``), ``<gpu>`` being ``gpu_slug()``
(``h100``, ``h200``, ``cpu``), written by ``write_result``.
"""
from __future__ import annotations

import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _is_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def sync(device=None) -> None:
    """Wait for the work queued on ``device`` (None: the current CUDA device if there is one); no-op on the CPU."""
    if _is_cuda(device):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], warmup: int = 1, iters: int = 10, device=None, *, cuda_events: bool = False,
            after: Callable[[], Any] | None = None) -> float:
    """Median ms of ``iters`` calls of ``fn()`` after ``warmup`` untimed calls (compilation, autotuning, allocator).

    Each call is timed alone: on a GPU (``device`` CUDA, or None with CUDA available) between synchronisations with
    ``time.perf_counter``, or with ``cuda_events=True`` as the CUDA-event time from before to after the call (the
    GPU's time, without the host's synchronisation latency); on the CPU with ``time.perf_counter``. ``after`` runs
    untimed after every call (e.g. clearing gradients)."""
    events = cuda_events and _is_cuda(device)
    if events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + iters):
        if events:
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
        if after is not None:
            after()
    return statistics.median(times)


def loop_ms(fn: Callable[[], Any], iters: int, device=None) -> float:
    """Mean ms per call of ``iters`` back-to-back calls of ``fn()``, synchronised before and after the loop only (the
    host launches the next call while the GPU runs the last, as a real loop does). No warm-up: call ``fn`` first."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters * 1e3


def graph_us(fn: Callable[[], Any], calls: int, replays: int = 20) -> float:
    """µs per ``fn()`` call on the current CUDA device, replaying a CUDA graph of ``calls`` calls ``replays`` times
    (three eager warm-up calls first: compilation, autotuning and allocation stay outside the graph). At batch 1 a
    decoding step is latency bound, so launch cost from Python would hide the kernels' own time."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def gpu_name(device=None) -> str:
    """The device's name as the result files record it ("NVIDIA H100 80GB HBM3"); "cpu" without CUDA."""
    if not _is_cuda(device):
        return "cpu"
    return torch.cuda.get_device_name(device)


def gpu_slug(device=None) -> str:
    """The short name used in result file names: 'h100' for "NVIDIA H100 80GB HBM3", 'cpu' on the CPU."""
    name = gpu_name(device).lower()
    if name == "cpu":
        return name
    model = re.search(r"\b([a-z]+\d{2,4}[a-z]?)\b", name)
    return model.group(1) if model else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def today() -> str:
    """The date as the result files record it: ISO ``YYYY-MM-DD``."""
    return datetime.date.today().isoformat()


def result_path(name: str, device=None, suffix: str = "") -> Path:
    """``benchmarks/results/<name>_<gpu>_<date><suffix>.json``, e.g. ``moe_h200_2026-12-04.json``."""
    return RESULTS / f"{name}_{gpu_slug(device)}_{today()}{suffix}.json"


def write_result(path: str | Path, result: dict, indent: int = 2, quiet: bool = False) -> Path:
    """Write ``result`` as JSON to ``path`` (parent folders created); prints where unless ``quiet``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent))
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path
