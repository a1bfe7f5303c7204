"""``kernels.dispatch``: every kernel-or-reference decision, one test per branch. CUDA is simulated where a decision
reads it (``use_fast_paths`` under ``auto``), so the branches run on the CPU."""
import pytest
import torch

import lit_hsa.kernels.dispatch as dispatch


@pytest.fixture
def backend():
    yield dispatch.set_backend
    dispatch.set_backend("auto")
    dispatch.set_expert_backend("auto")


@pytest.fixture
def as_on_cuda(monkeypatch):
    """``use_fast_paths`` as under ``auto`` on CUDA with Triton installed."""
    monkeypatch.setattr(dispatch, "use_fast_paths", lambda t: True)


def test_backend_switch(backend):
    x = torch.zeros(2)
    assert not dispatch.use_fast_paths(x)  # auto: CPU tensors take the references
    backend("triton")
    assert dispatch.use_fast_paths(x)  # triton: everywhere (the CPU interpreter in tests)
    backend("reference")
    assert not dispatch.use_fast_paths(x)
    with pytest.raises(ValueError, match="backend must be one of"):
        backend("cuda")
    with pytest.raises(ValueError, match="expert backend must be one of"):
        dispatch.set_expert_backend("fast")


def test_hsa_attention_branches(backend, as_on_cuda):
    q = torch.zeros(1, 64, 4, 16)
    many, few = torch.zeros(1, 64, 2, 4), torch.zeros(1, 2, 2, 4)  # 512 and 16 (token, slot) pairs
    assert dispatch.hsa_attention_uses_kernel(q, many, 16)
    assert not dispatch.hsa_attention_uses_kernel(q, few, 16)  # decoding-sized under auto: the reference
    backend("triton")
    assert dispatch.hsa_attention_uses_kernel(q, few, 16)  # forced: the kernel at any size
    assert not dispatch.hsa_attention_uses_kernel(q, many, 8)  # chunk size below 16
    assert not dispatch.hsa_attention_uses_kernel(torch.zeros(1, 64, 4, 24), many, 16)  # head dim not a power of 2
    assert not dispatch.hsa_attention_uses_kernel(q.double(), many, 16)  # fp64: the reference


def test_hsa_attention_not_while_capturing_a_graph(monkeypatch, as_on_cuda):
    monkeypatch.setattr(dispatch, "capturing", lambda: True)
    assert not dispatch.hsa_attention_uses_kernel(torch.zeros(1, 64, 4, 16), torch.zeros(1, 64, 2, 4), 16)
    assert not dispatch.select_chunks_uses_kernel(torch.zeros(1, 64, 2, 8), 0)


def test_select_chunks_and_static_steps(as_on_cuda):
    q_slc = torch.zeros(1, 64, 2, 8)
    assert dispatch.select_chunks_uses_kernel(q_slc, 0)
    assert not dispatch.select_chunks_uses_kernel(q_slc, torch.tensor(5))  # static decoding step
    assert dispatch.static_step_uses_references(torch.tensor(5)) and not dispatch.static_step_uses_references(5)


def test_static_steps_trace_the_references_and_other_calls_stay_opaque():
    """The public HSA ops decide the path themselves: in a static decoding step (``q_start`` a tensor) they run the
    references, traced whole into a compiled block (no graph break, the reference's values); elsewhere they stay
    opaque to torch.compile (``torch.compiler.disable``), as their fast paths size work lists on the host."""
    from lit_hsa.kernels.hsa import hsa_attention, hsa_attention_reference, select_chunks, select_chunks_reference

    torch.manual_seed(0)
    B, T, H, D, S, C, K = 1, 1, 2, 16, 8, 6, 3
    q_slc, landmarks = torch.randn(B, T, 1, D), torch.randn(B, C, 1, D)
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, C * S, 1, D), torch.randn(B, C * S, 1, D)

    def step(q_start):
        scores, idx = select_chunks(q_slc, landmarks, K, S, None, q_start=q_start)
        return hsa_attention(q, k, v, torch.softmax(scores, -1), idx, S, q_start=q_start)

    def reference(q_start):
        scores, idx = select_chunks_reference(q_slc, landmarks, K, S, None, q_start=q_start)
        return hsa_attention_reference(q, k, v, torch.softmax(scores, -1), idx, S)

    pos = torch.tensor(C * S + 3)
    torch._dynamo.reset()
    traced = torch._dynamo.explain(step)(pos)
    assert traced.graph_count == 1 and not traced.break_reasons
    opaque = torch._dynamo.explain(step)(C * S + 3)
    assert opaque.break_reasons and all("disable" in r.reason for r in opaque.break_reasons)
    torch.testing.assert_close(step(pos), reference(pos), rtol=0, atol=0)
    torch.testing.assert_close(step(C * S + 3), reference(C * S + 3), rtol=0, atol=0)


