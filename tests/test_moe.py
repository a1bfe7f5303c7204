import torch

from lit_hsa.moe import MoE, expert_load_stats


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop: the definition the grouped implementation must match."""
    out = torch.zeros_like(x)
    scores = torch.sigmoid(moe.router(x))
    for n in range(x.shape[0]):
        chosen = (scores[n] + moe.expert_bias).topk(moe.top_k).indices
        gates = scores[n, chosen] / scores[n, chosen].sum()
        for g, e in zip(gates, chosen):
            h = torch.nn.functional.silu(x[n] @ moe.w_gate[e]) * (x[n] @ moe.w_up[e])
            out[n] += g * (h @ moe.w_down[e])
    return out + moe.shared(x)


def make_moe(**kw):
    moe = MoE(16, n_experts=4, experts_per_token=2, expert_hidden=8, **kw)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(w, std=0.2)
    return moe


def test_grouped_moe_matches_per_token_loop():
    moe = make_moe()
    moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(moe(x), naive_moe(moe, x.view(-1, 16)).view(2, 10, 16), atol=1e-5, rtol=1e-5)


def test_decoding_sized_calls_gather_their_experts_and_match():
    """In eval with N·k <= E (a decoding step) each token runs its own gathered experts (no sort, no host-side
    sizes): same output as the per-token definition, and no load is counted."""
    moe = make_moe().eval()
    moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(2, 1, 16)  # 2 tokens × 2 experts = 4 = E
    with torch.no_grad():
        torch.testing.assert_close(moe(x), naive_moe(moe, x.view(-1, 16)).view(2, 1, 16), atol=1e-5, rtol=1e-5)
    assert moe.load_accum.sum() == 0


def test_load_accumulates_and_bias_moves_towards_balance():
    moe = make_moe()
    moe.train()
    x = torch.randn(64, 16)
    moe(x)
    moe(x)
    load = moe.load_accum.clone()
    assert load.sum() == 2 * 64 * 2
    moe.update_bias(load)
    over = load > load.mean()
    assert torch.all(moe.expert_bias[over] < 0) and torch.all(moe.expert_bias[~over] >= 0)
    assert expert_load_stats(torch.tensor([1.0, 1.0, 1.0, 1.0]))["max_violation"] == 0


def test_aux_loss_is_optional_and_differentiable():
    moe = make_moe(aux_loss_coef=0.01)
    moe.train()
    moe(torch.randn(32, 16))
    assert moe.aux_loss > 0
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
