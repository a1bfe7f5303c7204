"""An HSA layer's decoding step in Triton (``kernels/decode/triton_hsa.py``) against the PyTorch definitions.

CPU: the kernels run under the Triton interpreter in fp32 (selected chunks exactly, weights and outputs to 1e-5), and
static decoding with fused HSA blocks gives the full forward's logits (1e-4). GPU (``gpu``): the `small` preset's
shapes at 1M cached tokens in bf16 against the fp32 references.
"""
import math

import pytest
import torch

from tests.triton_interpret import kernel_test, only_if_kernels_skipped, run_module_in_subprocess

pytest.importorskip("triton")

from lit_hsa.kernels.decode.triton_hsa import hsa_chunks_decode, select_chunks_decode  # noqa: E402
from lit_hsa.kernels.hsa import fusion_weights  # noqa: E402
from lit_hsa.kernels.hsa.reference import hsa_attention_reference, select_chunks_reference  # noqa: E402
from tests.helpers import VARIANTS, VOCAB, rel_err, static_decode_with_triton, tiny  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEV, dtype)


def reference_selection(q_raw, q_norm_w, eps, landmarks, pos, topk, S, fusion, decay):
    """select_chunks_reference + fusion_weights, as ``Retrieval.forward`` computes them for one token."""
    B, C, Hr, Dr = landmarks.shape
    q = q_raw.float().view(B, 1, Hr, Dr)
    if q_norm_w is not None:
        q = torch.nn.functional.rms_norm(q, (Dr,), q_norm_w.float(), eps)
    scores, idx = select_chunks_reference(q, landmarks.float(), min(topk, C), S, q_start=torch.tensor(pos, device=DEV))
    if decay is not None:
        scores = scores + decay.float() * torch.arange(scores.shape[-1], device=DEV)
    return idx[:, 0], fusion_weights(scores, fusion)[:, 0]


@kernel_test
@pytest.mark.parametrize("B,Hr,Dr,C,pos,topk,fusion,q_norm,decay", [
    (2, 1, 48, 40, 33 * 16 + 5, 5, "softmax", False, False),  # Dr not a power of two; 33 of 40 chunks visible
    (1, 2, 32, 300, 290 * 16, 6, "stick_breaking", True, True),  # 19 ranges of 16 chunks → 114 candidates
    (1, 1, 16, 40, 2 * 16 + 15, 5, "softmax", False, True),  # 2 visible chunks: slots 2..4 empty
    (1, 1, 16, 3, 3 * 16, 8, "stick_breaking", False, False),  # fewer chunks than top-k: K = 3
])
def test_select_chunks_decode_matches_reference(B, Hr, Dr, C, pos, topk, fusion, q_norm, decay):
    check_selection(B, Hr, Dr, C, pos, topk, fusion, q_norm, decay)


@kernel_test
@pytest.mark.parametrize("blocks", [False, True])
def test_select_chunks_decode_cuts_many_candidates_by_bisection(blocks, monkeypatch):
    """More candidates at or above the ranges' bound than the selection ranks at once (8 here): the best chunks all
    in the first range (8 chunks), so the 8th best range maximum is low and ~15 candidates pass it. The exact K-th
    score is then found by bisection first. ``blocks``: as for memories of millions of tokens, more ranges (75) than
    the selection ranks (16 here: their bound comes from bisection too) and candidates read 64 at a time."""
    import lit_hsa.kernels.decode.triton_hsa as triton_hsa

    monkeypatch.setattr(triton_hsa, "KEPT", 8)
    if blocks:
        monkeypatch.setattr(triton_hsa, "RANK_MAX", 16)
        monkeypatch.setattr(triton_hsa, "BISECT_MAX", 32)  # 75 ranges: re-read in blocks of 32
        monkeypatch.setattr(triton_hsa, "CAND_BLOCK", 64)
    check_selection(1, 1, 32, 600, 600 * 16, 8, "softmax", False, False, boost_first=8)


@kernel_test
def test_select_chunks_decode_bounds_many_ranges_by_bisection(monkeypatch):
    """More ranges (38) than the selection ranks (16 here): the ranges' bound by bisection over their maxima in
    registers, candidates read 64 at a time, survivors ranked (no cut)."""
    import lit_hsa.kernels.decode.triton_hsa as triton_hsa

    monkeypatch.setattr(triton_hsa, "RANK_MAX", 16)
    monkeypatch.setattr(triton_hsa, "CAND_BLOCK", 64)
    check_selection(1, 2, 32, 300, 290 * 16, 6, "stick_breaking", True, True)


