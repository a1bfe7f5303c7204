import json
import subprocess
import sys

import torch

from lit_hsa.model.moe import MoE, expert_load_stats
from tests.helpers import ROOT, random_moe


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


def test_aux_loss_is_optional_and_its_gradient_is_the_formulas():
    """The balance loss's value and router gradient equal an independent float64 evaluation of
    coef · E · Σ_e share_e · mean_t(s_te / Σ_e' s_te'), s = sigmoid(W x), the shares (counts) held constant."""
    torch.manual_seed(0)
    off = make_moe()
    off.train()
    off(torch.randn(8, 16))
    assert float(off.aux_loss) == 0.0  # coefficient 0 (the default): off
    moe = make_moe(aux_loss_coef=0.01)
    moe.train()
    x = torch.randn(32, 16)
    moe(x)
    moe.aux_loss.backward()
    counts = moe.load_accum.double()
    w = moe.router.weight.detach().double().requires_grad_(True)
    s = torch.sigmoid(x.double() @ w.t())
    expected = 0.01 * moe.n_experts * (counts / counts.sum() * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
    expected.backward()
    assert float(moe.aux_loss) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(moe.router.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------- grouped experts (no host synchronisation)

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lit_hsa.kernels.dispatch as dispatch  # noqa: E402

# Operators that read a device tensor back to the host (a GPU stream stalls until it is there): item()/tolist()
# (_local_scalar_dense), data-dependent output sizes (nonzero, masked_select, unique, repeat_interleave without an
# output size), and CUDA's bincount (it reads the input's range to size its output).
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_dim", "unique_consecutive",
               "repeat_interleave", "bincount", "equal", "is_nonzero")


class OpRecorder(TorchDispatchMode):
    """Every aten operator called while active (forward and backward), as our code calls it: the ops inside an
    operator's own implementation (e.g. the CPU reference of grouped_mm) are not seen."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def moe_training_step_ops(moe) -> list[str]:
    x = torch.randn(2, 24, moe.router.in_features, requires_grad=True)
    with OpRecorder() as rec:
        moe(x).square().mean().backward()
    return rec.ops


def syncing(ops: list[str]) -> set[str]:
    return {op for op in ops if any(op.split(".")[0].lstrip("_") == s.lstrip("_") for s in SYNCING_OPS)}


@pytest.fixture
def backend():
    yield dispatch.set_expert_backend
    dispatch.set_expert_backend("auto")


def grouped_moe(lora: bool = False):
    """Widths of 16-byte multiples (grouped GEMMs need them): d 32, 8 experts of width 16, top 2, shared expert."""
    return random_moe(32, 8, 2, 16, lora)


@pytest.mark.parametrize("lora", [False, True])
def test_grouped_experts_equal_the_expert_loop_in_fp32(backend, lora):
    """Same outputs, input gradients and parameter (or adapter) gradients as the loop over experts, exactly in fp32
    up to summation order; and the per-token definition."""
    results = []
    for name in ("grouped", "loop"):
        backend(name)
        moe = grouped_moe(lora)
        x = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = moe(x)
        y.square().mean().backward()
        grads = {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}
        results.append((y.detach(), x.grad, grads, moe.load_accum.clone()))
    (y, gx, grads, load), (y_loop, gx_loop, grads_loop, load_loop) = results
    torch.testing.assert_close(y, y_loop, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gx, gx_loop, atol=1e-6, rtol=1e-6)
    assert grads.keys() == grads_loop.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], grads_loop[n], atol=1e-6, rtol=1e-5, msg=n)
    assert torch.equal(load, load_loop) and load.sum() == 3 * 20 * 2


def test_grouped_moe_matches_the_per_token_definition(backend):
    backend("grouped")
    moe = grouped_moe()
    x = torch.randn(40, 32)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["grouped", "loop"])
def test_moe_gradients_equal_the_per_token_definitions(backend, name):
    """Input, expert, router and shared-expert gradients (fp32) equal autograd through ``naive_moe``, which indexes
    each token's own experts: the routing of rows to experts and back (and the gates folded into the hidden rows)
    has the per-token definition's backward."""
    backend(name)
    moe = grouped_moe()
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    target = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for forward in (moe, lambda x: naive_moe(moe, x)):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        (forward(x) * target).sum().backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in moe.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-5, msg=n)


