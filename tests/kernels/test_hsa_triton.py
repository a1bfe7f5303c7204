"""Triton HSA kernels and the fast ``select_chunks`` against the PyTorch reference.

CPU: the Triton kernels run under ``TRITON_INTERPRET=1`` (``tests/triton_interpret.py`` sets it before the kernel
module is imported, because ``triton.jit`` picks compiled or interpreted at decoration time) at tiny fp32 shapes;
tolerance atol 1e-4 / rtol 1e-4 on the output and on every gradient. With a GPU the same tests run the compiled
kernels on CUDA, and the ``gpu``-marked tests compare bf16/fp16 kernels with the fp32 reference at realistic shapes
by relative error.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.triton_interpret import kernel_test, only_if_kernels_skipped, run_module_in_subprocess

pytest.importorskip("triton")

import lit_hsa.kernels.hsa as hsa  # noqa: E402
from lit_hsa.kernels.hsa import hsa_attention_reference, select_chunks_reference  # noqa: E402
from lit_hsa.kernels.hsa.triton_attention import CONFIG, build_plan, hsa_attention_triton  # noqa: E402
from lit_hsa.kernels.hsa.triton_select import select_chunks_fast  # noqa: E402
from tests.helpers import ROOT, rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_indices(B, T, Hkv, K, n_chunks, S, q_start=0, empty_frac=0.25, gen=None, device="cpu"):
    """Distinct visible chunks per (token, KV head), most recent first, some slots empty (-1)."""
    t = torch.arange(T) + q_start
    n_vis = torch.clamp(t // S, max=n_chunks)  # [T]
    keys = torch.rand(B, T, Hkv, n_chunks, generator=gen)
    keys = keys.masked_fill(torch.arange(n_chunks) >= n_vis[None, :, None, None], -1.0)
    kk = min(K, n_chunks)
    top, idx = keys.topk(kk, dim=-1) if kk else (keys[..., :0], keys[..., :0].long())
    drop = torch.rand(top.shape, generator=gen) < empty_frac
    idx = idx.masked_fill((top < 0) | drop, -1)
    idx = torch.nn.functional.pad(idx, (0, K - kk), value=-1)
    return idx.sort(dim=-1, descending=True).values.to(device)


def make_problem(B, T, Hq, Hkv, D, S, K, Tk=None, dtype=torch.float32, device=DEV, seed=0):
    Tk = T if Tk is None else Tk
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=gen).to(device, dtype)
    k = torch.randn(B, Tk, Hkv, D, generator=gen).to(device, dtype)
    v = torch.randn(B, Tk, Hkv, D, generator=gen).to(device, dtype)
    w = torch.rand(B, T, Hkv, K, generator=gen).to(device, dtype)
    # Queries sit at the end of the memory when it is longer (decoding); otherwise token t sees chunks < t // S.
    idx = random_indices(B, T, Hkv, K, Tk // S, S, q_start=Tk - T, gen=gen, device=device)
    return q, k, v, w, idx


def run_both(q, k, v, w, idx, S, sm_scale=None, seed=1, strategy="auto", off_by_one=False):
    """(out, grads) of the Triton kernel (with the given strategy) and of the reference for the same upstream
    gradient."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, w)]
    ref_leaves = [x.detach().float().clone().requires_grad_(True) for x in (q, k, v, w)]
    saved = CONFIG["strategy"]
    CONFIG["strategy"] = strategy
    try:
        out = hsa_attention_triton(*leaves, idx, chunk_size=S, sm_scale=sm_scale, off_by_one=off_by_one)
    finally:
        CONFIG["strategy"] = saved
    ref = hsa_attention_reference(*ref_leaves, idx, chunk_size=S, sm_scale=sm_scale, off_by_one=off_by_one)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(ref.shape, generator=gen).to(q.device)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, do)
    return out, grads, ref, ref_grads


def assert_all_close(out, grads, ref, ref_grads, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    for name, g, rg in zip("qkvw", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float(), rg, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


# ---------------------------------------------------------------- fp32 vs reference (CPU interpreter or CUDA)


STRATEGIES = pytest.mark.parametrize("strategy", ["chunk", "query"])


@kernel_test
@STRATEGIES
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (4, 1), (16, 1), (6, 2)])
def test_forward_and_grads_match_reference_head_ratios(Hq, Hkv, strategy):
    q, k, v, w, idx = make_problem(2, 64, Hq, Hkv, 16, 16, 3)
    assert_all_close(*run_both(q, k, v, w, idx, 16, strategy=strategy))