def check_selection(B, Hr, Dr, C, pos, topk, fusion, q_norm, decay, boost_first=0):
    gen = torch.Generator().manual_seed(0)
    S = 16
    q = randn(B, Hr * Dr, gen=gen)
    landmarks = randn(B, C, Hr, Dr, gen=gen)
    landmarks[:, :boost_first] += 3 * q.view(B, 1, Hr, Dr)
    q_norm_w = randn(Dr, gen=gen) if q_norm else None
    decay_t = torch.tensor(-0.3, device=DEV) if decay else None
    p = torch.tensor(pos, device=DEV)
    _, idx, w = select_chunks_decode(q, q_norm_w, 1e-6, landmarks, p, topk, S, fusion, decay_t)
    want_idx, want_w = reference_selection(q, q_norm_w, 1e-6, landmarks, pos, topk, S, fusion, decay_t)
    assert idx.shape == want_idx.shape == (B, Hr, min(topk, C))
    assert torch.equal(idx.long(), want_idx)
    torch.testing.assert_close(w, want_w, atol=1e-5, rtol=1e-5)


@kernel_test
@pytest.mark.parametrize("Hq,Hkv,Hr,slots", [(4, 2, 2, 2), (6, 2, 1, 4), (2, 1, 1, 1)])
def test_hsa_chunks_decode_matches_reference(Hq, Hkv, Hr, slots):
    """Selections per KV head or shared (Hr=1), an empty slot, groups of 1-4 slots (the last one partly past K);
    the partial outputs' sum is the reference attention with the query's per-head RMSNorm."""
    gen = torch.Generator().manual_seed(1)
    B, D, S, C, K = 2, 16, 16, 9, 5
    q = randn(B, Hq * D, gen=gen)
    q_norm_w = randn(D, gen=gen)
    k, v = randn(B, C * S, Hkv, D, gen=gen), randn(B, C * S, Hkv, D, gen=gen)
    indices = torch.stack([torch.randperm(C, generator=gen)[:K] for _ in range(B * Hr)]).view(B, Hr, K).to(DEV)
    indices[0, 0, -1] = -1
    weights = torch.rand(B, Hr, K, generator=gen).to(DEV).masked_fill(indices < 0, 0.0)
    parts = hsa_chunks_decode(q, q_norm_w, 1e-6, k, v, indices.int(), weights, S, slots=slots)
    assert parts.shape == (B, math.ceil(K / slots), Hq * D)
    qn = torch.nn.functional.rms_norm(q.view(B, 1, Hq, D), (D,), q_norm_w, 1e-6)
    expand = lambda x: x.repeat_interleave(Hkv // Hr, dim=1).unsqueeze(1)  # noqa: E731  [B, 1, Hkv, K]
    want = hsa_attention_reference(qn, k, v, expand(weights), expand(indices), S)
    torch.testing.assert_close(parts.sum(1), want.reshape(B, -1), atol=1e-5, rtol=1e-5)


def test_hsa_kernels_reject_what_they_do_not_cover():
    gen = torch.Generator().manual_seed(2)
    landmarks = randn(1, 4, 1, 16, gen=gen)
    with pytest.raises(ValueError, match=r"must hold Hr·Dr = 16 values"):
        select_chunks_decode(randn(1, 8, gen=gen), None, 1e-6, landmarks, torch.tensor(64), 2, 16)
    with pytest.raises(ValueError, match="fusion must be one of"):
        select_chunks_decode(randn(1, 16, gen=gen), None, 1e-6, landmarks, torch.tensor(64), 2, 16, "max")
    k = randn(1, 4 * 12, 1, 16, gen=gen)
    sel, w = torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="chunk size 12 and slots 2 must be powers of two"):
        hsa_chunks_decode(randn(1, 32, gen=gen), None, 1e-6, k, k, sel, w, 12)


@kernel_test
@pytest.mark.parametrize("variant", ["hsa", "hsa-standard-stick-swa"])
def test_static_decoding_with_fused_hsa_blocks_equals_full_forward(variant, monkeypatch):
    """With the Triton backend, every block (dense and HSA) steps through the fused kernels, HSA blocks through the
    chunk selection and attention kernels, and the logits are the full forward's, across a chunk completion: the
    plain HSA block (bypass residual, softmax fusion), and one with an SWA sub-layer, the standard residual,
    stick-breaking fusion, the recency term, a selection shared by two KV heads and an output gate."""
    import lit_hsa.inference.fused_step as fused_step
    from lit_hsa.model.hsa import HSABlock
    from lit_hsa.model.transformer import HSATransformer

    calls = []
    original = fused_step.hsa_attention_step
    monkeypatch.setattr(fused_step, "hsa_attention_step", lambda block, *a: calls.append(block) or original(block, *a))
    cfg = tiny(**VARIANTS[variant], moe=False, chunk_size=16, head_dim=16, hsa_topk=2)
    model = HSATransformer(cfg).to(DEV).eval()
    with torch.no_grad():  # non-zero recency term, a gate away from 1
        for block in model.hsa_blocks():
            if block.retrieval.pos_decay is not None:
                block.retrieval.pos_decay.fill_(-0.5)
            if block.gate is not None:
                block.gate.fill_(0.7)
    x = torch.randint(0, VOCAB, (1, 68), device=DEV)
    outs, ref = static_decode_with_triton(model, x, 61)  # positions 61..67: chunk 3 completes at 63
    torch.testing.assert_close(outs, ref, atol=1e-4, rtol=1e-4)
    hsa_blocks = [b for b in model.blocks() if isinstance(b, HSABlock)]
    assert len(calls) == 7 * len(hsa_blocks) and set(calls) == set(hsa_blocks)


