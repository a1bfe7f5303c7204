"""The PyTorch reference of HSA against brute-force loops written straight from spec §3–§4."""
import math

import pytest
import torch

from lit_hsa.kernels.hsa import hsa_attention, select_chunks


def brute_force_hsa(q, k, v, weights, indices, S, sm_scale=None, off_by_one=False):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1 / math.sqrt(D)
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(Hq):
                g = h // G
                for j in range(indices.shape[-1]):
                    c = int(indices[b, t, g, j])
                    if c < 0:
                        continue
                    kc = k[b, c * S : (c + 1) * S, g].double()
                    vc = v[b, c * S : (c + 1) * S, g].double()
                    e = (kc @ q[b, t, h].double() * scale).exp()
                    p = e / (e.sum() + (1.0 if off_by_one else 0.0))
                    out[b, t, h] += weights[b, t, g, j].double() * (p @ vc)
    return out


def brute_force_select(q_slc, lmk, topk, S, doc_ids=None):
    """Per token and head: scores of all visible chunks, sorted; returns the set of kept chunk ids."""
    B, T, H, Dr = q_slc.shape
    C = lmk.shape[1]
    kept = {}
    for b in range(B):
        for t in range(T):
            for h in range(H):
                same_doc = [doc_ids is None or doc_ids[b, i * S] == doc_ids[b, t] for i in range(C)]
                vis = [i for i in range(C) if t >= (i + 1) * S and same_doc[i]]
                s = {i: float(q_slc[b, t, h].double() @ lmk[b, i, h].double()) / math.sqrt(Dr) for i in vis}
                kept[b, t, h] = (sorted(s, key=lambda i: -s[i])[:topk], s)
    return kept


