import pytest
import torch

from lit_hsa.inference.decode import DecodeState, OffloadedMemory, decode_forward
from lit_hsa.inference.generate import generate, prefill, sample_next
from lit_hsa.model.transformer import HSATransformer
from tests.helpers import VOCAB, tiny

VARIANTS = {"hsa": dict(hsa_layer_swa=True, hsa_swa_window=4), "swa": dict(attention="swa"),
            "full": dict(attention="full"), "hsa-off-by-one": dict(softmax_off_by_one=True)}


@pytest.mark.parametrize("variant,offload", [("hsa", False), ("hsa", True), ("swa", False), ("full", False),
                                             ("hsa-off-by-one", False)])
def test_incremental_decoding_equals_full_forward(variant, offload):
    """Segments of odd sizes and single tokens, across chunk and window boundaries, give the full forward's logits;
    also with the chunk K/V offloaded (only the selected chunks fetched)."""
    model = HSATransformer(tiny(**VARIANTS[variant], hsa_topk=3)).eval()
    x = torch.randint(0, VOCAB, (2, 45))
    with torch.no_grad():
        ref = model(x)
        state, outs = DecodeState(offload_memory=offload), []
        for seg in (5, 1, 1, 9, 3, 16, 10):
            outs.append(decode_forward(model, x[:, state.pos : state.pos + seg], state))
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-5, rtol=1e-5)
    if variant != "full":  # sliding-window caches stay bounded by the window
        assert all(k.shape[1] <= 8 for k, _ in state.kv.layers.values())
    if variant == "hsa":
        assert state.memory.n_chunks == 45 // 8 and state.pending.shape[1] == 45 % 8


def test_greedy_generation_follows_the_full_forward():
    model = HSATransformer(tiny()).eval()
    prompt = torch.randint(0, VOCAB, (1, 19))
    out = generate(model, prompt, max_new_tokens=12, segment_size=7)
    assert out.shape == (1, 31) and torch.equal(out[:, :19], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[0, 18:].argmax(-1), out[0, 19:])


def test_generation_stops_at_eos():
    """Greedy decoding stops right after the first EOS it emits, EOS included; the same tokens as without an EOS up
    to there."""
    model = HSATransformer(tiny()).eval()
    prompt = torch.randint(0, VOCAB, (1, 5))
    free = generate(model, prompt, max_new_tokens=10)
    assert free.shape == (1, 15) and torch.equal(free[:, :5], prompt)
    new = free[0, 5:].tolist()
    eos = new[3]  # the 4th generated token plays EOS: generation stops at its first occurrence
    stop = new.index(eos)
    out = generate(model, prompt, max_new_tokens=10, eos_id=eos)
    assert out[0].tolist() == prompt[0].tolist() + new[: stop + 1]


def test_generation_stops_when_the_stop_callback_says_so():
    """``stop`` sees the new tokens so far [B, n] after each one; the token that makes it true is the last."""
    model = HSATransformer(tiny()).eval()
    prompt = torch.randint(0, VOCAB, (1, 5))
    free = generate(model, prompt, max_new_tokens=10)
    seen = []
    out = generate(model, prompt, max_new_tokens=10, stop=lambda new: seen.append(new.shape[1]) or new.shape[1] == 4)
    assert torch.equal(out, free[:, :9]) and seen == [1, 2, 3, 4]


def test_top_p_keeps_the_nucleus_only():
    logits = torch.tensor([[3.0, 2.9, -5.0, -6.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature=1.0, top_p=0.9, generator=g)) for _ in range(200)}
    assert picks == {0, 1}
    assert int(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g)) == 0
    assert int(sample_next(logits)) == 0  # greedy


