"""The decoding kernels (``kernels/decode``) against their PyTorch reference.

CPU: the Triton kernel runs under the interpreter (``tests/triton_interpret.py``) in fp32; output and the written
ring slots match the reference to atol/rtol 1e-5. GPU (``gpu``): bf16 kernel against the fp32 reference at the
presets' shapes, relative error < 1e-2.
"""
import pytest
import torch

from tests.triton_interpret import kernel_test, only_if_kernels_skipped, run_module_in_subprocess

pytest.importorskip("triton")

import lit_hsa.kernels.hsa as hsa  # noqa: E402
from lit_hsa.kernels.decode import ring_attention_reference, triton_ring  # noqa: E402
from lit_hsa.kernels.decode.triton_ring import ring_attention_triton  # noqa: E402
from tests.helpers import VOCAB, static_decode_with_triton, tiny  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ring_problem(B, Hq, Hkv, D, W, dtype=torch.float32, seed=0):
    """q [B, 1, Hq, D], the new k, v [B, 1, Hkv, D] and full rings ck, cv [B, Hkv, W, D] (random: every slot
    written)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, 1, h, D, generator=gen).to(DEV, dtype) for h in (Hq, Hkv, Hkv))
    ck, cv = (torch.randn(B, Hkv, W, D, generator=gen).to(DEV, dtype) for _ in range(2))
    return q, k, v, ck, cv


def both(q, k, v, ck, cv, pos, block_keys=64):
    """(kernel output, its rings, reference output in fp32, its rings) for the token at ``pos``."""
    p = torch.tensor(pos, device=DEV)
    rings = ck.clone(), cv.clone()
    ref_rings = ck.float(), cv.float()
    out = ring_attention_triton(q, k, v, *rings, p, block_keys=block_keys)
    ref = ring_attention_reference(q.float(), k.float(), v.float(), *ref_rings, p)
    return out, rings, ref, ref_rings


@kernel_test
@pytest.mark.parametrize("B,Hq,Hkv,D,W,block_keys,merge_tile", [
    (2, 10, 2, 16, 8, 64, None), (1, 4, 4, 32, 100, 64, None), (1, 16, 1, 16, 64, 64, None),
    (2, 20, 1, 16, 130, 64, None), (2, 10, 2, 16, 130, 16, 512), (1, 4, 2, 16, 1100, 16, None)])
def test_ring_step_matches_reference_around_the_ring(B, Hq, Hkv, D, W, block_keys, merge_tile, monkeypatch):
    """Any head ratio (G = 5, 1, 16, 20: one or two 16-row tiles), rings that are not a multiple of the key block, one
    range or several (W=130 in blocks of 16: 9 ranges, the last partly past the ring; W=1100: 69 blocks in 23 ranges
    of three, so ranges hold several blocks), and positions from the first (one valid slot, most ranges empty) through
    the lap boundary to several laps later. A merge tile of 512 values merges the 9 ranges two at a time."""
    from lit_hsa.kernels.decode.triton_ring import ring_splits

    if merge_tile:
        monkeypatch.setattr(triton_ring, "MERGE_TILE", merge_tile)

    assert ring_splits(130, 16) == (9, 1) and ring_splits(1100, 16) == (23, 3)
    q, k, v, ck, cv = ring_problem(B, Hq, Hkv, D, W)
    for pos in (0, W // 2, W - 1, W, 3 * W + 5):
        out, rings, ref, ref_rings = both(q, k, v, ck, cv, pos, block_keys)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"pos {pos}: {m}")
        for got, want in zip(rings, ref_rings):
            torch.testing.assert_close(got, want)  # the new key/value in slot pos % W, nothing else touched


@kernel_test
def test_consecutive_steps_read_what_earlier_steps_wrote():
    """Steps chained through the kernel alone equal steps chained through the reference: each step's write lands where
    the next steps read it."""
    B, Hq, Hkv, D, W = 1, 4, 2, 16, 40
    gen = torch.Generator().manual_seed(1)
    rings = [torch.zeros(B, Hkv, W, D, device=DEV) for _ in range(2)]
    ref_rings = [x.clone() for x in rings]
    locks = torch.zeros(B * Hkv, dtype=torch.int32, device=DEV)  # shared by every step, as in static decoding
    for pos in range(2 * W + 3):
        q, k, v = (torch.randn(B, 1, h, D, generator=gen).to(DEV) for h in (Hq, Hkv, Hkv))
        p = torch.tensor(pos, device=DEV)
        torch.testing.assert_close(ring_attention_triton(q, k, v, *rings, p, locks, block_keys=16),
                                   ring_attention_reference(q, k, v, *ref_rings, p), atol=1e-5, rtol=1e-5)
        assert not locks.any()  # the merging program leaves the counters at zero for the next step


def test_ring_kernel_rejects_what_it_does_not_cover():
    q, k, v, ck, cv = ring_problem(1, 4, 2, 16, 8)
    p = torch.tensor(3, device=DEV)
    with pytest.raises(ValueError, match="do not fit"):
        ring_attention_triton(q.expand(1, 2, 4, 16), k, v, ck, cv, p)  # two new tokens
    with pytest.raises(ValueError, match="power-of-two head dim"):
        ring_attention_triton(q[..., :12], k[..., :12], v[..., :12], ck[..., :12], cv[..., :12], p)
    with pytest.raises(ValueError, match="locks must be int32 with at least 2"):
        ring_attention_triton(q, k, v, ck, cv, p, torch.zeros(1, dtype=torch.int32, device=DEV))


def test_ring_dispatch_follows_the_backend_switch_and_the_window_bound():
    from lit_hsa.kernels.decode import RING_KERNEL_MAX_WINDOW, use_ring_kernel

    x = torch.zeros(1, 1, 4, 16)
    long = RING_KERNEL_MAX_WINDOW + 1
    assert not use_ring_kernel(x, 16, 512)  # auto: CUDA tensors only
    for backend, small, long_ok, d8 in (("triton", True, False, False), ("reference", False, False, False)):
        hsa.set_backend(backend)
        try:
            assert (use_ring_kernel(x, 16, 512), use_ring_kernel(x, 16, long), use_ring_kernel(x, 8, 512),
                    use_ring_kernel(x.long(), 16, 512)) == (small, long_ok, d8, False), backend
            # against a compiled reference, only head dims up to 64 (where the kernel measured faster)
            assert (use_ring_kernel(x, 128, 512), use_ring_kernel(x, 128, 512, compiled_fallback=True),
                    use_ring_kernel(x, 16, 512, compiled_fallback=True)) == (small, False, small), backend
        finally:
            hsa.set_backend("auto")


@kernel_test
@pytest.mark.parametrize("variant", ["swa", "hsa"])
def test_static_decoding_through_the_ring_kernel_equals_full_forward(variant, monkeypatch):
    """With the Triton backend, blocks running their modules (``fuse_blocks=False``; ``test_fused_step`` covers the
    fused blocks), every sliding-window layer's decoding step (SWA blocks, and the HSA blocks' SWA sub-layer) runs
    the kernel, and the logits are the full forward's."""
    from lit_hsa.model.transformer import Block, HSATransformer

    calls = []
    monkeypatch.setattr(triton_ring, "ring_attention_triton",
                        lambda *a: calls.append(1) or ring_attention_triton(*a))
    extra = dict(attention="swa") if variant == "swa" else dict(hsa_layer_swa=True, hsa_swa_window=4)
    model = HSATransformer(tiny(**extra, hsa_topk=3, head_dim=16)).to(DEV).eval()  # the kernel takes D >= 16
    x = torch.randint(0, VOCAB, (2, 30), device=DEV)
    outs, ref = static_decode_with_triton(model, x, 13, fuse_blocks=False)
    torch.testing.assert_close(outs, ref, atol=1e-4, rtol=1e-4)
    n_ring_layers = (sum(isinstance(m, Block) and m.window is not None for m in model.modules())
                     + sum(m.swa_window is not None for m in model.hsa_blocks()))
    assert len(calls) == 17 * n_ring_layers


@only_if_kernels_skipped
@pytest.mark.slow
def test_cpu_kernels_in_subprocess():
    run_module_in_subprocess(__file__)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D,W", [(10, 2, 64, 512), (16, 1, 128, 4096), (16, 4, 128, 512)])
def test_gpu_bf16_ring_step_vs_fp32_reference(Hq, Hkv, D, W):
    q, k, v, ck, cv = ring_problem(1, Hq, Hkv, D, W, dtype=torch.bfloat16)
    for pos in (5, W + 7):
        out, rings, ref, ref_rings = both(q, k, v, ck, cv, pos)  # W=4096: 32 ranges of two key blocks
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
        torch.testing.assert_close(rings[0].float(), ref_rings[0])

