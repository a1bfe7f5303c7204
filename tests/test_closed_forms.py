"""Quantities with a closed form, pinned to values worked out here from their definitions (not to another path of
our own code): the learning-rate schedule, the MoE balance loss and balancing bias step, training FLOPs with tied
and untied embeddings, the LoRA scale (dense and expert adapters), step schedules under gradient accumulation, the
sampling distribution (temperature, nucleus), RMSNorm and the token-weighted validation loss. How this project
tests: tests/README.md."""
import math
import re

import pytest
import torch

from lit_hsa.config import ConfigError, OptimConfig
from lit_hsa.model.lora import ExpertLoRA, LoRALinear
from lit_hsa.model.moe import MoE
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.flops import training_flops_per_token
from lit_hsa.training.module import lr_lambda
from tests.helpers import fit, scalars, tiny

# ------------------------------------------------------------------------------------------------ LR schedule

COSINE = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, schedule="cosine")


@pytest.mark.parametrize("step, multiplier", [
    (0, 0.25),  # the first step trains at lr / warmup_steps, not at 0
    (3, 1.0),  # warm-up ends at the full rate
    (4, 1.0),  # the cosine starts at its top
    (12, 0.55),  # halfway through the cosine (steps 4..20): (1 + 0.1) / 2
    (20, 0.1),  # max_steps: exactly min_lr / lr
    (27, 0.1),  # past max_steps (a resumed run keeps the horizon): stays at min_lr
])
def test_cosine_schedule_anchor_values(step, multiplier):
    assert lr_lambda(step, COSINE, max_steps=20) == pytest.approx(multiplier, abs=1e-12)


def test_constant_schedule_is_flat_after_warm_up():
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, schedule="constant")
    assert [lr_lambda(s, cfg, 10) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_lambda(0, OptimConfig(lr=1e-3, warmup_steps=0, schedule="cosine", min_lr=0.0), 10) == 1.0


def test_logged_learning_rate_follows_the_schedule(tmp_path):
    """The rate the optimizer used at each step, as TensorBoard shows it: warm-up from lr / 2 (2 warm-up steps),
    then a cosine from 3e-3 to 3e-4 over steps 2..6."""
    run = fit(tmp_path, "lr", "trainer.max_steps=6", "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.schedule=cosine")
    lr = scalars(run, "lr-AdamW/pg1")
    expected = {0: 1.5e-3, 1: 3e-3, 2: 3e-3, 3: 3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi / 4)),
                4: 1.65e-3, 5: 3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(3 * math.pi / 4))}
    assert sorted(lr) == sorted(expected)
    for step, value in expected.items():
        assert lr[step] == pytest.approx(value, rel=1e-6), step


