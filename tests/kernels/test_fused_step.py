"""A dense block's decoding step in fused kernels (``kernels/decode/triton_block.py``, ``ring_attention_out_proj``,
``lit_hsa/inference/fused_step.py``).

CPU: the kernels run under the Triton interpreter in fp32 against their PyTorch references (atol/rtol 1e-5), and
static decoding with fused blocks gives the full forward's logits (1e-4). GPU (``gpu``): bf16 kernels against the
fp32 references at the `small` preset's shapes, relative error < 1e-2.
"""
import pytest
import torch

from tests.triton_interpret import kernel_test, only_if_kernels_skipped, run_module_in_subprocess

pytest.importorskip("triton")

import lit_hsa.kernels.hsa as hsa  # noqa: E402
from lit_hsa.kernels.decode import ring_attention_reference  # noqa: E402
from lit_hsa.kernels.decode.reference import gemv_reference, qkv_rope_reference  # noqa: E402
from lit_hsa.kernels.decode.triton_block import gemv, qkv_rope  # noqa: E402
from lit_hsa.kernels.decode.triton_ring import ring_attention_out_proj  # noqa: E402
from tests.helpers import VOCAB, assert_close_to_scale, rel_err, static_decode_with_triton, tiny  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(DEV, dtype)


def qkv_problem(B, d, Hq, Hkv, D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = randn(B, 1, d, dtype=dtype, gen=gen)
    weights = [randn(h * D, d, dtype=dtype, gen=gen) / d**0.5 for h in (Hq, Hkv, Hkv)]
    norms = [(torch.rand(n, generator=gen) + 0.5).to(DEV, dtype) for n in (d, D, D)]
    angle = torch.rand(1, D // 2, generator=gen).to(DEV) * 6
    return x, norms[0], weights, norms[1:], angle.cos(), angle.sin()


@kernel_test
@pytest.mark.parametrize("B,d,Hq,Hkv,D,head_norm", [(2, 48, 4, 2, 16, True), (1, 200, 6, 1, 32, False),
                                                    (1, 32, 2, 2, 8, True)])
def test_qkv_rope_matches_reference(B, d, Hq, Hkv, D, head_norm):
    """Input widths that are not a multiple of the kernel's K block (48, 200 → two blocks of 128), GQA ratios 2, 6
    and 1, with and without the per-head norms."""
    x, nw, (wq, wk, wv), (qn, kn), cos, sin = qkv_problem(B, d, Hq, Hkv, D)
    if not head_norm:
        qn = kn = None
    got = qkv_rope(x, nw, wq, wk, wv, qn, kn, cos, sin, 1e-6)
    want = qkv_rope_reference(x, nw, wq, wk, wv, qn, kn, cos, sin, 1e-6)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@kernel_test
@pytest.mark.parametrize("mode", ["plain", "norm", "gated", "residual", "norm-gated-residual"])
def test_gemv_matches_reference(mode):
    """Output rows not a multiple of the row block (40), inputs over two K blocks (200), two sequences."""
    gen = torch.Generator().manual_seed(1)
    B, N, K = 2, 40, 200
    x, w, w_up, residual = randn(B, 1, K, gen=gen), randn(N, K, gen=gen), randn(N, K, gen=gen), randn(B, N, gen=gen)
    kw = {}
    if "norm" in mode:
        kw.update(norm_w=(torch.rand(K, generator=gen) + 0.5).to(DEV), eps=1e-6)
    if "gated" in mode:
        kw["w_up"] = w_up
    if "residual" in mode:
        kw["residual"] = residual
    torch.testing.assert_close(gemv(x, w, **kw), gemv_reference(x, w, **kw), atol=1e-4, rtol=1e-5)


@kernel_test
def test_gemv_sums_partial_inputs():
    """x given as partial results [B, P, K] (HSA's groups of chunks): the kernel projects their sum, norm included."""
    gen = torch.Generator().manual_seed(3)
    x, w, norm_w = randn(2, 3, 200, gen=gen), randn(40, 200, gen=gen), randn(200, gen=gen)
    torch.testing.assert_close(gemv(x, w, norm_w=norm_w, eps=1e-6),
                               gemv_reference(x.sum(1), w, norm_w=norm_w, eps=1e-6), atol=1e-4, rtol=1e-5)


@kernel_test
def test_gemv_stacks_matrices():
    """w as a list of matrices (q, k, v projections): their rows stacked, with row blocks straddling the seams."""
    gen = torch.Generator().manual_seed(4)
    x, norm_w = randn(2, 1, 200, gen=gen), (torch.rand(200, generator=gen) + 0.5).to(DEV)
    for sizes in ((40, 3, 5), (16, 24)):
        ws = [randn(n, 200, gen=gen) for n in sizes]
        torch.testing.assert_close(gemv(x, ws, norm_w=norm_w, eps=1e-6),
                                   gemv_reference(x, torch.cat(ws), norm_w=norm_w, eps=1e-6), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="up to three"):
        gemv(x, [ws[0]] * 4)


@kernel_test
@pytest.mark.parametrize("B,Hq,Hkv,D,W,block_keys,merge_max,rope", [
    (2, 10, 2, 16, 130, 16, None, None), (1, 4, 4, 16, 40, 64, None, None), (2, 10, 2, 16, 130, 16, 0, None),
    (2, 10, 2, 16, 130, 16, None, "norm"), (1, 4, 4, 16, 40, 64, None, "plain"), (2, 10, 2, 16, 130, 16, 0, "norm")])
def test_ring_attention_out_proj_matches_reference(B, Hq, Hkv, D, W, block_keys, merge_max, rope, monkeypatch):
    """The ring step with the output projection merging the ranges' partials (9 ranges, some empty at early
    positions; or one), before and after the ring's first lap: output and written slots as the reference's. With
    more partials than the projection merges (a bound of 0 here), the ring kernel merges and ``gemv`` projects.
    With ``rope``, q, k are raw projections (views into one [B, (Hq + 2Hkv)·D] buffer, as ``gemv`` of the stacked
    projections leaves them) and the kernel applies the per-head norms ("norm") or only RoPE ("plain")."""
    from lit_hsa.kernels.decode import triton_ring
    from lit_hsa.kernels.decode.reference import HeadRope, norm_rope_reference

    if merge_max is not None:
        monkeypatch.setattr(triton_ring, "MERGE_IN_PROJECTION_MAX", merge_max)
    gen = torch.Generator().manual_seed(2)
    d = 24
    q, k, v = randn(B, 1, Hq + 2 * Hkv, D, gen=gen).split([Hq, Hkv, Hkv], dim=2)
    ck, cv = (randn(B, Hkv, W, D, gen=gen) for _ in range(2))
    w_out, residual = randn(d, Hq * D, gen=gen), randn(B, 1, d, gen=gen)
    head_rope, q_in, k_in = None, q, k
    if rope is not None:
        angle = torch.rand(1, D // 2, generator=gen).to(DEV) * 6
        qn, kn = ((torch.rand(D, generator=gen) + 0.5).to(DEV) if rope == "norm" else None for _ in range(2))
        head_rope = HeadRope(angle.cos(), angle.sin(), qn, kn, 1e-6)
        q_in, k_in = (norm_rope_reference(x, w, angle.cos(), angle.sin(), 1e-6) for x, w in ((q, qn), (k, kn)))
    for pos in (0, W // 2, W + 3):
        p = torch.tensor(pos, device=DEV)
        rings, ref_rings = (ck.clone(), cv.clone()), (ck.clone(), cv.clone())
        got = ring_attention_out_proj(q, k, v, *rings, p, w_out, residual, block_keys=block_keys, rope=head_rope)
        o = ring_attention_reference(q_in, k_in, v, *ref_rings, p)
        want = residual + o.reshape(B, 1, -1) @ w_out.T
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"pos {pos}: {m}")
        for g, w in zip(rings, ref_rings):
            torch.testing.assert_close(g, w)


@kernel_test
def test_rope_table_matches_rotary_at_large_positions():
    """RoPE's cos, sin of one position in one kernel, as ``Rotary.cos_sin``, up to 16M (angles of millions of
    radians, reduced before the cosine)."""
    from lit_hsa.kernels.decode.triton_block import rope_cos_sin
    from lit_hsa.model.attention import Rotary

    for dtype in (torch.float32, torch.bfloat16):  # a model cast to bf16 casts the frequencies too
        rotary = Rotary(64).to(DEV, dtype)
        for pos in (0, 5, 1_000_003, 16_777_215):
            got = rope_cos_sin(torch.tensor(pos, device=DEV), rotary.inv_freq)
            want = rotary.cos_sin(torch.tensor([pos], device=DEV))
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-6, rtol=0, msg=lambda m: f"pos {pos}, {dtype}: {m}")
    with pytest.raises(ValueError, match="inv_freq be a float"):
        rope_cos_sin(torch.tensor(0, device=DEV), torch.arange(4, device=DEV))


@kernel_test
def test_write_slot_writes_the_row_of_the_device_position():
    from lit_hsa.kernels.decode.triton_block import write_slot

    gen = torch.Generator().manual_seed(5)
    buf, x = randn(2, 8, 24, gen=gen), randn(2, 1, 24, gen=gen)
    for pos in (3, 8 * 5 + 7):
        want = buf.clone()
        want[:, pos % 8] = x[:, 0]
        write_slot(buf, x, torch.tensor(pos, device=DEV))
        torch.testing.assert_close(buf, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"must be \[2, 1, 24\]"):
        write_slot(buf, x[:, :, :5], torch.tensor(0, device=DEV))


def test_fused_ops_reject_what_they_do_not_cover():
    x, nw, (wq, wk, wv), (qn, kn), cos, sin = qkv_problem(1, 32, 2, 1, 8)
    with pytest.raises(ValueError, match=r"weights must be contiguous \[out, 32\]"):
        qkv_rope(x, nw, wq.T.contiguous().T, wk, wv, qn, kn, cos, sin, 1e-6)
    with pytest.raises(ValueError, match="both per-head norm weights or neither"):
        qkv_rope(x, nw, wq, wk, wv, qn, None, cos, sin, 1e-6)
    with pytest.raises(ValueError, match=r"residual \(1, 7\) must be \[1, 16\]"):
        gemv(x, wq, residual=torch.zeros(1, 7, device=DEV))
    q, k = torch.zeros(1, 1, 2, 16, device=DEV), torch.zeros(1, 1, 1, 16, device=DEV)
    ring = torch.zeros(1, 1, 8, 16, device=DEV)
    with pytest.raises(ValueError, match=r"w_out \(32, 16\) must be contiguous \[32, 32\]"):
        ring_attention_out_proj(q, k, k, ring, ring.clone(), torch.tensor(0), torch.zeros(32, 16),
                                torch.zeros(1, 1, 32))


def test_fusable_parts_are_the_plain_modules():
    """The kernels skip what they do not compute: a LoRA-adapted projection, a bias, a MoE feed-forward or norms
    with different epsilons leave that part of the block to its modules."""
    from lit_hsa.config import FinetuneConfig
    from lit_hsa.inference.fused_step import attention_fusable, ffn_fusable
    from lit_hsa.model.lora import apply_lora
    from lit_hsa.model.transformer import HSATransformer

    dense = HSATransformer(tiny(moe=False)).lower[0]
    assert attention_fusable(dense.attn_norm, dense.attn) and ffn_fusable(dense.ffn_norm, dense.ffn)
    moe = HSATransformer(tiny(moe=True, first_dense_layers=0)).lower[0]
    assert attention_fusable(moe.attn_norm, moe.attn) and not ffn_fusable(moe.ffn_norm, moe.ffn)
    dense.attn.q_norm.eps = 1e-5
    assert not attention_fusable(dense.attn_norm, dense.attn)
    adapted = HSATransformer(tiny(moe=False))
    apply_lora(adapted, FinetuneConfig(method="lora", lora_targets=["attention"]))
    block = adapted.lower[0]
    assert not attention_fusable(block.attn_norm, block.attn) and ffn_fusable(block.ffn_norm, block.ffn)


@kernel_test
@pytest.mark.parametrize("variant", ["hsa", "full"])
def test_static_decoding_with_fused_blocks_equals_full_forward(variant, monkeypatch):
    """With the Triton backend, GraphDecoder's dense blocks step through the fused kernels (each once per step), and
    the logits are the full forward's: across a chunk completion and the ring's wrap-around (hsa), and against a
    full-attention cache (attend, then ``gemv``). MoE feed-forwards (the tiny preset's) run their modules."""
    import lit_hsa.inference.fused_step as fused_step
    from lit_hsa.model.transformer import Block, HSATransformer

    calls = []
    original = fused_step.block_step
    monkeypatch.setattr(fused_step, "block_step", lambda *a: calls.append(a[0]) or original(*a))
    cfg = tiny(attention=variant, hsa_topk=3, head_dim=16, swa_window=4, first_dense_layers=2)
    model = HSATransformer(cfg).to(DEV).eval()
    x = torch.randint(0, VOCAB, (1, 21), device=DEV)
    outs, ref = static_decode_with_triton(model, x, 13)  # positions 13..20: chunk 1 completes at 15
    torch.testing.assert_close(outs, ref, atol=1e-4, rtol=1e-4)
    blocks = [b for b in model.blocks() if isinstance(b, Block)]  # HSA blocks of chunk size 8 run their modules
    assert len(calls) == 8 * len(blocks) and set(calls) == set(blocks)


@kernel_test
@pytest.mark.parametrize("variant", ["hsa", "full"])
def test_static_decoding_after_an_autocast_prefill(variant):
    """What ``experiment`` evaluates with: fp32 weights, prefill and steps under bf16 autocast. The prefill leaves
    bf16 caches while the fused blocks compute in the weights' dtype (Triton ignores autocast); the static caches
    take the steps' dtype, and the logits stay within 5% of the fp32 forward's (bf16 rounding of the prefill).
    Before, the first step failed to copy the bf16 ring into its fp32 cache."""
    from lit_hsa.inference.generate import prefill
    from lit_hsa.inference.static_decode import GraphDecoder
    from lit_hsa.model.transformer import HSATransformer

    # chunk size 8: the HSA blocks run their modules (no SWA sub-layer, so no bf16 ring kernel, which the
    # interpreter cannot run); every dense block steps through the fused fp32 kernels
    model = HSATransformer(tiny(attention=variant, hsa_topk=3, head_dim=16, swa_window=4, first_dense_layers=2))
    model = model.to(DEV).eval()
    x = torch.randint(0, VOCAB, (1, 21), device=DEV)
    with torch.no_grad():
        want = model(x)[:, 13:]
        with torch.autocast(DEV, dtype=torch.bfloat16):
            _, state = prefill(model, x[:, :13], segment_size=5)
            hsa.set_backend("triton")
            try:
                decoder = GraphDecoder(model, state, max_len=21)
                got = torch.stack([decoder.step(x[:, t]) for t in range(13, 21)], dim=1)
            finally:
                hsa.set_backend("auto")
    assert_close_to_scale(got, want, "logits")


def test_fused_blocks_only_where_the_backend_runs_triton():
    from lit_hsa.inference.generate import prefill
    from lit_hsa.inference.static_decode import GraphDecoder
    from lit_hsa.model.transformer import HSATransformer

    model = HSATransformer(tiny()).eval()
    x = torch.randint(0, VOCAB, (1, 9))
    for backend, fuse, expected in (("auto", True, False), ("triton", False, False), ("triton", True, True)):
        with torch.no_grad():
            _, state = prefill(model, x)
        hsa.set_backend(backend)
        try:
            assert GraphDecoder(model, state, max_len=12, fuse_blocks=fuse).state.kv.fuse_blocks == expected
        finally:
            hsa.set_backend("auto")


def test_pdl_only_on_cuda_and_when_enabled(monkeypatch):
    """Programmatic dependent launch is a CUDA launch option: CPU tensors (the interpreter) launch without it, and
    ``LIT_HSA_PDL=0`` (``ENABLED``) turns it off everywhere."""
    from lit_hsa.kernels.decode import pdl

    assert pdl.pdl_args(torch.zeros(1)) == {"PDL": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.use_pdl(torch.zeros(1, device=DEV))


@only_if_kernels_skipped
@pytest.mark.slow
def test_cpu_kernels_in_subprocess():
    run_module_in_subprocess(__file__)


@pytest.mark.gpu
@pytest.mark.parametrize("d,Hq,Hkv,D,ffn", [(640, 10, 2, 64, 2560), (2048, 16, 4, 128, 1536)])
def test_gpu_bf16_fused_ops_vs_fp32_reference(d, Hq, Hkv, D, ffn):
    """The `small` and `moe-8b-a1b` (shared-expert width) shapes in bf16; the autotuner picks each launch shape."""
    x, nw, (wq, wk, wv), (qn, kn), cos, sin = qkv_problem(1, d, Hq, Hkv, D, dtype=torch.bfloat16)
    got = qkv_rope(x, nw, wq, wk, wv, qn, kn, cos, sin, 1e-6)
    want = qkv_rope_reference(x, nw, wq, wk, wv, qn, kn, cos, sin, 1e-6)
    assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-2
    gen = torch.Generator().manual_seed(3)
    w_gate, w_up = (randn(ffn, d, dtype=torch.bfloat16, gen=gen) / d**0.5 for _ in range(2))
    w_down = randn(d, ffn, dtype=torch.bfloat16, gen=gen) / ffn**0.5
    act = gemv(x, w_gate, norm_w=nw, eps=1e-6, w_up=w_up)
    assert rel_err(act, gemv_reference(x, w_gate, norm_w=nw, eps=1e-6, w_up=w_up)) < 1e-2
    out = gemv(act, w_down, residual=x[:, 0])
    assert rel_err(out, gemv_reference(act, w_down, residual=x[:, 0])) < 1e-2
    q, k, v = got
    W = 512
    ck, cv = (randn(1, Hkv, W, D, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    w_o = randn(d, Hq * D, dtype=torch.bfloat16, gen=gen) / (Hq * D) ** 0.5
    pos = torch.tensor(3 * W + 7, device=DEV)
    fused = ring_attention_out_proj(q, k, v, ck.clone(), cv.clone(), pos, w_o, x)
    o = ring_attention_reference(q.float(), k.float(), v.float(), ck.float(), cv.float(), pos)
    assert rel_err(fused, x.float() + o.reshape(1, 1, -1) @ w_o.float().T) < 1e-2
