"""The MoE layer's fused steps (``kernels/moe``: ``gather_sum``, ``gated_swiglu``) against their PyTorch references.

CPU: the Triton kernels run under the interpreter (``tests/triton_interpret.py``) over ragged shapes (row counts that
are not a multiple of the 16-row block, widths of 48 or 80: multiples of 16, not powers of two; k ∈ {1, 2, 4}).
fp32: outputs and gradients equal the references to atol/rtol 1e-6 (d_g, a sum whose terms cancel, to 1e-6 of the
sum of their magnitudes). bf16 inputs: the kernels compute in fp32 and round once, so they are within one bf16
rounding of the fp32 math (rtol 2⁻⁸ on CUDA; 2⁻⁷ in the interpreter, whose bf16 cast truncates), while the reference
rounds after each op (within 4 roundings of the kernel). A whole MoE layer under ``set_backend("triton")`` equals the
reference backend (outputs and every gradient, LoRA experts included, fp32, 1e-5). GPU (``gpu``): bf16 kernels at
``moe-8b-a1b`` widths against the fp32 math.
"""
import pytest
import torch

from tests.triton_interpret import kernel_test, only_if_kernels_skipped, run_module_in_subprocess

pytest.importorskip("triton")

import lit_hsa.kernels.dispatch as dispatch  # noqa: E402
from lit_hsa.kernels.moe import gated_swiglu, gated_swiglu_reference, gather_sum, gather_sum_reference  # noqa: E402
from lit_hsa.model.moe import MoE, Route  # noqa: E402
from tests.helpers import random_moe  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# One rounding of an fp32 value to bf16, relative: half an ulp (2⁻⁸) where it rounds to nearest (CUDA); the Triton
# interpreter's fp32 → bf16 cast truncates, a whole ulp (2⁻⁷).
BF16_ROUNDING = 2.0**-8 if DEV == "cuda" else 2.0**-7


@pytest.fixture
def backend():
    yield dispatch.set_backend
    dispatch.set_backend("auto")


def routing(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random expert order of n·k assignments → (order [N·k]: sorted position → assignment, position_of: its
    inverse), as ``Route`` builds them."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n * k, generator=gen)
    route = Route(order.to(DEV), k)
    return route.token_of, route.position_of


def swiglu_problem(m: int, hidden: int, dtype=torch.float32, seed=0):
    """gu [M, 2h] (gate | up), g [M] fp32 in [0, 1] like renormalised gates, dh [M, h]."""
    gen = torch.Generator().manual_seed(seed)
    gu = (torch.randn(m, 2 * hidden, generator=gen) * 2).to(DEV, dtype)
    g = torch.rand(m, generator=gen).to(DEV)
    dh = torch.randn(m, hidden, generator=gen).to(DEV, dtype)
    return gu, g, dh


def assert_close_each(got, want, names, atol, rtol, row_sum_scale=None):
    """assert_close for each pair, naming the tensor. d_g (named "d g") is a sum over the width whose terms cancel:
    its error is bounded relative to the sum of their magnitudes (``row_sum_scale`` [M]), not to its value."""
    for a, b, what in zip(got, want, names):
        if what == "d g":
            a, b = a / row_sum_scale, b / row_sum_scale
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol,
                                   msg=lambda m, what=what: f"{what}: {m}")


def d_g_scale(gu, dh):
    """Σ_i |dh · silu(gate) · up| per row [M]: the scale of d_g's terms."""
    gate, up = gu.float().chunk(2, dim=-1)
    return (dh.float() * torch.nn.functional.silu(gate) * up).abs().sum(-1)


def swiglu_grads(fn, gu, g, dh):
    """(h, d_gu, d_g) of fn(gu, g) for the upstream gradient dh."""
    gu, g = gu.detach().requires_grad_(), g.detach().requires_grad_()
    h = fn(gu, g)
    h.backward(dh)
    return h.detach(), gu.grad, g.grad


RAGGED = [(37, 48, 1), (37, 48, 2), (50, 80, 4), (5, 16, 4)]  # (tokens or rows, width, k)


# ------------------------------------------------------------------------------------------------ gather-sum