def test_lr_scale_puts_matching_parameters_in_scaled_groups():
    """optim.lr_scale: each parameter whose name matches a pattern (the first that matches) trains at lr × scale,
    with weight decay on matrices only as everywhere; the others stay in the two unscaled groups."""
    from lit_hsa.training.module import HSALitModule

    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, lr_scale=[["retrieval|memory\\.landmark", 10], ["memory", 3]])
    cfg.validate()
    module = HSALitModule(tiny(), cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(module.named_parameters())
    assert len(group_of) == len(names)  # every parameter in exactly one group
    for name, p in names.items():
        scale = 10 if re.search("retrieval|memory\\.landmark", name) else 3 if "memory" in name else 1
        decay = 0.1 if p.dim() >= 2 and "embed" not in name else 0.0
        group = group_of[id(p)]  # initial_lr: the group's rate before the schedule's multiplier
        assert (group["initial_lr"], group["weight_decay"]) == (pytest.approx(1e-3 * scale), decay), name
    assert {"model.memory.landmark.weight", "model.upper.0.retrieval.q_proj.weight", "model.memory.cls"} <= set(names)
    assert group_of[id(names["model.memory.landmark.weight"])]["initial_lr"] == pytest.approx(1e-2)  # first wins
    assert group_of[id(names["model.memory.cls"])]["initial_lr"] == pytest.approx(3e-3)
    with pytest.raises(ConfigError, match="'nothing_here' matches no trainable parameter"):
        HSALitModule(tiny(), OptimConfig(lr_scale=[["nothing_here", 2]])).configure_optimizers()
    for bad, needle in (([["(", 2]], "bad pattern"), ([["x", 0]], r"\[pattern, scale > 0\]"),
                        ([["x"]], "entries are")):
        with pytest.raises(ConfigError, match=needle):
            OptimConfig(lr_scale=bad).validate()


def test_scaled_groups_follow_the_schedule(tmp_path):
    """The logged rate of a scaled group is the schedule's rate × its scale at every step (an override as a user
    writes it, the pattern quoted)."""
    run = fit(tmp_path, "lr", "trainer.max_steps=3", "optim.lr=2e-3", "optim.warmup_steps=2",
              "optim.lr_scale=[['retrieval|memory', 5]]")
    base, scaled = scalars(run, "lr-AdamW/pg1"), scalars(run, "lr-AdamW/pg3")
    assert sorted(base) == [0, 1, 2] and base[0] == pytest.approx(1e-3)
    for step in base:
        assert scaled[step] == pytest.approx(5 * base[step], rel=1e-6), step


def test_validation_loss_is_the_token_weighted_mean_over_batches():
    """val/loss = Σ over batches of the summed next-token cross-entropy / Σ of their targets, not the mean of the
    batch means: two batches with 11 and 2 targets, each target's loss -log softmax(logits)[label] computed here in
    float64."""
    from lit_hsa.model.loss import IGNORE_INDEX
    from lit_hsa.training.module import HSALitModule

    torch.manual_seed(0)
    module = HSALitModule(tiny(attention="swa"), OptimConfig(lr=1e-3)).eval()
    total, targets, means = 0.0, 0, []
    with torch.no_grad():
        for i, n in enumerate((11, 2)):
            ids, labels = torch.randint(0, 64, (1, 12)), torch.randint(0, 64, (1, 12))
            labels[0, n:] = IGNORE_INDEX
            module.validation_step({"input_ids": ids, "labels": labels}, i)
            logp = module.model(ids)[0].double().log_softmax(-1)[:n]
            losses = -logp.gather(1, labels[0, :n, None])
            total, targets = total + float(losses.sum()), targets + n
            means.append(float(losses.mean()))
    assert abs(sum(means) / 2 - total / targets) > 1e-2  # the two means differ: the weighting is seen
    assert float(module.val_loss.compute()) == pytest.approx(total / targets, rel=1e-5)


# ------------------------------------------------------------------------------------------------ MoE balance loss


def test_moe_balance_loss_equals_the_switch_formula_by_hand():
    """aux = coef · E · Σ_e (share of the N·k assignments that went to e) · (mean over tokens of e's router
    probability, normalised over experts), with the *unbiased* sigmoid scores: the balance bias steers selection
    only. Four tokens routed through a hand-set router and a bias that overturns one choice."""
    moe = MoE(2, n_experts=3, experts_per_token=1, expert_hidden=16, n_shared_experts=0, aux_loss_coef=0.5)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.1]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.3, 0.0]])
    moe.train()
    moe(x)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    scores = [[s(2.0), s(0.0), s(1.0)], [s(0.0), s(2.0), s(1.0)], [s(2.0), s(2.0), s(2.0)], [s(0.6), s(0.0), s(0.3)]]
    # token 3: 0.646 for expert 0 against 0.574 + 0.1 for expert 2: the bias overturns the choice
    chosen = [max(range(3), key=lambda e: row[e] + (0.1 if e == 2 else 0.0)) for row in scores]
    assert chosen == [0, 1, 2, 2]
    share = [chosen.count(e) / 4 for e in range(3)]
    prob = [sum(row[e] / sum(row) for row in scores) / 4 for e in range(3)]
    expected = 0.5 * 3 * sum(f * p for f, p in zip(share, prob))
    assert float(moe.aux_loss) == pytest.approx(expected, rel=1e-6)
    assert moe.load_accum.tolist() == [1.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------ FLOPs


def count_matmul_parameters(model: HSATransformer) -> int:
    """Every weight that multiplies activations once per token in an active path: all parameters, minus the routed
    experts a token does not use, minus the embedding table when it is only looked up (untied head)."""
    total = sum(p.numel() for p in model.parameters())
    for moe in model.moe_layers():
        total -= moe.routed_parameters() * (moe.n_experts - moe.top_k) // moe.n_experts
    if model.lm_head is not None:
        total -= model.embed.weight.numel()
    return total


@pytest.mark.parametrize("moe", [False, True])
def test_flops_count_the_head_matmul_once_whether_tied_or_untied(moe):
    """6 FLOPs per matmul parameter per token: with a tied head the embedding table is the head's matmul; untied,
    the table is a free lookup and the separate head is the matmul. Same shapes, same FLOPs."""
    flops = {}
    for tied in (True, False):
        cfg = tiny(tie_embeddings=tied, moe=moe, vocab_size=500, attention="full")
        model = HSATransformer(cfg)
        attention = 12 * cfg.n_heads * cfg.head_dim * (64 + 1) / 2 * cfg.n_layers  # causal T=64: mean 32.5 keys
        flops[tied] = training_flops_per_token(cfg, model.num_parameters()[1], 64)
        assert flops[tied] == pytest.approx(6 * count_matmul_parameters(model) + attention, rel=1e-9)
    assert flops[True] == pytest.approx(flops[False], rel=1e-9)


# ------------------------------------------------------------------------------------------------ LoRA scale


def test_lora_update_is_scaled_by_alpha_over_rank():
    """y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ, for a dense layer and for an expert's matmul."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), rank=4, alpha=12.0)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    expected = x @ layer.weight.T + layer.bias + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)

    moe = MoE(16, n_experts=2, experts_per_token=1, expert_hidden=16, n_shared_experts=0).eval()
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(w, std=0.2)
    moe.lora_experts = lora = ExpertLoRA(moe, rank=4, alpha=12.0)
    for name in ("gate", "up", "down"):
        torch.nn.init.normal_(getattr(lora, f"lora_{name}_B"), std=0.3)
    tokens = torch.randn(4, 16)
    chosen = (torch.sigmoid(moe.router(tokens)) + moe.expert_bias).argmax(-1)

    def expert(name, x, e):  # x @ w[e] + 3 · x @ A[e] @ B[e]
        A, B = getattr(lora, f"lora_{name}_A")[e], getattr(lora, f"lora_{name}_B")[e]
        return x @ getattr(moe, f"w_{name}")[e] + 3.0 * (x @ A @ B)

    want = torch.stack([expert("down", torch.nn.functional.silu(expert("gate", t, e)) * expert("up", t, e), e)
                        for t, e in zip(tokens, chosen)])
    torch.testing.assert_close(moe(tokens), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ step schedules


def test_schedules_follow_the_optimizer_step_under_gradient_accumulation(tmp_path):
    """With 2 micro-batches per step, top-k and window change at optimizer step 2 (batch 4), not at batch 2."""
    run = fit(tmp_path, "accumulate", "trainer.max_steps=4", "trainer.accumulate_grad_batches=2",
              "trainer.topk_schedule=[[0,4],[2,1]]", "trainer.swa_window_schedule=[[0,16],[2,8]]",
              "trainer.log_every_n_steps=1")
    assert scalars(run, "schedule/hsa_topk") == {0: 4.0, 1: 4.0, 2: 1.0, 3: 1.0}
    assert scalars(run, "schedule/swa_window") == {0: 16.0, 1: 16.0, 2: 8.0, 3: 8.0}
    # the learning rate too (tiny.yaml: 3e-3 cosine to 3e-4, FAST: 2 warm-up steps), one value per optimizer step
    lr = scalars(run, "lr-AdamW/pg1")
    assert sorted(lr) == [0, 1, 2, 3]
    for step, value in {0: 1.5e-3, 1: 3e-3, 2: 3e-3, 3: 1.65e-3}.items():
        assert lr[step] == pytest.approx(value, rel=1e-6), step


# ------------------------------------------------------------------------------------------------ sampling, norms


def test_sampling_draws_from_the_tempered_nucleus(monkeypatch):
    """sample_next draws from softmax(logits / T), restricted to the nucleus (the most likely tokens whose mass
    first reaches top_p) and renormalised: the distribution handed to the sampler, worked out by hand."""
    from lit_hsa.inference import generate as generate_module

    seen = []
    monkeypatch.setattr(generate_module.torch, "multinomial",
                        lambda probs, n, generator=None: seen.append(probs / probs.sum(-1, keepdim=True))
                        or torch.zeros(probs.shape[0], n, dtype=torch.long))
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature, top_p in [(0.5, 1.0), (2.0, 1.0), (1.0, 0.8)]:
        generate_module.sample_next(logits, temperature, top_p)
        p = [math.exp(v / temperature) for v in (2.0, 1.0, 0.0, -1.0)]
        p = [v / sum(p) for v in p]  # T=1: 0.644, 0.237, 0.087, 0.032; the first two reach 0.8
        if top_p < 1:
            p = [p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0.0, 0.0]
        torch.testing.assert_close(seen[-1][0].double(), torch.tensor(p, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_rms_norm_is_x_over_root_mean_square_plus_eps_times_weight():
    from lit_hsa.model.attention import RMSNorm

    norm = RMSNorm(3, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
    x = torch.tensor([[3.0, 0.0, 4.0]])  # mean square 25/3; + eps 0.5 = 53/6
    scale = 1 / math.sqrt(53 / 6)
    torch.testing.assert_close(norm(x), torch.tensor([[3 * scale, 0.0, -4 * scale]]), rtol=1e-6, atol=1e-7)


def test_balance_bias_steps_by_the_sign_of_the_load_gap():
    """Aux-loss-free balancing (DeepSeek-V3): each update moves an expert's bias by exactly ± rate, up when its
    load is below the mean, down above it, unchanged at the mean, whatever the size of the gap."""
    moe = MoE(4, n_experts=4, experts_per_token=1, expert_hidden=8, n_shared_experts=0, bias_update_rate=0.01)
    moe.update_bias(torch.tensor([1.0, 300.0, 99.0, 100.0]))  # mean 125
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.01, -0.01, 0.01, 0.01]), rtol=0, atol=0)
    moe.update_bias(torch.tensor([5.0, 5.0, 5.0, 5.0]))  # balanced: no change
    moe.update_bias(torch.tensor([0.0, 0.0, 0.0, 0.0]))  # no tokens: no change
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.01, -0.01, 0.01, 0.01]), rtol=0, atol=0)