def test_ring_kernel_branches(backend):
    x = torch.zeros(1, 1, 4, 16)
    long = dispatch.RING_KERNEL_MAX_WINDOW + 1
    assert not dispatch.use_ring_kernel(x, 16, 512)  # auto on the CPU
    backend("triton")
    assert dispatch.use_ring_kernel(x, 16, 512)
    assert not dispatch.use_ring_kernel(x, 16, long)  # past the window where it measured faster
    assert not dispatch.use_ring_kernel(x, 8, 512)  # head dim below 16
    assert not dispatch.use_ring_kernel(x.long(), 16, 512)  # not a float
    assert dispatch.use_ring_kernel(x, 64, 512, compiled_fallback=True)
    assert not dispatch.use_ring_kernel(x, 128, 512, compiled_fallback=True)  # the compiled reference wins there
    assert dispatch.ring_kernel_fits(x, x) and not dispatch.ring_kernel_fits(x.double(), x)


def test_fused_blocks_follow_the_backend(backend):
    x = torch.zeros(1)
    assert not dispatch.fused_blocks_apply(x)
    backend("triton")
    assert dispatch.fused_blocks_apply(x)


def test_hsa_decode_kernel_shapes(monkeypatch):
    assert dispatch.hsa_decode_kernel_fits(64, 64, 10, compiled=False)
    assert not dispatch.hsa_decode_kernel_fits(8, 64, 10, compiled=False)  # chunk below 16
    assert not dispatch.hsa_decode_kernel_fits(48, 64, 10, compiled=False)  # not a power of two
    assert not dispatch.hsa_decode_kernel_fits(64, 64, 0, compiled=False)  # nothing to retrieve yet
    monkeypatch.setattr(dispatch, "MAX_DECODE_CHUNKS", 4)
    assert dispatch.hsa_decode_kernel_fits(64, 64, 5, compiled=False)  # uncompiled: the kernels at every length
    assert not dispatch.hsa_decode_kernel_fits(64, 64, 5, compiled=True)  # compiled modules are as fast there
    assert dispatch.hsa_decode_kernel_fits(64, 64, 4, compiled=True)


def test_grouped_mm_branches(backend, monkeypatch):
    x, w = torch.zeros(4, 32), torch.zeros(2, 32, 16)
    assert dispatch.grouped_mm_applies(x.bfloat16(), w.bfloat16())  # CPU reference implementation
    assert dispatch.grouped_mm_applies(x.to("meta", torch.bfloat16), w.to("meta", torch.bfloat16))
    assert not dispatch.grouped_mm_applies(x.bfloat16(), torch.zeros(2, 32, 4, dtype=torch.bfloat16))  # 8-byte rows
    assert not dispatch.grouped_mm_applies(x, w.bfloat16())  # mixed dtypes

    def compiled(a, b) -> bool:
        return bool(torch.compile(lambda a, b: torch.tensor(dispatch.grouped_mm_applies(a, b)), backend="eager")(a, b))

    # fp32 where torch's shape function refuses it (2.11, 2.13): "auto" loops in eager and compiled code alike (they
    # must agree: activation checkpointing recomputes one with the other); "grouped" runs it eagerly on the CPU
    monkeypatch.setattr(dispatch, "grouped_mm_traces_fp32", lambda: False)
    assert not dispatch.grouped_mm_applies(x, w) and not compiled(x, w)
    dispatch.set_expert_backend("grouped")
    assert dispatch.grouped_mm_applies(x, w) and not compiled(x, w)
    assert not dispatch.grouped_mm_applies(x.to("meta"), w.to("meta"))
    dispatch.set_expert_backend("auto")
    monkeypatch.setattr(dispatch, "grouped_mm_traces_fp32", lambda: True)  # a torch that traces fp32
    assert dispatch.grouped_mm_applies(x, w) and compiled(x, w)
    dispatch.set_expert_backend("loop")
    assert not dispatch.grouped_mm_applies(x, w)
    dispatch.set_expert_backend("auto")
    monkeypatch.delattr(torch, "_grouped_mm")  # an older torch
    assert not dispatch.grouped_mm_applies(x.bfloat16(), w.bfloat16())