@kernel_test
@pytest.mark.parametrize("n,d,k", RAGGED)
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
def test_gather_sum_matches_reference(n, d, k, in_dtype, out_dtype, backend):
    """Each token's k rows, wherever the expert order put them, summed: equal to the reference (fp32 accumulation in
    both, so bf16 outputs agree to the last bit but for summation order: 1e-6 in fp32, one rounding in bf16)."""
    backend("triton")
    _, position_of = routing(n, k)
    y = torch.randn(n * k, d, generator=torch.Generator().manual_seed(1)).to(DEV, in_dtype)
    out = gather_sum(y, position_of, k, out_dtype)
    ref = gather_sum_reference(y, position_of, k, out_dtype)
    assert out.dtype == out_dtype and out.shape == (n, d)
    tol = 1e-6 if out_dtype == torch.float32 else BF16_ROUNDING
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@kernel_test
@pytest.mark.parametrize("k", [2, 4])
def test_gather_sum_accumulates_in_fp32(k, backend):
    """bf16 rows 256, 1, 1, ...: summed in bf16, 256 + 1 rounds back to 256 every time (bf16 holds 8 significant
    bits); in fp32 the sum is 256 + (k − 1) exactly. The rows are placed out of order so each j reads its own row."""
    backend("triton")
    n, d = 20, 48
    _, position_of = routing(n, k, seed=3)
    src = torch.ones(n * k, d)
    src[::k] = 256.0  # assignment t·k + 0 of every token carries 256
    y = torch.empty_like(src)
    y[position_of.cpu()] = src  # row position_of[a] of y holds assignment a
    out = gather_sum(y.to(DEV, torch.bfloat16), position_of, k, torch.float32)
    torch.testing.assert_close(out, torch.full((n, d), 256.0 + k - 1, device=DEV), atol=0, rtol=0)


@kernel_test
@pytest.mark.parametrize("n,d,k", RAGGED)
def test_route_forward_and_gradients_match_the_reference_backend(n, d, k, backend):
    """``Route.to_tokens`` (the combine) and ``to_experts`` (whose backward is the combine) through the kernel equal
    the reference backend, values and gradients, fp32."""
    order = torch.randperm(n * k, generator=torch.Generator().manual_seed(4)).to(DEV)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, d, generator=gen).to(DEV), torch.randn(n * k, d, generator=gen).to(DEV)
    dx_out, dy_out = torch.randn(n * k, d, generator=gen).to(DEV), torch.randn(n, d, generator=gen).to(DEV)
    results = []
    for name in ("triton", "reference"):
        backend(name)
        route = Route(order, k)
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        to_experts, to_tokens = route.to_experts(xg, torch.float32), route.to_tokens(yg, torch.float32)
        torch.autograd.backward([to_experts, to_tokens], [dx_out, dy_out])
        results.append((to_experts, to_tokens, xg.grad, yg.grad))
    for got, want, what in zip(*results, ("to_experts", "to_tokens", "d x", "d y")):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m, what=what: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------ gated SwiGLU


@kernel_test
@pytest.mark.parametrize("m,hidden", [(37, 48), (50, 80), (1, 16), (16, 160)])
def test_gated_swiglu_matches_reference_in_fp32(m, hidden, backend):
    """h and the gradients of gate, up (one [M, 2h] tensor) and the routing gate equal autograd through the
    reference, 1e-6 (the backward walks a width of 160 in two blocks of 128, the second ragged)."""
    backend("triton")
    gu, g, dh = swiglu_problem(m, hidden)
    got = swiglu_grads(gated_swiglu, gu, g, dh)
    want = swiglu_grads(gated_swiglu_reference, gu, g, dh)
    assert_close_each(got, want, ("h", "d gu", "d g"), 1e-6, 1e-6, d_g_scale(gu, dh))
    assert got[1].shape == (m, 2 * hidden) and got[1].is_contiguous() and got[2].dtype == torch.float32


