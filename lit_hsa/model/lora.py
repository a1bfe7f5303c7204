"""LoRA (Hu et al. 2021) for ``HSATransformer``: frozen base weights, trainable low-rank updates on chosen module
groups, and folding them back into plain weights.

Our own rather than ``peft``: peft needs transformers + accelerate (absent from the GPU image) and adapts
``nn.Linear`` modules, while our routed experts are stacked ``[E, in, out]`` parameters. Two adapters:

- ``LoRALinear``: an ``nn.Linear`` subclass holding the same ``weight``/``bias`` Parameters (so base state-dict keys
  are unchanged and a base checkpoint loads as is) plus ``lora_A`` [r, in], ``lora_B`` [out, r] (loralib's layout).
- ``ExpertLoRA``: per-expert ``A`` [E, in, r], ``B`` [E, r, out] for each of ``MoE.w_gate/w_up/w_down``, called from
  ``MoE._expert_linear``. The update is applied to the input, ``x @ A[e] @ B[e]``, not as a merged weight
  ``W[e] + A[e] @ B[e]``: that would build (and keep for backward) an [in, out] matrix per expert and step.

Every adapter parameter name contains a component starting with ``lora_`` (``is_adapter_key``); B starts at zero so
an adapted model starts equal to its base. Module groups (``config.LORA_TARGETS``) are mapped in ``lora_sites``.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lit_hsa.model.attention import SelfAttention
from lit_hsa.model.config import ConfigError
from lit_hsa.model.hsa import ChunkMemory, HSABlock, Retrieval
from lit_hsa.model.moe import ExpertGroups, MoE, SwiGLU, grouped_matmul


class LoRALinear(nn.Linear):
    """y = x Wᵀ + b + scale · dropout(x) Aᵀ Bᵀ, x: [..., in] → [..., out]; W, b frozen (the wrapped Linear's)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse the base Parameters, allocate none
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale · B A (same dtype and device)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter((self.weight + self.scale * self.lora_B @ self.lora_A).detach())
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach())
        return plain