def test_full_attention_cache_grows_in_place():
    """The full-attention KV cache appends into a buffer that grows geometrically: every position is kept in order,
    and most decoding steps write only their own position (the buffer is reused, not reallocated)."""
    from lit_hsa.inference.decode import GrowingKV

    cache, buffers = GrowingKV(), set()
    parts = [torch.randn(2, n, 3, 4) for n in (5000, 1, 1, 3, 7000)]
    for part in parts:
        k, v = cache.append(part, -part)
        buffers.add(cache.k.data_ptr())
    torch.testing.assert_close(k, torch.cat(parts, dim=1))
    torch.testing.assert_close(v, -torch.cat(parts, dim=1))
    assert len(buffers) == 2  # one buffer for the prompt and the decoded tokens, one regrowth for the long segment


@pytest.mark.parametrize("variant", ["hsa", "swa", "full"])
def test_static_decoding_equals_full_forward(variant):
    """Static-shape decoding (ring caches, preallocated chunk memory, position on the device; what CUDA graphs
    replay) gives the full forward's logits token by token, across chunk completions and window wrap-arounds."""
    from lit_hsa.inference.static_decode import GraphDecoder

    model = HSATransformer(tiny(**VARIANTS[variant], hsa_topk=3)).eval()
    x = torch.randint(0, VOCAB, (2, 45))
    with torch.no_grad():
        ref = model(x)
        _, state = prefill(model, x[:, :13], segment_size=5)
    decoder = GraphDecoder(model, state, max_len=45)
    outs = [decoder.step(x[:, t]) for t in range(13, 45)]
    torch.testing.assert_close(torch.stack(outs, dim=1), ref[:, 13:], atol=1e-5, rtol=1e-5)
    assert decoder.state.pos == 45 and int(decoder.state.kv.pos_t) == 45
    with pytest.raises(ValueError, match="max_len=45"):
        decoder.step(x[:, 0])


@pytest.mark.parametrize("variant", ["hsa", "full"])
def test_compiled_static_decoding_equals_full_forward_and_prefill_stays_eager(variant):
    """GraphDecoder(compile=...) compiles the blocks and the cache attention (aot_eager here: dynamo's graphs and
    graph breaks without code generation) and still gives the full forward's logits. The HSA blocks' chunk selection
    and attention are traced into the blocks' graphs (they were a graph break each). A later prefill on the compiled
    model runs eagerly: it compiles no graph (its growing caches would recompile per layer and segment length)."""
    from torch._dynamo.utils import counters

    from lit_hsa.inference.static_decode import GraphDecoder
    from lit_hsa.model.units import is_compiled

    torch._dynamo.reset()
    counters.clear()  # dynamo's counters outlive reset(): earlier tests' graph breaks would be read as this one's
    model = HSATransformer(tiny(**VARIANTS[variant], hsa_topk=3)).eval()
    x = torch.randint(0, VOCAB, (2, 45))
    try:
        with torch.no_grad():
            ref = model(x)
            _, state = prefill(model, x[:, :13], segment_size=5)
        decoder = GraphDecoder(model, state, max_len=45, compile="aot_eager")
        outs = [decoder.step(x[:, t]) for t in range(13, 45)]
        torch.testing.assert_close(torch.stack(outs, dim=1), ref[:, 13:], atol=1e-5, rtol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        assert is_compiled(model) and graphs > 0
        breaks = " ".join(counters["graph_break"])
        assert "StaticKVCache.attend" in breaks  # the one break a decoding block has (caches found per layer)
        assert "select_chunks" not in breaks and "hsa_attention" not in breaks
        with torch.no_grad():
            logits, _ = prefill(model, x[:, :21], segment_size=7)
        torch.testing.assert_close(logits, ref[:, 20], atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def test_inductor_decoding_compiles_with_coordinate_descent_tuning(monkeypatch):
    """With inductor, GraphDecoder compiles the blocks and the cache attention with coordinate-descent tuning (batch-1
    matrix-vector products become tuned reductions instead of cuBLAS calls); other backends take no options."""
    from lit_hsa.inference import static_decode
    from lit_hsa.inference.static_decode import GraphDecoder, decode_compile_options

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("options")) or fn)
    static_decode.compiled_write_and_attend.cache_clear()
    model = HSATransformer(tiny(hsa_topk=3)).eval()
    with torch.no_grad():
        _, state = prefill(model, torch.randint(0, VOCAB, (1, 9)), segment_size=5)
    try:
        GraphDecoder(model, state, max_len=12, compile="inductor")
    finally:
        static_decode.compiled_write_and_attend.cache_clear()
    assert seen and all(o == {"coordinate_descent_tuning": True} for o in seen)
    assert len(seen) == len(model.blocks()) + 3  # blocks, chunk encoder, loss chunks, cache attention
    assert decode_compile_options("aot_eager") is None