@kernel_test
def test_gated_swiglu_in_bf16_rounds_once(backend):
    """bf16 gate | up: the kernel's h and d_gu are the fp32 math rounded once (``BF16_ROUNDING``); d_g (fp32)
    equals the fp32 math to 1e-5; the reference, rounding after each op, stays within 4 roundings of the kernel."""
    backend("triton")
    gu, g, dh = swiglu_problem(37, 48, torch.bfloat16)
    got = swiglu_grads(gated_swiglu, gu, g, dh)
    exact = swiglu_grads(gated_swiglu_reference, gu.float(), g, dh.float())
    op_by_op = swiglu_grads(gated_swiglu_reference, gu, g, dh)
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    scale = d_g_scale(gu, dh)
    assert_close_each(got[:2], exact[:2], ("h", "d gu"), 1e-6, BF16_ROUNDING)
    assert_close_each(got[2:], exact[2:], ("d g",), 1e-6, 0, scale)
    assert_close_each(got, op_by_op, ("h", "d gu", "d g"), 1e-2, 4 * BF16_ROUNDING, scale)


# ------------------------------------------------------------------------------------------------ the MoE layer


def moe_layer(k: int, lora: bool) -> MoE:
    """d 48, 6 experts of width 48 (not powers of two), top-k, shared expert; LoRA on the experts with non-zero B."""
    return random_moe(48, 6, k, 48, lora).to(DEV)


@kernel_test
@pytest.mark.parametrize("k,lora", [(1, False), (2, True), (4, False)])
def test_moe_layer_with_the_triton_backend_equals_the_reference_backend(k, lora, backend):
    """A MoE layer's output and every gradient (input, router, experts, shared expert, LoRA) are the same whichever
    backend runs its combine and activation (fp32, 1e-5). 2×19 tokens: not a multiple of the kernels' blocks."""
    moe = moe_layer(k, lora)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 19, 48, generator=gen).to(DEV).requires_grad_()
    target = torch.randn(2, 19, 48, generator=gen).to(DEV)
    results = []
    for name in ("triton", "reference"):
        backend(name)
        moe.zero_grad(set_to_none=True)
        x.grad = None
        out = moe(x)
        (out * target).sum().backward()
        results.append({"out": out.detach(), "x": x.grad,
                        **{n: p.grad for n, p in moe.named_parameters() if p.requires_grad}})
    assert results[0].keys() == results[1].keys() and len(results[0]) > 2
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], atol=1e-5, rtol=1e-5, msg=n)


def test_moe_kernels_apply_follows_the_backend_switch_and_never_the_meta_device(backend):
    """``auto``: CUDA tensors only; ``triton``: any device with data; ``reference``: nowhere; meta: never."""
    cpu = torch.zeros(2, 16)
    assert not dispatch.moe_kernels_apply(cpu)
    backend("triton")
    assert dispatch.moe_kernels_apply(cpu)
    assert not dispatch.moe_kernels_apply(torch.zeros(2, 16, device="meta"))
    assert not dispatch.moe_kernels_apply(cpu.long())
    backend("reference")
    assert not dispatch.moe_kernels_apply(cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_match_the_fp32_math_at_moe_8b_widths():
    """bf16 on CUDA, moe-8b-a1b widths (d 2048, expert width 768, top-4) at 4K tokens: the combine and the activation
    (forward and gradients) within one bf16 rounding of the fp32 math; d_g to 1e-4 relative."""
    n, d, k, hidden = 4096, 2048, 4, 768
    _, position_of = routing(n, k)
    y = torch.randn(n * k, d, device=DEV, dtype=torch.bfloat16)
    out = gather_sum(y, position_of, k, torch.bfloat16)
    torch.testing.assert_close(out.float(), gather_sum_reference(y.float(), position_of, k, torch.float32),
                               atol=1e-5, rtol=BF16_ROUNDING)
    gu, g, dh = swiglu_problem(n * k, hidden, torch.bfloat16)
    got = swiglu_grads(gated_swiglu, gu, g, dh)
    exact = swiglu_grads(gated_swiglu_reference, gu.float(), g, dh.float())
    assert_close_each(got[:2], exact[:2], ("h", "d gu"), 1e-5, BF16_ROUNDING)
    assert_close_each(got[2:], exact[2:], ("d g",), 1e-6, 0, d_g_scale(gu, dh))


@only_if_kernels_skipped
@pytest.mark.slow
def test_cpu_kernels_in_subprocess():
    run_module_in_subprocess(__file__)