class ExpertLoRA(nn.Module):
    """Low-rank updates of one MoE's stacked experts: for w ∈ {gate, up, down} of shape [E, in, out], ``lora_<w>_A``
    [E, in, r] and ``lora_<w>_B`` [E, r, out]; expert e's ``x @ w[e]`` gains ``scale · dropout(x) @ A[e] @ B[e]``."""

    NAMES = ("gate", "up", "down")

    def __init__(self, moe: MoE, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        for name in self.NAMES:
            w = getattr(moe, f"w_{name}")
            E, fan_in, fan_out = w.shape
            A = torch.empty(E, fan_in, rank, device=w.device, dtype=w.dtype)
            bound = 1 / math.sqrt(fan_in)  # what kaiming_uniform_(a=√5) gives LoRALinear's [r, in] A
            setattr(self, f"lora_{name}_A", nn.Parameter(A.uniform_(-bound, bound)))
            setattr(self, f"lora_{name}_B", nn.Parameter(torch.zeros(E, rank, fan_out, device=w.device, dtype=w.dtype)))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, name: str, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """x: [n, in] grouped by expert (``moe.grouped_matmul``'s layout) → the updates [n, out] of each row's
        expert's ``w_<name>``: two grouped matmuls through the rank-r space."""
        A, B = getattr(self, f"lora_{name}_A"), getattr(self, f"lora_{name}_B")
        low = grouped_matmul(self.dropout(x), A.to(x.dtype), groups)
        return grouped_matmul(low, B.to(x.dtype), groups) * self.scale

    def delta(self, name: str) -> torch.Tensor:
        """[E, in, out]: what merging adds to ``w_<name>``."""
        return self.scale * torch.bmm(getattr(self, f"lora_{name}_A"), getattr(self, f"lora_{name}_B"))


def _in_chunk_encoder(name: str) -> bool:
    return name.split(".")[0] == "memory"


def lora_sites(model: nn.Module) -> list[tuple[str, str]]:
    """(qualified module name, group) of everything LoRA can adapt: nn.Linear modules, and MoE modules (their stacked
    experts). Groups: attention = q/k/v/o of the blocks' SWA / full attention and of HSA; retrieval = the retrieval
    query and the whole chunk encoder (its layers, landmark, HSA key/value projections: they decide what is found);
    experts = routed experts + shared expert; router; ffn = dense SwiGLU of the blocks. Only the LM head (tied to the
    embedding by default) is in no group."""
    sites = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, MoE):
            sites += [(name, "experts"), (prefix + "router", "router")]
        elif isinstance(m, SwiGLU):
            group = "experts" if name.endswith(".shared") else "retrieval" if _in_chunk_encoder(name) else "ffn"
            sites += [(prefix + p, group) for p in ("w_gate", "w_up", "w_down")]
        elif isinstance(m, SelfAttention):
            group = "retrieval" if _in_chunk_encoder(name) else "attention"
            sites += [(prefix + p, group) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        elif isinstance(m, HSABlock):
            sites += [(prefix + "q_proj", "attention"), (prefix + "o_proj", "attention")]
        elif isinstance(m, Retrieval):
            sites.append((prefix + "q_proj", "retrieval"))
        elif isinstance(m, ChunkMemory):
            sites += [(prefix + p, "retrieval") for p in ("landmark", "k_proj", "v_proj")]
    return sites


class LoRASettings(Protocol):
    """What ``apply_lora`` reads (``FinetuneConfig`` has these fields): the module groups (``LORA_TARGETS``), the
    adapters' rank, scale numerator (the update is scaled by alpha / rank) and input dropout."""

    lora_targets: Collection[str]
    lora_rank: int
    lora_alpha: float
    lora_dropout: float


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def apply_lora(model: nn.Module, cfg: LoRASettings) -> int:
    """Freeze every parameter of ``model`` and attach adapters to the groups in ``cfg.lora_targets``, in place.
    Returns the number of trainable (adapter) parameters; a selection that matches nothing is a ConfigError."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, group in lora_sites(model):
        if group not in cfg.lora_targets:
            continue
        module = model.get_submodule(name)
        if isinstance(module, MoE):
            module.lora_experts = ExpertLoRA(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        else:
            _replace(model, name, LoRALinear(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_trainable == 0:
        raise ConfigError(f"finetune.lora_targets {list(cfg.lora_targets)} match no module of this model "
                          "(e.g. experts/router need model.moe: true)")
    return n_trainable


def cast_frozen_matrices(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen matrices of a LoRA-adapted ``model`` (linear weights and stacked experts) to ``dtype``, in
    place; the input embedding (it feeds the fp32 residual stream, and is the head too when tied), norms, biases and
    the adapters keep their dtype. Returns the bytes saved."""
    saved = 0
    embedding = model.embed.weight
    for p in model.parameters():
        if not p.requires_grad and p.dim() >= 2 and p is not embedding and p.dtype != dtype:
            before = p.numel() * p.element_size()
            p.data = p.data.to(dtype)
            saved += before - p.numel() * p.element_size()
    return saved


def is_adapter_key(key: str) -> bool:
    """True for the state-dict keys of adapter weights (a dotted component starting with ``lora_``)."""
    return any(part.startswith("lora_") for part in key.split("."))


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` less its frozen parameters: the adapter weights and the persistent buffers (MoE
    ``expert_bias`` keeps balancing during fine-tuning; buffers are small). What a LoRA checkpoint holds."""
    return {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()
            if not (isinstance(v, nn.Parameter) and not v.requires_grad)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain modules, in place: the state dict then has exactly
    the keys of a model that never had adapters, and every parameter trains again. Returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
        elif isinstance(m, MoE) and m.lora_experts is not None:
            for w in ExpertLoRA.NAMES:
                getattr(m, f"w_{w}").add_(m.lora_experts.delta(w).to(getattr(m, f"w_{w}").dtype))
            del m.lora_experts  # back to the plain attribute
            m.lora_experts = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model
