"""MoE routing on a hand-routed batch, worked out by hand: which expert each token goes to, the load each mode
counts, and the output as the gated sum of the chosen experts (the formulas: lit_hsa/model/moe.py's docstring)."""
import math

import pytest
import torch

from lit_hsa.model.moe import MoE


def hand_routed_moe() -> tuple[MoE, torch.Tensor]:
    """3 experts, top-1, no shared expert; router rows e0 = (2, 0), e1 = (0, 2), e2 = (1, 1) and a bias of 0.1 on
    e2. Four tokens: (1, 0) → e0, (0, 1) → e1, (1, 1) → all three score σ(2) and the bias picks e2, (0.3, 0) →
    e0 scores σ(0.6) = 0.646 < σ(0.3) + 0.1 = 0.674 for e2: the bias overturns that choice."""
    moe = MoE(2, n_experts=3, experts_per_token=1, expert_hidden=4, n_shared_experts=0)
    torch.manual_seed(0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.1]))
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            w.normal_(std=0.5)
    return moe, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.3, 0.0]])


@pytest.mark.parametrize("training", [True, False])
def test_expert_load_is_counted_in_training_only_and_the_output_is_the_chosen_experts(training):
    """Training counts the tokens each expert received ([1, 1, 2]: the balancing bias moves by it after the step);
    eval (validation, generation) counts none, also when the batch is large enough to run sorted by expert
    (N·k = 4 > E = 3). In both modes a token's output is its one chosen expert's SwiGLU: with top-1 the gate
    renormalises to exactly 1."""
    moe, x = hand_routed_moe()
    moe.train(training)
    with torch.no_grad():
        y = moe(x)
    assert moe.load_accum.tolist() == ([1.0, 1.0, 2.0] if training else [0.0, 0.0, 0.0])

    def expert(e: int, t: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.silu(t @ moe.w_gate[e]) * (t @ moe.w_up[e])) @ moe.w_down[e]

    want = torch.stack([expert(e, t) for e, t in zip([0, 1, 2, 2], x)])
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-7)


def test_top2_gates_are_the_unbiased_scores_renormalised():
    """Top-2 of the hand-routed router for the token (0.3, 0): scores σ(0.6), σ(0), σ(0.3) (+0.1 bias on e2 for
    the choice only) → e0 and e2, gated σ(0.6) / (σ(0.6) + σ(0.3)) and σ(0.3) / (σ(0.6) + σ(0.3))."""
    moe, x = hand_routed_moe()
    moe.top_k = 2
    moe.eval()
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    g0, g2 = s(0.6) / (s(0.6) + s(0.3)), s(0.3) / (s(0.6) + s(0.3))
    t = x[3]
    with torch.no_grad():
        y = moe(x[3:])[0]
        want = sum(g * (torch.nn.functional.silu(t @ moe.w_gate[e]) * (t @ moe.w_up[e])) @ moe.w_down[e]
                   for g, e in ((g0, 0), (g2, 2)))
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-7)