def meta_training_step(lora: bool) -> None:
    """A MoE layer's forward + backward on the meta device (bf16, as on GPUs): tensors there have shapes but no
    data, so any operator that reads values back to the host (item, tolist, nonzero, ...) raises."""
    moe = grouped_moe(lora).to("meta", torch.bfloat16)
    x = torch.randn(2, 24, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    moe(x).float().square().mean().backward()


@pytest.mark.parametrize("lora", [False, True])
def test_moe_training_step_runs_no_host_synchronising_operator(backend, lora):
    """A MoE layer's forward + backward with grouped experts never needs device data on the host: it runs on the
    meta device, and the operators it calls on the CPU include none of ``SYNCING_OPS`` (on a GPU,
    ``test_gpu_moe_step_under_sync_debug_mode`` checks the real thing). The loop over experts reads the group sizes
    back (``tolist``), which the meta run catches: the check can fail."""
    backend("grouped")
    meta_training_step(lora)
    assert syncing(moe_training_step_ops(grouped_moe(lora))) == set()
    backend("loop")
    with pytest.raises(NotImplementedError, match="meta"):
        meta_training_step(lora)


def test_grouped_experts_need_aligned_widths_and_fall_back_otherwise(backend):
    """Widths that are not 16-byte multiples (expert width 8 in fp32 is 32 bytes, fine; rank 4 in bf16 is 8 bytes,
    not) take the loop, with the same results."""
    backend("grouped")
    x = torch.zeros(4, 32)
    assert dispatch.grouped_mm_applies(x, torch.zeros(2, 32, 16))
    assert not dispatch.grouped_mm_applies(x.bfloat16(), torch.zeros(2, 32, 4, dtype=torch.bfloat16))
    assert not dispatch.grouped_mm_applies(x, torch.zeros(2, 32, 16, dtype=torch.bfloat16))  # mixed dtypes
    backend("loop")
    assert not dispatch.grouped_mm_applies(x, torch.zeros(2, 32, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_moe_step_under_sync_debug_mode():
    """On a GPU, under bf16 autocast: a MoE layer's training step with grouped experts runs with CUDA's
    synchronisation debug mode set to raise on any synchronising call, and matches the loop within bf16 tolerance."""
    moe = MoE(256, n_experts=16, experts_per_token=4, expert_hidden=128).cuda().train()
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(w, std=0.05)
    x = torch.randn(4, 512, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        moe(x).float().square().mean().backward()  # warm-up (lazy initialisations may synchronise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = moe(x)
            y.float().square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        dispatch.set_expert_backend("loop")
        try:
            y_loop = moe(x)
        finally:
            dispatch.set_expert_backend("auto")
    torch.testing.assert_close(y.float(), y_loop.float(), atol=2e-2, rtol=2e-2)


def test_bench_moe_profile_smoke_on_cpu(tmp_path):
    """``bench_moe.py --profile`` runs end to end at toy size: every layer's ops split into forward and backward,
    shares of one step that add up to at most 1, the expert matmuls found in both passes."""
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_moe.py", "--tokens", "128", "--d-model", "32",
                           "--experts", "4", "--top-k", "2", "--expert-hidden", "16", "--device", "cpu", "--warmup",
                           "1", "--iters", "1", "--profile", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = json.loads(out.read_text())["rows"][0]["profile"]
    assert set(profile) == {"moe_grouped", "dense"}
    for prof in profile.values():
        assert prof["ops"] and 0 < sum(op["share"] for op in prof["ops"]) <= 1 + 1e-6
        assert {op["pass"] for op in prof["ops"] if op["op"] == "aten::mm"} == {"fwd", "bwd"}