def test_static_decoding_rejects_what_it_cannot_hold():
    from lit_hsa.inference.static_decode import StaticDecodeState

    model = HSATransformer(tiny()).eval()
    prompt = torch.randint(0, VOCAB, (1, 9))
    _, offloaded = prefill(model, prompt, offload_memory=True)
    with pytest.raises(ValueError, match="offload_memory"):
        StaticDecodeState(model, offloaded, max_len=32)
    _, state = prefill(model, prompt)
    with pytest.raises(ValueError, match="max_len \\(9\\) must exceed"):
        StaticDecodeState(model, state, max_len=9)


def test_generation_with_static_caches_matches_eager():
    model = HSATransformer(tiny(hsa_topk=3)).eval()
    prompt = torch.randint(0, VOCAB, (2, 11))
    eager = generate(model, prompt, max_new_tokens=20, segment_size=4, cuda_graphs=False)
    static = generate(model, prompt, max_new_tokens=20, segment_size=4, cuda_graphs=True)
    assert torch.equal(static, eager)
    for n in (0, 1):  # no decoding step at all
        assert generate(model, prompt, max_new_tokens=n, cuda_graphs=True).shape == (2, 11 + n)


def test_decode_attention_splits_long_caches_exactly():
    """Past 2·SPLIT_KEYS keys the probabilities·values product runs as summed slices: same result as SDPA."""
    from lit_hsa.kernels.decode import SPLIT_KEYS, decode_attention

    L = 3 * SPLIT_KEYS
    q, k, v = torch.randn(2, 1, 6, 16), torch.randn(2, 3, L, 16), torch.randn(2, 3, L, 16)
    valid = torch.arange(L) < L - 100
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=valid[None, None, None],
                                                           enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(decode_attention(q, k, v, valid), ref, atol=1e-5, rtol=1e-4)


# Operators whose output size depends on the data, or that read a value back to the host: each synchronises with the
# GPU, which a CUDA-graph capture does not allow.
HOST_SYNCING_OPS = {"nonzero", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount",
                    "masked_select", "_local_scalar_dense", "item", "repeat_interleave", "histc", "argwhere"}