def test_hsa_blocks_fuse_only_memories_the_kernels_cover(monkeypatch):
    """Past ``MAX_DECODE_CHUNKS`` chunks (8M tokens at S=64 by default; 2 here) an HSA block of a compiled step runs its
    modules (uncompiled steps keep the kernels); so does one whose memory is offloaded to the host or whose chunk
    size is not a power of two of at least 16."""
    import lit_hsa.kernels.dispatch as dispatch
    from lit_hsa.inference.decode import OffloadedMemory
    from lit_hsa.inference.fused_step import hsa_fusable
    from lit_hsa.model.attention import Context
    from lit_hsa.model.hsa import Memory
    from lit_hsa.model.transformer import HSATransformer

    block = HSATransformer(tiny(moe=False, chunk_size=16, head_dim=16)).eval().hsa_blocks()[0]
    ctx = Context(torch.zeros(1), torch.zeros(1), {}, None)
    def memory(C: int, offloaded: bool = False) -> Memory:
        kind = OffloadedMemory if offloaded else Memory
        return kind(torch.zeros(1, C, 1, 16), torch.zeros(1, 16 * C, 1, 16), torch.zeros(1, 16 * C, 1, 16))

    assert hsa_fusable(block, ctx, memory(4)) and not hsa_fusable(block, ctx, memory(4, offloaded=True))
    off_by_one = HSATransformer(tiny(moe=False, chunk_size=16, head_dim=16, softmax_off_by_one=True)).eval()
    assert not hsa_fusable(off_by_one.hsa_blocks()[0], ctx, memory(4))  # the decoding kernel has no +1
    monkeypatch.setattr(dispatch, "MAX_DECODE_CHUNKS", 2)
    assert hsa_fusable(block, ctx, memory(2), compiled=True) and not hsa_fusable(block, ctx, memory(3), compiled=True)
    assert hsa_fusable(block, ctx, memory(3))
    small_chunks = HSATransformer(tiny(moe=False)).eval().hsa_blocks()[0]  # chunk size 8
    assert not hsa_fusable(small_chunks, ctx, memory(2))


@only_if_kernels_skipped
@pytest.mark.slow
def test_cpu_kernels_in_subprocess():
    run_module_in_subprocess(__file__)


@pytest.mark.gpu
@pytest.mark.parametrize("landmark_dtype", [torch.float32, torch.bfloat16])
def test_gpu_small_preset_at_1m_tokens(landmark_dtype):
    """`small`'s retrieval (Hr=1, Dr=640, top 32 of 16K chunks) and HSA attention (10 query heads, one KV head) in
    bf16: the same chunks as the fp32 reference (scores of random landmarks are far apart), outputs within 1e-2."""
    gen = torch.Generator().manual_seed(3)
    C, Dr, S, D, Hq, K = 16384, 640, 64, 64, 10, 32
    q = randn(1, Dr, gen=gen, dtype=torch.bfloat16)
    landmarks = randn(1, C, 1, Dr, gen=gen, dtype=landmark_dtype)
    pos = C * S - 5  # the last chunk not yet visible
    _, idx, w = select_chunks_decode(q, None, 1e-6, landmarks, torch.tensor(pos, device=DEV), K, S)
    want_idx, want_w = reference_selection(q, None, 1e-6, landmarks, pos, K, S, "softmax", None)
    assert torch.equal(idx.long(), want_idx)
    assert rel_err(w, want_w) < 1e-3
    k, v = (randn(1, C * S, 1, D, gen=gen, dtype=torch.bfloat16) for _ in range(2))
    qh, q_norm_w = randn(1, Hq * D, gen=gen, dtype=torch.bfloat16), randn(D, gen=gen, dtype=torch.bfloat16)
    got = hsa_chunks_decode(qh, q_norm_w, 1e-6, k, v, idx, w, S).sum(1)
    qn = torch.nn.functional.rms_norm(qh.float().view(1, 1, Hq, D), (D,), q_norm_w.float(), 1e-6)
    want = hsa_attention_reference(qn, k.float(), v.float(), w.unsqueeze(1), idx.long().unsqueeze(1), S)
    assert rel_err(got, want.reshape(1, -1)) < 1e-2
