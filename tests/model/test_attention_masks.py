"""flex_attention block masks built from the masking rules (``block_mask_from_rules``, no compilation): the same
skipped / partial / full blocks as torch's ``create_block_mask`` evaluating the mask on every element, and, element
by element, the same attention pattern as the masks written here from the definition; the dense SDPA masks (every
CPU forward) pair by pair against the rule."""
import itertools

import pytest
import torch

from lit_hsa.model.attention import block_mask_from_rules, build_mask

create_block_mask = pytest.importorskip("torch.nn.attention.flex_attention").create_block_mask


def definition(window, doc_ids):
    """Causal, within ``window`` keys when given, within the query's document when ``doc_ids`` is given."""
    def mask_mod(b, h, q, k):
        keep = q >= k
        if window is not None:
            keep = keep & (q - k < window)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q] == doc_ids[b, k])
        return keep

    return mask_mod


def block_sets(mask) -> tuple[set, set]:
    """({(b, q_block, kv_block)} of partial blocks, the same of full blocks)."""
    def blocks(counts, indices):
        return {(b, q, int(indices[b, 0, q, j])) for b in range(counts.shape[0]) for q in range(counts.shape[2])
                for j in range(int(counts[b, 0, q]))}

    return (blocks(mask.kv_num_blocks, mask.kv_indices),
            blocks(mask.full_kv_num_blocks, mask.full_kv_indices) if mask.full_kv_num_blocks is not None else set())


CASES = [(T, w, d) for T, w, d in itertools.product([128, 320, 1024, 1088], [None, 64, 200, 511], [False, True])
         if w is not None or d]


@pytest.mark.parametrize("T,window,docs", CASES)
def test_blocks_equal_create_block_mask(T, window, docs):
    doc_ids = None
    if docs:  # row 0: documents of 70 tokens (boundaries inside blocks); row 1: of 300 (blocks inside documents)
        pos = torch.arange(T)
        doc_ids = torch.stack([pos // 70, (pos + 37) // 300])
    mask_mod = definition(window, doc_ids)
    expected = create_block_mask(mask_mod, None if doc_ids is None else 2, None, T, T, device="cpu", _compile=False)
    got = block_mask_from_rules(T, window, doc_ids, "cpu", mask_mod)
    partial, full = block_sets(got)
    assert (partial, full) == block_sets(expected)
    if not docs and T >= 3 * 128 and (window is None or window > 2 * 128):
        assert full  # blocks that need no mask evaluation exist here (the point of classifying them)
    assert got.mask_mod is mask_mod and got.seq_lengths == (T, T)


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("window", [150, 255, 385])
def test_blocks_cover_exactly_the_allowed_pairs(window, docs):
    """Element level, independently of torch: a skipped block holds no allowed pair, a full block only allowed
    pairs, over windows that are not a multiple of the block (255: a full block's farthest pair lies exactly at
    the window's edge; 385: a skipped block's nearest pair does) and documents that straddle blocks."""
    T, block = 640, 128
    doc_ids = torch.tensor([[0] * 100 + [1] * 300 + [2] * 240]) if docs else None
    got = block_mask_from_rules(T, window, doc_ids, "cpu", definition(window, doc_ids), block=block)
    partial, full = block_sets(got)
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    allowed = (q >= k) & (q - k < window)
    if docs:
        allowed &= doc_ids[0][:, None] == doc_ids[0][None, :]
    for qb, kb in itertools.product(range(T // block), repeat=2):
        tile = allowed[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
        kind = "full" if (0, qb, kb) in full else "partial" if (0, qb, kb) in partial else "skipped"
        assert kind == ("full" if tile.all() else "skipped" if not tile.any() else "partial"), (qb, kb)


@pytest.mark.parametrize("window,docs", [(5, False), (5, True), (None, True)])
def test_dense_masks_are_the_element_rule(window, docs):
    """``build_mask``'s SDPA mask: query t sees key s iff s <= t, t − s < window and both tokens lie in one
    document, pair by pair in plain Python (window 5: t sees t−4..t, not t−5; row 1 is one document)."""
    T = 24
    doc_ids = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 24]) if docs else None
    dense = build_mask(T, window, doc_ids, "cpu", "sdpa").dense
    assert dense.shape == (2 if docs else 1, 1, T, T)
    for b, t, s in itertools.product(range(dense.shape[0]), range(T), range(T)):
        same_doc = doc_ids is None or int(doc_ids[b, t]) == int(doc_ids[b, s])
        assert bool(dense[b, 0, t, s]) == (s <= t and (window is None or t - s < window) and same_doc), (b, t, s)
