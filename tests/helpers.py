"""Helpers that several test modules share: tiny model configs, `main.py fit` runs and their TensorBoard scalars,
static decoding under the Triton backend, error measures, and loading a benchmark script.

Importing this module imports neither triton nor anything that does (``lit_hsa.model``, ``kernels.hsa``): modules
that run Triton kernels under the interpreter import ``tests.triton_interpret`` first, before triton, and may import
these helpers at any point. Whatever would import triton is imported inside the helper that needs it.
"""
from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_hsa.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ tiny models

VOCAB = 64


def tiny(**overrides) -> ModelConfig:
    """The `tiny` preset shrunk further (d_model 32, chunks of 8, window 8, vocabulary ``VOCAB``), with overrides."""
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, chunk_size=8, hsa_topk=2,
                swa_window=8, ffn_hidden=64, expert_hidden=32, retrieval_dim=16)
    base.update(overrides)
    return ModelConfig.from_name("tiny", **base)


VARIANTS = {  # model variants every model-level property is checked on (overrides of ``tiny``)
    "hsa": {},
    "hsa-standard-stick-swa": dict(hsa_residual="standard", fusion="stick_breaking", hsa_layer_swa=True,
                                   hsa_swa_window=4, pos_decay=True, hsa_kv_heads=2, shared_selection=True,
                                   hsa_gate=True),
    "hsa-no-encoder-per-head": dict(encoder_layers=0, hsa_kv_heads=2, hsa_heads=4),
    "hsa-off-by-one": dict(softmax_off_by_one=True, hsa_layer_swa=True),
    "swa": dict(attention="swa"),
    "full": dict(attention="full"),
}

# ------------------------------------------------------------------------------------------------ `main.py` runs

FAST = ["data.seq_len=64", "data.batch_size=2", "data.val_samples=2", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "optim.warmup_steps=2"]


def run_dir(root: Path, name: str) -> Path:
    """The newest ``version_*`` folder of run ``name`` under ``root`` (``trainer.root_dir``)."""
    return max((root / name).glob("version_*"))


def fit(tmp_path: Path, name: str, *extra: str) -> Path:
    """``main.py fit`` in this process on ``configs/tiny.yaml`` with ``FAST`` settings and ``extra`` overrides;
    asserts exit code 0 → the run's version folder."""
    from lit_hsa.cli import main

    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}",
            f"trainer.run_name={name}", *FAST, *extra]
    assert main(args) == 0
    return run_dir(tmp_path, name)


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a TensorBoard scalar a run logged."""
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


# ------------------------------------------------------------------------------------------------ decoding


def static_decode_with_triton(model, x: torch.Tensor, prompt: int, **decoder_kwargs):
    """Prefills x[:, :prompt], then decodes the rest with ``GraphDecoder`` under the Triton backend → (logits of the
    decoded positions [B, T-prompt, V], the full forward's for them)."""
    import lit_hsa.kernels.hsa as hsa
    from lit_hsa.inference.generate import prefill
    from lit_hsa.inference.static_decode import GraphDecoder

    with torch.no_grad():
        ref = model(x)
        _, state = prefill(model, x[:, :prompt], segment_size=5)
    hsa.set_backend("triton")
    try:
        decoder = GraphDecoder(model, state, max_len=x.shape[1], **decoder_kwargs)
        outs = [decoder.step(x[:, t]) for t in range(prompt, x.shape[1])]
    finally:
        hsa.set_backend("auto")
    return torch.stack(outs, dim=1), ref[:, prompt:]


# ------------------------------------------------------------------------------------------------ error measures

SCALE_TOLERANCE = 0.05


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Finite, and max |got − want| within ``SCALE_TOLERANCE`` (5%) of want's scale (max |want|): bf16 results
    against fp32 ones (``tests/model/test_precision.py`` says why 5%)."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max()
    assert err <= SCALE_TOLERANCE * scale, f"{what}: max error {err:.4g} > {SCALE_TOLERANCE} × {scale:.4g}"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in fp32 (the denominator clamped away from 0): low-precision kernels against fp32
    references."""
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ benchmarks


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module, importable as when run as a script (``benchmarks/`` on ``sys.path``, so
    its ``from common import ...`` works)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def saved_plots() -> Iterator[dict[str, dict[str, list[tuple[list, list]]]]]:
    """Record what every figure saved while the block runs plots: {file name: {axes title: [(x, y) of each line
    with a label, in drawing order]}} (lines without a label, e.g. the training-length markers, are left out), so a
    test can compare a plot's data with the numbers it should show instead of only checking that a file exists."""
    from matplotlib.figure import Figure

    plots: dict[str, dict[str, list[tuple[list, list]]]] = {}
    real_savefig = Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        plots[Path(path).name] = {
            ax.get_title(): [(list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
                             for line in ax.lines if not line.get_label().startswith("_")] for ax in fig.axes}
        return real_savefig(fig, path, *args, **kwargs)

    Figure.savefig = savefig
    try:
        yield plots
    finally:
        Figure.savefig = real_savefig


def random_moe(d_model: int, n_experts: int, top_k: int, hidden: int, lora: bool = False) -> torch.nn.Module:
    """A MoE layer (shared expert included) in training mode with experts drawn at std 0.2 and a spread of selection
    biases (−0.3 … 0.3); with ``lora``, expert LoRA of rank 8 whose B is non-zero, so the adapters change the output."""
    from lit_hsa.config import FinetuneConfig
    from lit_hsa.model.lora import apply_lora
    from lit_hsa.model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(d_model, n_experts=n_experts, experts_per_token=top_k, expert_hidden=hidden)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(w, std=0.2)
    moe.expert_bias.copy_(torch.linspace(-0.3, 0.3, n_experts))
    if lora:
        wrapper = torch.nn.Module()
        wrapper.moe = moe
        apply_lora(wrapper, FinetuneConfig(method="lora", lora_rank=8, lora_targets=["experts"]))
        for name in ("gate", "up", "down"):
            torch.nn.init.normal_(getattr(moe.lora_experts, f"lora_{name}_B"), std=0.1)
    return moe.train()
