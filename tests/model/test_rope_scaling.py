"""The model options Hugging Face imports need (``model.rope_scaling``, ``model.qkv_bias``, ``model.attn_out_bias``),
without transformers: config validation and YAML, the scaled RoPE tables' properties, and every decoding path (eager
caches, static caches, greedy generation, the fused Triton step under the interpreter) equal to the full forward
with scaling and biases on. Comparison with transformers' own tables and models: ``tests/interop/test_hf_import.py``."""

import math

import pytest
import torch

from lit_hsa.config import ConfigError, ModelConfig, load_config  # noqa: E402
from lit_hsa.model.attention import Rotary, rope_frequencies  # noqa: E402
from tests.helpers import VOCAB, tiny  # noqa: E402
from tests.triton_interpret import kernel_test, only_if_kernels_skipped, run_module_in_subprocess

LINEAR = dict(rope_type="linear", factor=2.0)
LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8)
SCALINGS = {"linear": LINEAR, "llama3": LLAMA3, "yarn": YARN}
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # Triton kernels: the GPU, else the interpreter on CPU


# ---------------------------------------------------------------------------------------------------- config


def test_defaults_are_todays_model():
    """No scaling, no biases: the same tables (bit for bit) and the same parameters as before the options."""
    cfg = ModelConfig()
    assert (cfg.rope_scaling, cfg.qkv_bias, cfg.attn_out_bias) == (None, False, False)
    rotary = Rotary(32, 500000.0)
    assert torch.equal(rotary.inv_freq, 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)))
    pos = torch.arange(100)
    freqs = pos.float()[:, None] * rotary.inv_freq[None, :]
    cos, sin = rotary.cos_sin(pos)
    assert rotary.attention_scaling == 1.0 and torch.equal(cos, freqs.cos()) and torch.equal(sin, freqs.sin())
    from lit_hsa.model.transformer import HSATransformer

    for variant in ("hsa", "full"):
        model = HSATransformer(tiny(attention=variant, hsa_layer_swa=True))
        assert not [k for k in model.state_dict() if k.endswith(".bias") and "memory." not in k]


def test_rope_scaling_from_yaml_override_and_file(tmp_path):
    cfg = load_config(None, ["model.rope_scaling={rope_type: linear, factor: 2.0}", "model.qkv_bias=true"])
    assert cfg.model.rope_scaling == LINEAR and isinstance(cfg.model.rope_scaling, dict) and cfg.model.qkv_bias
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  rope_scaling:\n    rope_type: yarn\n    factor: 4\n"
        "    original_max_position_embeddings: 8\n    truncate: false\n  attn_out_bias: true\n"
    )
    cfg = load_config(str(path))
    assert cfg.model.rope_scaling == {**YARN, "factor": 4, "truncate": False} and cfg.model.attn_out_bias
    assert load_config(str(path), ["model.rope_scaling=null"]).model.rope_scaling is None


@pytest.mark.parametrize(
    "scaling,message",
    [
        (
            dict(rope_type="dynamic", factor=2.0),
            "rope_type: 'dynamic' is not supported; supported: linear, llama3, yarn",
        ),
        (dict(factor=2.0), "rope_type: None is not supported"),
        (
            dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, original_max_position_embeddings=16),
            "model.rope_scaling.high_freq_factor is required for rope_type llama3",
        ),
        (
            dict(rope_type="linear", factor=2.0, beta_fast=3),
            "model.rope_scaling.beta_fast: unknown key for rope_type linear",
        ),
        (dict(rope_type="linear", factor="two"), "model.rope_scaling.factor must be a number, got 'two'"),
        (
            dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=8, truncate=1),
            "model.rope_scaling.truncate must be a bool",
        ),
        (dict(rope_type="linear", factor=0.0), "factor must be > 0"),
        ({**LLAMA3, "high_freq_factor": 1.0}, r"high_freq_factor \(1.0\) must be greater than low_freq_factor"),
    ],
)
def test_bad_rope_scaling_is_one_line(scaling, message):
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig(rope_scaling=scaling).validate()
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.rope_scaling"):  # from the command line too
        load_config(None, ["model.rope_scaling={rope_type: longrope, factor: 2.0}"])


# ---------------------------------------------------------------------------------------------------- tables