@pytest.mark.parametrize("variant", ["hsa", "swa", "full"])
def test_static_decoding_step_has_no_host_synchronisation(variant):
    """What CUDA-graph capture needs, checked on CPU: after the first (eager, cache-converting) step, a static
    decoding step (plain and chunk-completing) runs no operator that synchronises with the device. The tiny preset
    has MoE layers, so their decoding path is covered too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lit_hsa.inference.static_decode import GraphDecoder

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncing = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in HOST_SYNCING_OPS:
                self.syncing.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = HSATransformer(tiny(**VARIANTS[variant], hsa_topk=3)).eval()
    assert model.moe_layers()
    x = torch.randint(0, VOCAB, (1, 30))
    _, state = prefill(model, x[:, :13])
    decoder = GraphDecoder(model, state, max_len=30)
    decoder.step(x[:, 13])
    with Record() as record:
        for t in range(14, 30):  # crosses the chunk completions at positions 15 and 23
            decoder.step(x[:, t])
    assert not record.syncing


@pytest.mark.parametrize("offload", [False, True])
def test_chunk_memory_changes_only_when_a_chunk_completes_and_grows_in_place(offload):
    """A decoding step that completes no chunk leaves the memory as it is (it used to concatenate the whole memory,
    with host copies when offloaded, on every token); a completed chunk is written into the existing buffers."""
    model = HSATransformer(tiny()).eval()  # chunks of 8
    x = torch.randint(0, VOCAB, (1, 17))
    with torch.no_grad():
        _, state = prefill(model, x[:, :9], offload_memory=offload)  # chunk 0 done, position 8 pending
        memory, buffer = state.memory, state.kv_store.k.data_ptr()
        for t in range(9, 15):
            decode_forward(model, x[:, t : t + 1], state)
            assert state.memory is memory
        decode_forward(model, x[:, 15:16], state)  # completes chunk 1
    assert state.memory.n_chunks == 2 and state.memory.k.shape[1] == 16
    assert state.kv_store.k.data_ptr() == buffer
    assert state.memory.k.device.type == "cpu" and isinstance(state.memory, OffloadedMemory) == offload


def test_static_decoding_step_copies_no_memory_sized_tensor():
    """A bf16 model's static decoding step reads the chunk memory where it lies: no fp32 copy of all landmarks for the
    selection's fp32 scores (they are kept in fp32), no converted copy of all chunk K/V for the attention (only the
    selected chunks are gathered)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lit_hsa.inference.static_decode import GraphDecoder, StaticDecodeState

    class LargestCopy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("_to_copy", "clone", "copy_", "contiguous"):
                self.numel = max(self.numel, out.numel())
            return out

    model = HSATransformer(tiny(hsa_topk=2)).to(torch.bfloat16).eval()
    x = torch.randint(0, VOCAB, (1, 200))
    _, state = prefill(model, x[:, :150])
    decoder = GraphDecoder(model, state, max_len=200)
    decoder.step(x[:, 150])  # converts the eager caches
    with LargestCopy() as record:
        for t in range(151, 160):  # crosses the chunk completion at position 151
            decoder.step(x[:, t])
    assert decoder.state.landmarks.dtype == torch.float32
    assert record.numel < min(decoder.state.landmarks.numel(), decoder.state.k.numel())
    # compiled by inductor, the scoring kernel casts in registers: the landmarks keep the memory's dtype (half the read)
    model = HSATransformer(tiny(hsa_topk=2)).to(torch.bfloat16).eval()
    _, state = prefill(model, x[:, :150])
    assert StaticDecodeState(model, state, 200, fused_casts=True).landmarks.dtype == torch.bfloat16


def test_decoding_caches_and_states_implement_the_declared_protocols():
    """``decode_forward`` works on any ``DecodingState`` whose ``kv`` is a ``DecodeCache``: the eager and static
    implementations both provide every member, with the Protocol's parameters."""
    import inspect

    from lit_hsa.inference.decode import DecodeCache, DecodeState, DecodingState, KVCache
    from lit_hsa.inference.static_decode import StaticDecodeState, StaticKVCache

    model = HSATransformer(tiny()).eval()
    _, state = prefill(model, torch.randint(0, VOCAB, (1, 20)))
    assert isinstance(state, DecodingState) and isinstance(state.kv, DecodeCache)
    static = StaticDecodeState(model, state, max_len=32)
    assert isinstance(static, DecodingState) and isinstance(static.kv, DecodeCache)
    for protocol, classes in ((DecodeCache, (KVCache, StaticKVCache)), (DecodingState, (DecodeState,
                                                                                        StaticDecodeState))):
        for name, member in vars(protocol).items():
            if not callable(member) or name.startswith("_"):
                continue
            wanted = list(inspect.signature(member).parameters)
            for cls in classes:
                assert list(inspect.signature(getattr(cls, name)).parameters)[:len(wanted)] == wanted, (cls, name)
    assert not isinstance(object(), DecodeCache)  # the check can fail