def random_indices(B, T, Hkv, K, n_chunks, S, empty_frac=0.25, generator=None):
    """Distinct visible chunk ids per (token, head), some slots empty (-1)."""
    idx = torch.full((B, T, Hkv, K), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            n_vis = min(t // S, n_chunks)
            for h in range(Hkv):
                if n_vis == 0:
                    continue
                perm = torch.randperm(n_vis, generator=generator)[:K]
                keep = torch.rand(len(perm), generator=generator) >= empty_frac
                perm = perm[keep]
                idx[b, t, h, : len(perm)] = perm
    return idx


def make_problem(B, T, Hq, Hkv, D, S, K, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    idx = random_indices(B, T, Hkv, K, T // S, S, generator=g)
    w = torch.rand(B, T, Hkv, K, generator=g, dtype=dtype)
    return q, k, v, w, idx


@pytest.mark.parametrize("off_by_one", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (16, 1)])
def test_hsa_matches_brute_force(Hq, Hkv, off_by_one):
    S, K = 4, 3
    q, k, v, w, idx = make_problem(2, 20, Hq, Hkv, 8, S, K)
    ref = brute_force_hsa(q, k, v, w, idx, S, off_by_one=off_by_one)
    out = hsa_attention(q, k, v, w, idx, chunk_size=S, off_by_one=off_by_one)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    # large scores: the row maximum, not the +1, sets the exponent shift
    ref = brute_force_hsa(q * 20, k, v, w, idx, S, off_by_one=off_by_one)
    torch.testing.assert_close(hsa_attention(q * 20, k, v, w, idx, chunk_size=S, off_by_one=off_by_one), ref,
                               atol=1e-10, rtol=1e-10)


def test_hsa_sm_scale_and_low_precision_dtype():
    S, K = 4, 2
    q, k, v, w, idx = make_problem(1, 16, 4, 1, 8, S, K, dtype=torch.float32)
    ref = brute_force_hsa(q, k, v, w, idx, S, sm_scale=0.3)
    out = hsa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), w, idx, chunk_size=S, sm_scale=0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("Hq,Hkv", [(1, 1), (2, 1), (4, 2)])
def test_hsa_gradcheck(Hq, Hkv):
    S, K = 4, 2
    q, k, v, w, idx = make_problem(1, 12, Hq, Hkv, 4, S, K)
    for t in (q, k, v, w):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, w: hsa_attention(q, k, v, w, idx, chunk_size=S), (q, k, v, w), eps=1e-6, atol=1e-6
    )


def test_empty_rows_give_zero_output_and_finite_grads():
    S, K = 4, 3
    q, k, v, w, _ = make_problem(1, 8, 4, 2, 8, S, K)
    idx = torch.full((1, 8, 2, K), -1, dtype=torch.long)
    idx[0, 5:, 0, 0] = 0  # only some rows have one chunk
    w = w.requires_grad_(True)
    q.requires_grad_(True)
    k.requires_grad_(True)
    out = hsa_attention(q, k, v, w, idx, chunk_size=S)
    assert torch.all(out[0, :5] == 0) and torch.all(out[0, :, 2:] == 0)  # heads 2-3 use KV head 1: all empty
    out.sum().backward()
    for t in (q, k, w):
        assert torch.isfinite(t.grad).all()
    assert torch.all(w.grad[idx < 0] == 0)  # empty slots get no gradient


def test_hsa_rejects_bad_shapes():
    q, k, v, w, idx = make_problem(1, 8, 3, 2, 4, 4, 2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        hsa_attention(q, k, v, w, idx, chunk_size=4)
    q, k, v, w, idx = make_problem(1, 8, 2, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        hsa_attention(q, k[:, :6], v[:, :6], w, idx, chunk_size=4)


def test_select_chunks_matches_brute_force_and_visibility():
    S, topk = 4, 3
    g = torch.Generator().manual_seed(1)
    q_slc = torch.randn(2, 26, 2, 5, generator=g, dtype=torch.float64)
    lmk = torch.randn(2, 6, 2, 5, generator=g, dtype=torch.float64)
    scores, idx = select_chunks(q_slc, lmk, topk, chunk_size=S, block_size=7)  # odd block size on purpose
    assert scores.shape == idx.shape == (2, 26, 2, topk)
    kept = brute_force_select(q_slc, lmk, topk, S)
    for (b, t, h), (chosen, s) in kept.items():
        got = [int(i) for i in idx[b, t, h] if i >= 0]
        assert set(got) == set(chosen), (b, t, h)
        assert got == sorted(got, reverse=True)  # most recent first
        for j, i in enumerate(got):
            assert abs(float(scores[b, t, h, j]) - s[i]) < 1e-10
            assert t >= (i + 1) * S  # causal visibility rule
        n_empty = topk - len(got)
        assert torch.all(idx[b, t, h, topk - n_empty :] == -1)
        assert torch.all(scores[b, t, h, topk - n_empty :] == float("-inf"))


def test_select_chunks_doc_masking_and_gradients():
    S, topk = 4, 4
    g = torch.Generator().manual_seed(2)
    q_slc = torch.randn(1, 24, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lmk = torch.randn(1, 6, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    doc_ids = torch.tensor([[0] * 8 + [1] * 16])  # second document starts at chunk 2
    scores, idx = select_chunks(q_slc, lmk, topk, chunk_size=S, doc_ids=doc_ids)
    kept = brute_force_select(q_slc.detach(), lmk.detach(), topk, S, doc_ids)
    for (b, t, h), (chosen, _) in kept.items():
        assert {int(i) for i in idx[b, t, h] if i >= 0} == set(chosen)
    assert torch.all(idx[0, 8:12] == -1)  # first chunk of document 1 cannot see document 0
    # gradients of the kept scores: finite differences in float64 (the choice does not move under tiny steps)
    def kept_scores(q, l):
        out, _ = select_chunks(q, l, topk, chunk_size=S, doc_ids=doc_ids)
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))

    assert torch.autograd.gradcheck(kept_scores, (q_slc, lmk), eps=1e-6, atol=1e-6)


def test_select_chunks_gumbel_noise_changes_choice_not_scores():
    S, topk = 2, 2
    q_slc = torch.randn(1, 64, 1, 4, dtype=torch.float64)
    lmk = torch.randn(1, 32, 1, 4, dtype=torch.float64)
    clean_s, clean_i = select_chunks(q_slc, lmk, topk, chunk_size=S)
    torch.manual_seed(3)
    noisy_s, noisy_i = select_chunks(q_slc, lmk, topk, chunk_size=S, gumbel_noise=True)
    assert not torch.equal(noisy_i, clean_i)
    # Returned scores are the clean dot products of whatever was chosen.
    lmk_sel = lmk[0, noisy_i[0, :, 0].clamp(min=0), 0]  # [T, K, Dr]
    expect = (q_slc[0, :, 0, None, :] * lmk_sel).sum(-1) / 2.0
    ok = noisy_i[0, :, 0] >= 0
    torch.testing.assert_close(noisy_s[0, :, 0][ok], expect[ok])


@pytest.mark.parametrize("C,group", [(5000, 16), (300, 16), (40, 16), (100_000, 256)])
def test_staged_topk_keeps_the_same_entries_as_topk(C, group):
    """Few rows of many entries take the staged path (C=5000 with groups of 16 runs three stages, C=300 one); the kept
    values equal ``topk``'s and the indices point at them, also where -inf entries (invisible chunks) abound."""
    from lit_hsa.kernels.hsa.reference import topk_last_dim

    g = torch.Generator().manual_seed(C)
    s = torch.randn(2, 1, 3, C, generator=g)
    s[..., torch.rand(C, generator=g) < 0.5] = float("-inf")
    s[1, 0, 0, :3], s[1, 0, 0, 3:] = 1.0, float("-inf")  # a row with fewer finite entries than k
    k = 4
    values, idx = topk_last_dim(s, k, group)
    want, _ = s.topk(k, dim=-1)
    torch.testing.assert_close(values.sort(-1, descending=True).values, want)
    assert idx.min() >= 0 and idx.max() < C
    finite = torch.isfinite(values)
    torch.testing.assert_close(s.gather(-1, idx)[finite], values[finite])
    assert torch.equal(idx[1, 0, 0, :3].sort().values, torch.arange(3))  # the three finite entries