def test_scaled_tables():
    """linear: position p reads the plain table at p / factor; llama3: the fastest dimensions keep their frequency,
    the slowest are divided by factor; yarn: fast dimensions kept, slow ones / factor, and cos, sin carry the
    attention factor 0.1 ln(factor) + 1 (or the given one)."""
    plain = Rotary(16, 10000.0)
    pos = torch.arange(0, 64, 2)
    for got, want in zip(Rotary(16, 10000.0, LINEAR).cos_sin(pos), plain.cos_sin(pos // 2)):
        torch.testing.assert_close(got, want)
    inv, factor = rope_frequencies(16, 10000.0, LLAMA3)  # wavelengths 6.3 (between 16/4 and 16/1), then > 16
    assert factor == 1.0 and torch.equal(inv[1:], plain.inv_freq[1:] / 8)
    assert plain.inv_freq[0] / 8 < inv[0] < plain.inv_freq[0]
    inv, _ = rope_frequencies(16, 10000.0, {**LLAMA3, "original_max_position_embeddings": 1000})
    assert inv[0] == plain.inv_freq[0] and inv[-1] == plain.inv_freq[-1] / 8  # 6.3 < 1000/4: kept
    inv, factor = rope_frequencies(16, 10000.0, YARN)
    assert factor == pytest.approx(0.1 * math.log(4) + 1) and inv[0] == plain.inv_freq[0]
    torch.testing.assert_close(inv[-1], plain.inv_freq[-1] / 4)
    yarn = Rotary(16, 10000.0, {**YARN, "attention_factor": 0.7})
    freqs = pos.float()[:, None] * yarn.inv_freq[None, :]
    cos, sin = yarn.cos_sin(pos)
    assert torch.equal(cos, freqs.cos() * 0.7) and torch.equal(sin, freqs.sin() * 0.7)


# ---------------------------------------------------------------------------------------------------- decoding

# (attention, scaling, biases): the dense baselines and HSA with its SWA sub-layer (which takes qkv_bias too)
DECODE_CASES = {
    "full-yarn-bias": dict(attention="full", rope_scaling=YARN, qkv_bias=True, attn_out_bias=True),
    "swa-llama3": dict(attention="swa", rope_scaling=LLAMA3),
    "hsa-linear-bias": dict(hsa_layer_swa=True, hsa_swa_window=4, rope_scaling=LINEAR, qkv_bias=True),
    "hsa-yarn": dict(rope_scaling=YARN, attn_out_bias=True),
}


def scaled_model(**overrides):
    from lit_hsa.model.transformer import HSATransformer

    model = HSATransformer(tiny(hsa_topk=3, **overrides)).eval()
    with torch.no_grad():  # biases start at 0: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") and "router" not in name:
                p.normal_(0, 0.5)
    return model


def test_options_change_the_model():
    """Each option reaches the forward: scaling changes the logits (T=45 > original positions); biases exist where
    asked (the HSA blocks' SWA sub-layer included); the chunk encoder's RoPE is scaled too."""
    x = torch.randint(0, VOCAB, (1, 45))
    torch.manual_seed(1)
    plain = scaled_model(attention="full")
    with torch.no_grad():
        ref = plain(x)
    for scaling in SCALINGS.values():
        torch.manual_seed(1)
        with torch.no_grad():
            assert (scaled_model(attention="full", rope_scaling=scaling)(x) - ref).abs().max() > 1e-3
    model = scaled_model(hsa_layer_swa=True, qkv_bias=True, attn_out_bias=True, rope_scaling=YARN)
    attns = [b.attn for b in model.blocks() if hasattr(b, "attn")] + [b.swa for b in model.hsa_blocks()]
    assert len(attns) == model.cfg.n_layers
    assert all(a.q_proj.bias is not None and a.v_proj.bias is not None and a.o_proj.bias is not None for a in attns)
    # the chunk encoder's RoPE is scaled like the blocks' (one RoPE per model)
    assert torch.equal(model.memory.rotary.inv_freq, model.rotary.inv_freq)
    yarn_factor = pytest.approx(1 + 0.1 * math.log(4))
    assert model.memory.rotary.attention_scaling == model.rotary.attention_scaling == yarn_factor


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decoding_equals_full_forward_with_scaling_and_biases(case):
    """Eager caches (odd segments, single tokens), static caches token by token, and greedy generation follow the
    full forward with rope scaling and attention biases."""
    from lit_hsa.inference.decode import DecodeState, decode_forward
    from lit_hsa.inference.generate import generate, prefill
    from lit_hsa.inference.static_decode import GraphDecoder

    model = scaled_model(**DECODE_CASES[case])
    x = torch.randint(0, VOCAB, (2, 45))
    with torch.no_grad():
        ref = model(x)
        state, outs = DecodeState(), []
        for seg in (5, 1, 1, 9, 3, 16, 10):
            outs.append(decode_forward(model, x[:, state.pos : state.pos + seg], state))
        torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-5, rtol=1e-5)
        _, state = prefill(model, x[:, :13], segment_size=5)
    decoder = GraphDecoder(model, state, max_len=45)
    steps = [decoder.step(x[:, t]) for t in range(13, 45)]
    torch.testing.assert_close(torch.stack(steps, dim=1), ref[:, 13:], atol=1e-5, rtol=1e-5)
    out = generate(model, x[:1, :19], max_new_tokens=12, segment_size=7)
    with torch.no_grad():
        assert torch.equal(model(out[:, :-1])[0, 18:].argmax(-1), out[0, 19:])


@kernel_test
def test_fused_static_decoding_uses_the_scaled_tables(monkeypatch):
    """The fused Triton step computes cos, sin in its own kernel (``rope_cos_sin`` from the scaled ``inv_freq``),
    then applies yarn's attention factor: its logits are the full forward's."""
    import lit_hsa.inference.fused_step as fused_step
    from lit_hsa.model.transformer import HSATransformer
    from tests.helpers import static_decode_with_triton

    calls = []
    original = fused_step.block_step
    monkeypatch.setattr(fused_step, "block_step", lambda *a: calls.append(a[0]) or original(*a))
    cfg = tiny(
        attention="full", n_lower_layers=1, swa_layers_per_group=0, head_dim=16, first_dense_layers=2, rope_scaling=YARN
    )
    model = HSATransformer(cfg).to(DEV).eval()
    x = torch.randint(0, VOCAB, (1, 17), device=DEV)
    outs, ref = static_decode_with_triton(model, x, 13)
    torch.testing.assert_close(outs, ref, atol=1e-4, rtol=1e-4)
    assert len(calls) == 4 * cfg.n_layers  # every block stepped through the fused kernels


def test_biased_attention_is_not_fused():
    """The fused kernels have no bias inputs: attention with biases steps through its modules."""
    pytest.importorskip("triton")
    from lit_hsa.inference.fused_step import attention_fusable

    model = scaled_model(attention="full", qkv_bias=True)
    block = model.lower[0]
    assert not attention_fusable(block.attn_norm, block.attn)
    block = scaled_model(attention="full", attn_out_bias=True).lower[0]
    assert not attention_fusable(block.attn_norm, block.attn)


@only_if_kernels_skipped
@pytest.mark.slow
def test_cpu_kernels_in_subprocess():
    run_module_in_subprocess(__file__)
