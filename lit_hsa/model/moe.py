"""Mixture-of-Experts feed-forward (Ling-2.0 / DeepSeek-V3 style): routed SwiGLU experts + shared expert,
auxiliary-loss-free load balancing with a per-expert selection bias, optional small balance loss."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lit_hsa.kernels.dispatch import grouped_mm_applies
from lit_hsa.kernels.moe import gated_swiglu, gather_sum
from lit_hsa.model.config import ModelConfig


class ExpertGroups:
    """Rows sorted by expert, ``counts`` [E] of them per expert (on the device). ``ends`` (cumulative, int32) serves
    grouped GEMMs without leaving the device; ``sizes`` serves the loop over experts and is read back to the host
    once (one synchronisation on a GPU), however many matmuls of the layer use it."""

    def __init__(self, counts: torch.Tensor):
        self.counts = counts
        self.ends = counts.cumsum(0).to(torch.int32)

    @functools.cached_property
    def sizes(self) -> list[int]:
        return self.counts.tolist()


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """x: [n, in] with rows grouped by expert (``groups``), w: [E, in, out] → [n, out], the rows of group e times
    w[e]. One grouped GEMM where it applies (no host synchronisation); otherwise a loop over experts (free of it on
    the CPU); ``kernels.dispatch`` decides."""
    if grouped_mm_applies(x, w):
        return torch._grouped_mm(x, w, offs=groups.ends)
    return torch.cat([xe @ w[e] for e, xe in enumerate(torch.split(x, groups.sizes))])


class Route:
    """Moves rows between token order ([N, d], token t) and expert order ([N*k, d], the N*k assignments sorted by
    expert, ``order`` [N*k]: sorted position → assignment t*k + j) with row gathers only, both ways. Indexing
    (``x[token_of]``) would do the same forward, but its backward is an accumulating scatter (atomics, or a sort of
    the indices on CUDA); here the backward of each direction is the other direction's gather."""

    def __init__(self, order: torch.Tensor, top_k: int):
        self.top_k = top_k
        self.token_of = order // top_k  # [N*k]: the token of each sorted row
        self.position_of = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))

    def to_experts(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x: [N, d] → [N*k, d] in ``dtype``: each token's row once per assignment, in expert order."""
        return _Routed.apply(x, self, True, dtype)

    def to_tokens(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y: [N*k, d] in expert order → [N, d] in ``dtype``: each token's k rows summed (in fp32)."""
        return _Routed.apply(y, self, False, dtype)

    def gather_to_experts(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype).index_select(0, self.token_of)

    def gather_to_tokens(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return gather_sum(y, self.position_of, self.top_k, dtype)  # each token's k rows summed in fp32


class _Routed(torch.autograd.Function):
    """``Route``'s two directions; each is the transpose of the other, so each one's backward is the other."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, route: Route, to_experts: bool, dtype: torch.dtype) -> torch.Tensor:
        ctx.route, ctx.to_experts, ctx.in_dtype = route, to_experts, x.dtype
        return route.gather_to_experts(x, dtype) if to_experts else route.gather_to_tokens(x, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        route, dtype = ctx.route, ctx.in_dtype
        dx = route.gather_to_tokens(grad, dtype) if ctx.to_experts else route.gather_to_experts(grad, dtype)
        return dx, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # (meta has no autocast)
    return torch.get_autocast_dtype(device) if on else x.dtype


class SwiGLU(nn.Module):
    """x: [..., d] → [..., d] with hidden width ``hidden``."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=bias)
        self.w_up = nn.Linear(d_model, hidden, bias=bias)
        self.w_down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def side_by_side(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated along the last dimension (one tensor as it is, not copied)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=-1)


class MoE(nn.Module):
    """Routed experts with top-k sigmoid routing + shared expert(s).

    Selection uses ``sigmoid(router(x)) + expert_bias``; the gates use the un-biased scores of the chosen experts,
    renormalised to sum to 1. ``expert_bias`` is moved towards balance after each optimizer step by
    ``update_bias(load)`` with the expert load summed over micro-batches and ranks (``load_accum``).
    Tokens are sorted by expert and the experts run as grouped matmuls over their contiguous slices
    (``grouped_matmul``): no Python loop over tokens, and where grouped GEMMs apply no host synchronisation either.
    """

    def __init__(self, d_model: int, n_experts: int, experts_per_token: int, expert_hidden: int,
                 n_shared_experts: int = 1, bias_update_rate: float = 1e-3, aux_loss_coef: float = 0.0):
        super().__init__()
        self.n_experts, self.top_k = n_experts, experts_per_token
        self.bias_update_rate, self.aux_loss_coef = bias_update_rate, aux_loss_coef
        self.router = nn.Linear(d_model, n_experts, bias=False)
        # Expert weights stacked as [E, in, out] so one expert is one contiguous slice.
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, expert_hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, expert_hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, expert_hidden, d_model))
        self.shared = SwiGLU(d_model, expert_hidden * n_shared_experts) if n_shared_experts > 0 else None
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        # Tokens routed to each expert since the last bias update (summed over micro-batches; reduced over ranks).
        self.register_buffer("load_accum", torch.zeros(n_experts), persistent=False)
        self.aux_loss = torch.zeros(())
        # Low-rank updates of the routed experts while LoRA fine-tuning (lit_hsa/model/lora.py attaches an ExpertLoRA).
        self.lora_experts: nn.Module | None = None

    def reset_parameters(self) -> None:
        """The balancing state starts at zero (the expert weights are drawn by the model's initialisation)."""
        nn.init.zeros_(self.expert_bias)
        nn.init.zeros_(self.load_accum)

    def routed_parameters(self) -> int:
        return self.w_gate.numel() + self.w_up.numel() + self.w_down.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] → [B, T, d]."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        n_tokens = xf.shape[0]
        scores = torch.sigmoid(self.router(xf).float())  # [N, E]
        chosen = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # bias steers selection only
        gates = scores.gather(1, chosen)
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-9)

        if not self.training and self.lora_experts is None and n_tokens * self.top_k <= self.n_experts:
            y = self._run_gathered(xf, chosen, gates)
            self.aux_loss = xf.new_zeros((), dtype=torch.float32)
        else:
            y = self._run_sorted(xf, scores, chosen, gates)
        if self.shared is not None:
            y = y + self.shared(xf)
        return y.view(shape)

    def _run_sorted(self, xf: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor,
                    gates: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, each expert run once on its slice; updates the load statistics and aux loss."""
        n_tokens = xf.shape[0]
        flat_expert = chosen.flatten()  # [N*k]: assignment j of token t at t*k + j
        order = flat_expert.argsort(stable=True)  # expert-sorted position → assignment
        # scatter_add, not bincount: CUDA's bincount reads the input's range back to the host
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=xf.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        route = Route(order, self.top_k)
        x_sorted = route.to_experts(xf, compute_dtype(xf))
        out_sorted = self._run_experts(x_sorted, ExpertGroups(counts), gates.flatten()[order])
        # Under autocast the experts return bf16 while xf is fp32: a token's k contributions (summed in fp32) come
        # back in the wider of the two dtypes (fp32 there; bf16 for a model cast to bf16).
        y = route.to_tokens(out_sorted, torch.promote_types(xf.dtype, out_sorted.dtype))

        if self.training:
            self.load_accum += counts.to(self.load_accum.dtype)
        if self.aux_loss_coef > 0 and self.training:
            # Switch-style balance loss: E · Σ_e (share of assignments to e) · (mean normalised router prob of e).
            frac = counts.float() / (n_tokens * self.top_k)
            prob = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
            self.aux_loss = self.aux_loss_coef * self.n_experts * (frac * prob).sum()
        else:
            self.aux_loss = xf.new_zeros((), dtype=torch.float32)
        return y

    def _run_gathered(self, xf: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Few tokens (decoding, N·k <= E): each token multiplies its own k experts' weights, gathered. No sort and
        no per-expert sizes read back to the host, so a decoding step can be captured as a CUDA graph; the copied
        weights are at most one copy of the experts in use."""
        x = xf[:, None, None, :]  # [N, 1, 1, d]
        w_gate, w_up, w_down = (getattr(self, f"w_{n}")[chosen].to(xf.dtype) for n in ("gate", "up", "down"))
        h = F.silu(x @ w_gate) * (x @ w_up)  # [N, k, 1, h]
        y = (h @ w_down).squeeze(2)  # [N, k, d]
        return (y * gates[..., None].to(y.dtype)).sum(dim=1)

    def _run_experts(self, x: torch.Tensor, groups: ExpertGroups, gates: torch.Tensor) -> torch.Tensor:
        """x: [N*k, d] grouped by expert (``groups``), in the matmuls' dtype; gates: [N*k] → [N*k, d], each row
        times its gate. Gate and up are one grouped GEMM (x is read once); the gate scales the hidden rows before the
        down projection (linear, so the same product, on a width-``expert_hidden`` tensor instead of ``d``)."""
        gate_up = self._expert_linear(x, groups, "gate", "up")  # [N*k, 2·hidden]: gate | up
        h = gated_swiglu(gate_up, gates)  # silu(gate) · up · gates, fused with its backward where a kernel runs
        return self._expert_linear(h, groups, "down")

    def _expert_linear(self, x: torch.Tensor, groups: ExpertGroups, *names: str) -> torch.Tensor:
        """x: [n, in] grouped by expert @ each expert's ``w_<name>`` [in, out], those of several names side by side
        (one grouped GEMM reads x once) → [n, Σ out], plus the LoRA updates when they are attached."""
        y = grouped_matmul(x, side_by_side([getattr(self, f"w_{name}").to(x.dtype) for name in names]), groups)
        if self.lora_experts is None:
            return y
        return y + side_by_side([self.lora_experts(name, x, groups) for name in names])

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones."""
        if self.bias_update_rate > 0 and load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.float().mean() - load.float())


def expert_load_stats(load: torch.Tensor) -> dict[str, float]:
    """Summary of one layer's expert load (tokens per expert): max violation = (max − mean) / mean."""
    load = load.float()
    mean = load.mean().clamp_min(1e-9)
    return {
        "max_violation": float((load.max() - mean) / mean),
        "min_share": float(load.min() / load.sum().clamp_min(1e-9)),
        "max_share": float(load.max() / load.sum().clamp_min(1e-9)),
    }


def make_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if cfg.moe and layer_idx >= cfg.first_dense_layers:
        return MoE(cfg.d_model, cfg.n_experts, cfg.experts_per_token, cfg.expert_hidden, cfg.n_shared_experts,
                   cfg.router_bias_update_rate, cfg.aux_loss_coef)
    return SwiGLU(cfg.d_model, cfg.ffn_hidden)