@kernel_test
@STRATEGIES
def test_memory_longer_than_queries_and_decoding(strategy):
    # Tk != T: 48 queries placed at the end of a 96-token memory (they may read any of its first chunks).
    q, k, v, w, idx = make_problem(1, 48, 4, 2, 32, 16, 4, Tk=96)
    assert_all_close(*run_both(q, k, v, w, idx, 16, strategy=strategy))
    # Decoding: one query against a longer memory, every chunk selectable.
    q, k, v, w, idx = make_problem(2, 1, 8, 2, 16, 16, 5, Tk=128)
    assert_all_close(*run_both(q, k, v, w, idx, 16, sm_scale=0.3, strategy=strategy))


@kernel_test
@STRATEGIES
def test_all_empty_rows_duplicates_and_many_heads(strategy):
    q, k, v, w, idx = make_problem(1, 48, 128, 1, 16, 16, 4)  # G=128 > one tile's rows: heads split in blocks
    idx[0, 40] = -1  # a row with every slot empty gives exactly 0
    idx[0, 41, 0, 1] = idx[0, 41, 0, 0]  # a chunk picked twice counts twice, as in the reference
    out, grads, ref, ref_grads = run_both(q, k, v, w, idx, 16, strategy=strategy)
    assert_all_close(out, grads, ref, ref_grads)
    assert (out[0, 40] == 0).all()
    assert (grads[3][0, 40] == 0).all()


@kernel_test
@STRATEGIES
def test_large_topk_and_long_chunks(strategy):
    # top-k 20 of up to 7 visible chunks (most slots empty) with chunk size 32.
    q, k, v, w, idx = make_problem(1, 256, 4, 4, 16, 32, 20)
    assert_all_close(*run_both(q, k, v, w, idx, 32, strategy=strategy))


@kernel_test
@STRATEGIES
@pytest.mark.parametrize("score_scale", [1.0, 8.0])
def test_softmax_off_by_one_matches_reference(strategy, score_scale):
    """The per-chunk softmax with +1 in its denominator (spec §2 option): small scores (the +1 dominates) and large
    ones (the row maximum does, so the kernel must not overflow or lose the +1's exponent shift)."""
    q, k, v, w, idx = make_problem(2, 64, 4, 2, 16, 16, 3, seed=3)
    assert_all_close(*run_both(q * score_scale, k, v, w, idx, 16, strategy=strategy, off_by_one=True))
    plain = run_both(q, k, v, w, idx, 16, strategy=strategy)[0]
    shifted = run_both(q, k, v, w, idx, 16, strategy=strategy, off_by_one=True)[0]
    assert not torch.allclose(plain, shifted, atol=1e-3)  # the option changes the result


@kernel_test
def test_auto_strategy_follows_index_sharing():
    # Neighbouring tokens with identical chunk sets → query-major; unrelated sets → chunk-major. Both exact.
    q, k, v, w, idx = make_problem(1, 256, 4, 1, 16, 16, 4, seed=5)
    # each group of 64 tokens takes the chunk set of its first token (visible to all of them)
    shared = idx.view(1, 4, 64, 1, 4)[:, :, :1].expand(1, 4, 64, 1, 4).reshape(idx.shape).contiguous()
    plan_shared, plan_random = build_plan(shared, 16), build_plan(idx, 16)
    assert plan_shared.expansion(64) == 1.0 and plan_random.expansion(64) > 2.0
    for ix in (shared, idx):
        assert_all_close(*run_both(q, k, v, w, ix, 16, strategy="auto"))


