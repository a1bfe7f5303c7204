"""Dense → HSA conversion (lit_hsa/interop/to_hsa.py): the converted model computes the dense model's function with
a sliding window (its HSA blocks add exactly nothing until training opens their output projection), every dense
weight lands where the docstring says, and bad layouts fail in one line."""
import pytest
import torch
import torch.nn.functional as F

from lit_hsa.config import ConfigError
from lit_hsa.interop.to_hsa import default_layout, dense_to_hsa, hsa_config, pool_heads
from lit_hsa.model.transformer import HSATransformer
from tests.helpers import tiny

DENSE = dict(attention="full", n_lower_layers=6, n_groups=0, swa_layers_per_group=0, moe=False, vocab_size=97,
             d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)


def dense_model(**overrides):
    torch.manual_seed(0)
    cfg = tiny(**{**DENSE, **overrides})
    model = HSATransformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a norm copied to the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model


def converted(dense_cfg, dense, **overrides):
    cfg, state = dense_to_hsa(dense_cfg, dense.state_dict(), **overrides)
    model = HSATransformer(cfg).eval()
    model.load_state_dict(state)
    return cfg, model


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("hsa_kv_heads", [2, 1])
def test_converted_model_equals_the_dense_one_with_a_sliding_window(qk_norm, hsa_kv_heads):
    dense_cfg, dense = dense_model(qk_norm=qk_norm)
    cfg, hsa = converted(dense_cfg, dense, swa_window=16, chunk_size=8, hsa_topk=2, hsa_kv_heads=hsa_kv_heads)
    assert (cfg.n_lower_layers, cfg.n_groups, cfg.swa_layers_per_group) == (3, 1, 2)
    x = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        # within the window: the dense model itself
        torch.testing.assert_close(hsa(x[:, :16]), dense(x[:, :16]), rtol=0, atol=1e-6)
        # beyond it: the dense weights with a 16-token window in every layer (retrieval runs, and adds zero)
        swa = HSATransformer(tiny(**{**DENSE, "qk_norm": qk_norm, "attention": "swa", "swa_window": 16})).eval()
        swa.load_state_dict(dense.state_dict())
        torch.testing.assert_close(hsa(x), swa(x), rtol=0, atol=1e-6)
        assert (hsa(x) - dense(x)).abs().max() > 1e-3  # …which is not the full-attention model


def test_hsa_blocks_open_with_training():
    dense_cfg, dense = dense_model()
    _, hsa = converted(dense_cfg, dense, swa_window=16, chunk_size=8, hsa_topk=2)
    block = hsa.hsa_blocks()[0]
    assert torch.count_nonzero(block.o_proj.weight) == 0
    x = torch.randint(0, 97, (2, 48))
    seen = {}  # the projection's input a [B, T, in] and the gradient g [B, T, out] of its output
    block.o_proj.register_forward_hook(lambda m, args, out: seen.update(a=args[0].detach()))
    block.o_proj.register_full_backward_hook(lambda m, grad_in, grad_out: seen.update(g=grad_out[0]))
    hsa.train()
    hsa(x[:, :-1], labels=x[:, 1:]).backward()
    # the zero projection learns from the first step: its gradient is Σ_t g_t a_tᵀ, with neither factor zero
    assert seen["a"].abs().amax() > 0 and seen["g"].abs().amax() > 0
    torch.testing.assert_close(block.o_proj.weight.grad, torch.einsum("bto,bti->oi", seen["g"], seen["a"]))