@pytest.mark.parametrize("n_slab", [1, 3])
def test_plan_groups_every_valid_pair_once(n_slab):
    _, _, _, _, idx = make_problem(2, 64, 4, 2, 16, 16, 3)
    B, T, Hkv, K = idx.shape
    plan = build_plan(idx, 4)
    items = plan.items(5, n_slab).long().cpu()
    perm = plan.perm(n_slab).long().cpu()
    ranks = plan.ranks(n_slab).long().cpu().reshape(-1)
    flat = idx.reshape(-1).cpu()
    slab_tokens = plan.slab_tokens(n_slab)
    seen = []
    for s, (start, count, bucket, part) in enumerate(items):
        # padding (the list's length is a bound known on the host) comes last, with no pairs
        n_real = int((count > 0).sum())
        assert torch.all(count[n_real:] == 0)
        assert count[:n_real].max() <= 5 and count[:n_real].min() >= 1
        first = []
        for st, n, bk, pt in zip(*(x[:n_real].tolist() for x in (start, count, bucket, part))):
            p = perm[st : st + n]
            b, t, g = p // (T * Hkv * K), (p // (Hkv * K)) % T, (p // K) % Hkv
            assert torch.all((b * Hkv + g) * 4 + flat[p] == bk)  # the item's pairs belong to its bucket
            assert torch.all(t // slab_tokens == s)  # ... and to its slab
            assert torch.equal(ranks[p], torch.arange(pt, pt + n))  # where their parts go in the slab's buffer
            first.append(int(b[0] * T + t[0]))
            seen.append(p)
        assert first == sorted(first)  # launched in the order of the first token they touch
    assert torch.equal(torch.cat(seen).sort().values, torch.nonzero(flat >= 0).squeeze(1))


@kernel_test
@pytest.mark.parametrize("budget", [1e-6, 0.5])
def test_chunk_major_in_token_slabs(budget):
    """A partial-buffer budget below the whole sequence's parts cuts the chunk-major passes into slabs (here the
    256 MiB floor is lowered too); every slab count gives the reference's output and gradients."""
    from lit_hsa.kernels.hsa import triton_attention as ta

    q, k, v, w, idx = make_problem(2, 96, 8, 2, 16, 16, 4)
    saved = ta.CONFIG["partial_budget"], ta._MIN_PARTIAL_BYTES
    ta.CONFIG["partial_budget"], ta._MIN_PARTIAL_BYTES = budget, 0
    try:
        n_slab = ta._n_slabs(build_plan(idx, 6), 4, 16, torch.float32)
        assert n_slab == (96 if budget < 1e-3 else 8)  # one token per slab; 8 slabs of 12 tokens
        assert_all_close(*run_both(q, k, v, w, idx, 16, strategy="chunk"))
    finally:
        ta.CONFIG["partial_budget"], ta._MIN_PARTIAL_BYTES = saved


@kernel_test
def test_dispatch_uses_triton_when_asked():
    q, k, v, w, idx = make_problem(1, 32, 4, 2, 16, 16, 2)
    hsa.set_backend("triton")
    try:
        out = hsa.hsa_attention(q, k, v, w, idx, chunk_size=16)
        assert hsa.hsa_attention_triton is hsa_attention_triton
    finally:
        hsa.set_backend("auto")
    torch.testing.assert_close(out, hsa_attention_reference(q, k, v, w, idx, chunk_size=16), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        hsa_attention_triton(q, k[:, :20], v[:, :20], w, idx, chunk_size=16)


@only_if_kernels_skipped
@pytest.mark.slow
def test_cpu_kernels_in_subprocess():
    run_module_in_subprocess(__file__)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter runs kernels as Python; compiling them for an H100 also checks what only the compiler sees."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ROOT / "tests" / "_compile_kernels_sm90.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("sm_90 ok") == 18  # every entry of the script's KERNELS list


# ---------------------------------------------------------------- select_chunks fast path (plain torch on CPU)


@pytest.mark.parametrize("doc,q_start,block", [(False, 0, 64), (True, 0, 48), (False, 40, None)])
def test_select_chunks_fast_matches_reference(doc, q_start, block):
    gen = torch.Generator().manual_seed(3)
    B, T, H, Dr, S, K = 2, 256, 2, 8, 4, 6
    q = torch.randn(B, T, H, Dr, generator=gen).requires_grad_(True)
    lmk = torch.randn(B, (T + q_start) // S, H, Dr, generator=gen).requires_grad_(True)
    doc_ids = None
    if doc:
        doc_ids = torch.zeros(B, T, dtype=torch.long)
        doc_ids[:, 100:] = 1
        doc_ids[1, 180:] = 2
    s1, i1 = select_chunks_fast(q, lmk, K, S, doc_ids, q_start=q_start, block_size=block)
    s2, i2 = select_chunks_reference(q, lmk, K, S, doc_ids, q_start=q_start)
    assert torch.equal(i1, i2)
    assert torch.equal(torch.isinf(s1), torch.isinf(s2)) and torch.equal(i1 < 0, torch.isinf(s1))
    fin = torch.isfinite(s2)
    torch.testing.assert_close(s1[fin], s2[fin], atol=1e-5, rtol=1e-5)
    up = torch.randn(s1.shape, generator=gen).masked_fill(~fin, 0.0)
    g1 = torch.autograd.grad(s1.masked_fill(~fin, 0.0), (q, lmk), up)
    g2 = torch.autograd.grad(s2.masked_fill(~fin, 0.0), (q, lmk), up)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_select_chunks_fast_gumbel_and_topk_beyond_chunks():
    q = torch.randn(1, 128, 1, 8)
    lmk = torch.randn(1, 32, 1, 8)
    s, i = select_chunks_fast(q, lmk, 40, 4, gumbel_noise=True)
    assert i.shape == (1, 128, 1, 40)
    t = torch.arange(128)[None, :, None, None]
    valid = i >= 0
    assert torch.all((t >= (i + 1) * 4) | ~valid)  # only visible chunks
    assert torch.equal(valid.sum(-1), torch.clamp(t[..., 0] // 4, max=32))  # all visible kept (40 > visible)
    assert torch.all(i[..., :-1] >= i[..., 1:])  # most recent first
    # clean scores: equal to the plain dot products whatever the noise did
    sel = lmk[0, i.clamp(min=0)[0, :, 0], 0]  # [T, 40, Dr]
    ref = ((q[0, :, 0, None, :] * sel).sum(-1) / math.sqrt(8))[None, :, None]
    torch.testing.assert_close(s[valid], ref[valid], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU: low precision at realistic shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "T,Hq,Hkv,D,K",
    [(1024, 16, 1, 128, 8), (1024, 16, 4, 128, 8), (512, 16, 16, 64, 8), (1024, 16, 1, 64, 64), (256, 16, 4, 128, 64)],
)
def test_gpu_low_precision_vs_fp32_reference(dtype, T, Hq, Hkv, D, K):
    q, k, v, w, idx = make_problem(2, T, Hq, Hkv, D, 64, K, dtype=dtype, device="cuda", seed=T + K)
    w = torch.softmax(w.float().masked_fill(idx < 0, -1e9), -1).to(dtype)
    out, grads, ref, ref_grads = run_both(q, k, v, w, idx, 64)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert rel_err(out, ref) < tol
    for name, g, rg in zip("qkvw", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, rg) < tol, name


@pytest.mark.gpu
def test_gpu_fp32_exact_and_dispatch():
    q, k, v, w, idx = make_problem(1, 512, 8, 2, 128, 64, 8, device="cuda")
    assert_all_close(*run_both(q, k, v, w, idx, 64), atol=2e-4, rtol=2e-4)
    out = hsa.hsa_attention(q, k, v, w, idx)  # auto backend on CUDA = Triton
    torch.testing.assert_close(out, hsa_attention_reference(q, k, v, w, idx), atol=2e-4, rtol=2e-4)


def _binaries(kernel) -> int:
    """How many binaries Triton compiled for ``kernel`` on the current GPU (its per-device cache)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps its kernel cache elsewhere")
    return len(caches[torch.cuda.current_device()][0])


@pytest.mark.gpu
def test_gpu_chunk_major_kernels_compile_once_whatever_the_work_list_size():
    """The work list's real length changes with the indices at every call; a length that is a multiple of 16 must
    not compile the kernels again (it did, seconds into training runs, until ``do_not_specialize``; the list is now
    padded to a bound that depends on shapes only, too)."""
    from lit_hsa.kernels.hsa import triton_attention as ta

    S, T = 64, 64 + 2048
    q, k, v, w, _ = make_problem(1, T, 16, 1, 64, S, 1, dtype=torch.bfloat16, device="cuda")
    counts = []
    for n_valid in (2048, 1700):  # 128 / 16 forward / backward items, then 107 / 14
        idx = torch.full((1, T, 1, 1), -1, dtype=torch.long, device="cuda")
        idx[0, S : S + n_valid] = 0  # every valid pair in chunk 0's bucket
        plan = build_plan(idx, T // S)
        CONFIG["strategy"] = "chunk"
        try:
            out = hsa_attention_triton(*(x.requires_grad_(True) for x in (q, k, v, w)), idx, S, plan=plan)
            out.sum().backward()
        finally:
            CONFIG["strategy"] = "auto"
        torch.cuda.synchronize()
        seg = ta._tiles(CONFIG["fwd"], 16)[3]
        assert int((plan.items(seg)[0, 1] > 0).sum()) == -(-n_valid // seg)
        counts.append((_binaries(ta._hsa_fwd_kernel), _binaries(ta._hsa_bwd_kernel)))
    assert counts[1] == counts[0]


@pytest.mark.gpu
def test_gpu_graphed_plans_equal_eager_ones_for_every_call():
    """Plans are built by replaying a CUDA graph captured once per shape: each call must see its own indices."""
    from lit_hsa.kernels.hsa import triton_attention as ta

    plans = []
    for seed in (0, 1, 0):
        idx = make_problem(2, 512, 4, 2, 16, 64, 8, device="cuda", seed=seed)[4]
        graphed, eager = build_plan(idx, 8), build_plan(idx, 8)
        ta.CONFIG["graph_plans"] = False
        try:
            want = eager.chunk_work(3, (4, 16)) + eager.union(4)[:2]
        finally:
            ta.CONFIG["graph_plans"] = True
        got = graphed.chunk_work(3, (4, 16)) + graphed.union(4)[:2]
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert graphed.expansion(4) == eager.expansion(4)
        plans.append(got)
    assert not torch.equal(plans[0][0], plans[1][0]) and torch.equal(plans[0][0], plans[2][0])


@pytest.mark.gpu
@pytest.mark.parametrize("H,K,dtype", [(1, 8, torch.bfloat16), (2, 64, torch.float32)])
def test_gpu_select_chunks_vs_reference(H, K, dtype):
    B, T, Dr, S = 1, 8192, 128, 64
    q = torch.randn(B, T, H, Dr, device="cuda", dtype=dtype, requires_grad=True)
    lmk = torch.randn(B, T // S, H, Dr, device="cuda", dtype=dtype, requires_grad=True)
    s1, i1 = hsa.select_chunks(q, lmk, K, S)
    # fp32 reference: the same choice (the reference scores in fp32 anyway) and gradients accumulated in fp32
    # (the reference in bf16 scatters thousands of landmark-gradient terms in bf16, far less accurate).
    q32, lmk32 = (x.detach().float().requires_grad_(True) for x in (q, lmk))
    s2, i2 = select_chunks_reference(q32, lmk32, K, S)
    # Both score in fp32 but through differently shaped matrix products: near-ties may swap, nothing else.
    mismatch = (i1 != i2).any(-1)
    assert mismatch.float().mean().item() < 1e-3
    fin = torch.isfinite(s2)
    assert torch.equal(fin, torch.isfinite(s1))
    same = ~mismatch[..., None].expand_as(fin) & fin
    assert rel_err(s1[same], s2[same]) < 1e-2
    up = torch.randn_like(s1).masked_fill(~fin, 0)
    g1 = torch.autograd.grad(s1.masked_fill(~fin, 0), (q, lmk), up)
    g2 = torch.autograd.grad(s2.masked_fill(~fin, 0), (q32, lmk32), up.float())
    if not mismatch.any():
        for a, b in zip(g1, g2):
            assert rel_err(a, b) < 1e-2


def test_decoding_sized_calls_take_the_gather_first_reference(monkeypatch):
    """Under ``auto`` a decoding step (a few (token, slot) pairs) skips the kernel's work-list building; the
    reference it uses gathers only the selected chunks, so it never converts the whole memory."""
    import lit_hsa.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "use_fast_paths", lambda t: True)  # as on CUDA
    called = []
    monkeypatch.setattr(hsa, "hsa_attention_reference", lambda *a, **kw: called.append("reference"))
    import lit_hsa.kernels.hsa.triton_attention as ta

    monkeypatch.setattr(ta, "hsa_attention_triton", lambda *a, **kw: called.append("triton"))
    q, k, v, w, idx = make_problem(1, 4, 8, 2, 16, 16, 8, Tk=256, device="cpu")  # 4 tokens × 2 heads × 8 slots
    hsa.hsa_attention(q, k, v, w, idx, chunk_size=16)
    q, k, v, w, idx = make_problem(1, 64, 8, 2, 16, 16, 8, Tk=256, device="cpu")  # 1024 pairs: a prefill
    hsa.hsa_attention(q, k, v, w, idx, chunk_size=16)
    assert called == ["reference", "triton"]
    hsa.set_backend("triton")  # asked for explicitly: the kernel whatever the size
    try:
        q, k, v, w, idx = make_problem(1, 4, 8, 2, 16, 16, 8, Tk=256, device="cpu")
        hsa.hsa_attention(q, k, v, w, idx, chunk_size=16)
    finally:
        hsa.set_backend("auto")
    assert called[-1] == "triton"