def test_gated_conversion_keeps_the_function_and_opens_through_the_gate():
    """model.hsa_gate: the output projection random (init_std), the gate at zero: the dense function is kept (within
    the window exactly; beyond it the SWA model's) and the gate's gradient, Σ <dL/dy, o_proj(HSA)>, is nonzero."""
    dense_cfg, dense = dense_model()
    cfg, hsa = converted(dense_cfg, dense, swa_window=16, chunk_size=8, hsa_topk=2, hsa_gate=True)
    block = hsa.hsa_blocks()[0]
    assert cfg.hsa_gate and block.gate.tolist() == [0.0]
    assert 0.5 * cfg.init_std < block.o_proj.weight.std() < 2 * cfg.init_std
    x = torch.randint(0, 97, (2, 48))
    _, zero_init = converted(dense_cfg, dense, swa_window=16, chunk_size=8, hsa_topk=2)
    with torch.no_grad():
        torch.testing.assert_close(hsa(x[:, :16]), dense(x[:, :16]), rtol=0, atol=1e-6)
        torch.testing.assert_close(hsa(x), zero_init(x), rtol=0, atol=1e-6)
    hsa = hsa.double().train()

    def loss() -> torch.Tensor:  # in float64 throughout, so a finite difference is exact to ~1e-9
        return F.cross_entropy(hsa(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    loss().backward()
    grad = block.gate.grad.item()
    assert abs(grad) > 1e-6
    # the retrieval query learns nothing while the gate is shut (its gradient flows through gate × o_proj)
    assert block.retrieval.q_proj.weight.grad.abs().max() == 0
    with torch.no_grad():
        eps, values = 1e-6, []
        for g in (eps, -eps):
            block.gate.fill_(g)
            values.append(loss().item())
    assert grad == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-4)


def test_small_output_init_changes_the_function_a_little():
    dense_cfg, dense = dense_model()
    cfg, hsa = converted(dense_cfg, dense, swa_window=16, chunk_size=8, hsa_topk=2, out_std=1e-3)
    w = hsa.hsa_blocks()[0].o_proj.weight
    assert 0.5e-3 < w.std() < 2e-3 and not cfg.hsa_gate
    x = torch.randint(0, 97, (2, 48))
    _, zero_init = converted(dense_cfg, dense, swa_window=16, chunk_size=8, hsa_topk=2)
    with torch.no_grad():
        gap = (hsa(x) - zero_init(x)).abs().max()
    assert 0 < gap < 0.1
    with pytest.raises(ConfigError, match="zero gate"):
        dense_to_hsa(dense_cfg, dense.state_dict(), out_std=1e-3, swa_window=16, chunk_size=8, hsa_gate=True)


def test_dense_weights_land_where_documented():
    dense_cfg, dense = dense_model(qkv_bias=True)
    cfg, hsa = converted(dense_cfg, dense, swa_window=16, chunk_size=8, hsa_kv_heads=1)
    d, h = dense.state_dict(), hsa.state_dict()
    first = cfg.n_lower_layers  # the first HSA block is dense layer 3
    src = f"lower.{first}"
    for ours, theirs in [("upper.0.swa.q_proj.weight", "attn.q_proj.weight"),
                         ("upper.0.swa_norm.weight", "attn_norm.weight"),
                         ("upper.0.ffn.w_down.weight", "ffn.w_down.weight"),
                         ("upper.0.q_proj.weight", "attn.q_proj.weight"),
                         ("upper.0.q_norm.weight", "attn.q_norm.weight"),
                         ("upper.0.hsa_norm.weight", "attn_norm.weight"),
                         ("memory.k_norm.weight", "attn.k_norm.weight"), ("memory.norm.weight", "attn_norm.weight"),
                         ("memory.layers.0.attn.o_proj.weight", "attn.o_proj.weight"),
                         ("memory.layers.0.attn_norm.weight", "attn_norm.weight")]:
        assert torch.equal(h[ours], d[f"{src}.{theirs}"]), ours
    # KV heads averaged into one: the mean of the two dense heads' rows
    k = d[f"{src}.attn.k_proj.weight"].view(2, 8, -1)
    assert torch.equal(h["memory.k_proj.weight"], k.mean(0))
    assert torch.count_nonzero(h["memory.layers.0.ffn.w_down.weight"]) == 0
    for i in (0, 1, 2):
        assert torch.equal(h[f"lower.{i}.attn.k_proj.weight"], d[f"lower.{i}.attn.k_proj.weight"])
    assert torch.equal(h["upper.1.ffn.w_up.weight"], d["lower.4.ffn.w_up.weight"])
    assert torch.equal(h["upper.2.attn.v_proj.weight"], d["lower.5.attn.v_proj.weight"])


def test_pool_heads_groups_consecutive_heads():
    w = torch.arange(4 * 2 * 3, dtype=torch.float32).view(8, 3)  # 4 heads of dim 2, input 3
    pooled = pool_heads(w, heads=4, head_dim=2, groups=2)
    torch.testing.assert_close(pooled[:2], (w[0:2] + w[2:4]) / 2)
    torch.testing.assert_close(pooled[2:], (w[4:6] + w[6:8]) / 2)


@pytest.mark.parametrize("layers,layout", [(24, (12, 2, 5)), (28, (14, 2, 6)), (36, (18, 2, 8)), (4, (2, 1, 1)),
                                           (2, (1, 1, 0)), (7, (3, 2, 1)), (6, (3, 1, 2))])
def test_default_layout_keeps_every_layer(layers, layout):
    n_lower, groups, per_group = default_layout(layers)
    assert (n_lower, groups, per_group) == layout
    assert n_lower + groups * (1 + per_group) == layers


def test_bad_conversions_are_one_line():
    dense_cfg, _ = dense_model()
    with pytest.raises(ConfigError, match="must equal the dense model's 6 layers"):
        hsa_config(dense_cfg, n_groups=2)
    with pytest.raises(ConfigError, match="hsa_kv_heads divide"):
        hsa_config(dense_cfg, hsa_kv_heads=3, hsa_heads=None)
    with pytest.raises(ConfigError, match="already an HSA model"):
        hsa_config(tiny())
    with pytest.raises(ConfigError, match="MoE"):
        hsa_config(tiny(**{**DENSE, "moe": True}))
    with pytest.raises(ConfigError, match="needs >= 2"):
        default_layout(1)
