"""The model's configuration: ``ModelConfig`` (shape and switches of ``HSATransformer``), the named presets
(litgpt style: ``ModelConfig.from_name("small")``) and the checks that give one-line ``ConfigError``s.

Self-contained on purpose: the model package (and the Hugging Face wrapper exported with it) needs this file and
the kernels, nothing of the data layer, the trainer or OmegaConf. ``ModelConfig`` is frozen: what a training
schedule changes while a model runs (retrieved chunks, SWA window) is the model's runtime state
(``HSATransformer.set_hsa_topk`` / ``set_swa_window``), never a rewrite of its config; ``dataclasses.replace``
makes a changed copy.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

ATTENTION_KINDS = ("hsa", "swa", "full")
HSA_RESIDUALS = ("bypass", "standard")
FUSIONS = ("softmax", "stick_breaking")
ATTN_BACKENDS = ("auto", "sdpa", "flex")
# LoRA module groups (lit_hsa/model/lora.py maps them to modules): attention = q/k/v/o of SWA, full and HSA attention;
# retrieval = retrieval query + chunk encoder (its layers, landmark and HSA key/value projections); experts = routed
# MoE experts + shared expert; router = MoE router; ffn = dense SwiGLU of the blocks.
LORA_TARGETS = ("attention", "retrieval", "experts", "router", "ffn")
# model.rope_scaling: rope_type → (required keys, optional keys), as transformers' modeling_rope_utils reads them.
ROPE_SCALING_KEYS = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")),
}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of ``HSATransformer`` (spec §2).

    Block layout: ``n_lower_layers`` SWA blocks, then (for ``attention: hsa``) the chunk memory is built once, then
    ``n_groups`` × (one HSA block + ``swa_layers_per_group`` SWA blocks). The ``swa``/``full`` baselines keep the same
    number of blocks but use sliding-window / full causal attention in every one and have no chunk memory.
    """

    name: str = "tiny"
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary, padded to a multiple of 64
    d_model: int = 128
    n_lower_layers: int = 2
    n_groups: int = 1
    swa_layers_per_group: int = 1
    n_heads: int = 4
    n_kv_heads: int = 2  # KV heads of the SWA / full attention layers (GQA)
    head_dim: int = 32
    swa_window: int = 64
    rope_base: float = 10000.0
    # RoPE frequency scaling, Hugging Face's `rope_scaling` / `rope_parameters` ({rope_type, factor, ...}): linear;
    # llama3 (low_freq_factor, high_freq_factor, original_max_position_embeddings); yarn
    # (original_max_position_embeddings; optional beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim,
    # truncate). Every RoPE of the model uses it (blocks, chunk encoder, decoding). null: plain RoPE
    rope_scaling: Optional[Dict[str, Any]] = None
    qk_norm: bool = True
    qkv_bias: bool = False  # biases on q/k/v of the SWA / full attention and the HSA blocks' SWA sub-layer (Qwen2)
    attn_out_bias: bool = False  # bias on their output projection (Llama / Qwen3 attention_bias)
    attention: str = "hsa"  # hsa | swa | full
    attn_backend: str = "auto"  # auto (flex_attention on CUDA, SDPA elsewhere) | sdpa | flex
    # --- HSA ---
    chunk_size: int = 32
    hsa_topk: int = 4
    hsa_heads: Optional[int] = None  # query heads of HSA layers; None: n_heads
    hsa_kv_heads: int = 1
    retrieval_dim: Optional[int] = None  # total over retrieval heads; None: d_model
    retrieval_norm: bool = False  # RMSNorm on retrieval queries and landmarks (QK-norm for chunk selection)
    shared_selection: bool = False  # one selection for all KV heads (paper's exact form) instead of one per KV head
    fusion: str = "softmax"  # softmax (paper Eq. 2) | stick_breaking (RAMba / authors' code)
    pos_decay: bool = False  # learned scalar × recency rank added to scores before fusion
    gumbel_noise: bool = False  # Gumbel noise on scores for the top-k choice, training only
    hsa_layer_swa: bool = False  # SWA sub-layer inside each HSA block (paper's form)
    hsa_swa_window: Optional[int] = None  # window of that sub-layer; None: swa_window
    hsa_residual: str = "bypass"  # bypass: h + FFN(norm(h + o)) | standard: h + o, then h + FFN(norm(h))
    # A learned scalar per HSA block multiplying its output o (starts at 1; at 0 in a dense model converted with it,
    # whose HSA output projection then starts random instead of zero: lit_hsa/interop/to_hsa.py)
    hsa_gate: bool = False
    softmax_off_by_one: bool = False  # +1 in each chunk's softmax denominator (authors' code option)
    encoder_layers: int = 1  # bidirectional layers of the chunk encoder; 0: landmark = Linear(mean(norm(chunk)))
    # --- FFN / MoE ---
    ffn_hidden: int = 384  # dense SwiGLU width
    moe: bool = True
    n_experts: int = 4
    experts_per_token: int = 2
    expert_hidden: int = 128
    n_shared_experts: int = 1
    first_dense_layers: int = 1  # the first blocks keep a dense FFN (Ling-2.0)
    router_bias_update_rate: float = 1e-3  # aux-loss-free balancing step (0 disables)
    aux_loss_coef: float = 0.0  # optional small sequence-level balance loss
    # --- misc ---
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def n_layers(self) -> int:
        return self.n_lower_layers + self.n_groups * (1 + self.swa_layers_per_group)

    @property
    def hsa_q_heads(self) -> int:
        return self.hsa_heads or self.n_heads

    @property
    def retrieval_heads(self) -> int:
        return 1 if self.shared_selection else self.hsa_kv_heads

    @property
    def retrieval_head_dim(self) -> int:
        return (self.retrieval_dim or self.d_model) // self.retrieval_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"model.name: unknown preset '{name}'{_suggest(name, PRESETS)}; presets: "
                              f"{', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def validate(self) -> None:
        check_choice("model.attention", self.attention, ATTENTION_KINDS)
        check_choice("model.attn_backend", self.attn_backend, ATTN_BACKENDS)
        check_choice("model.hsa_residual", self.hsa_residual, HSA_RESIDUALS)
        check_choice("model.fusion", self.fusion, FUSIONS)
        for key in ("d_model", "n_heads", "n_kv_heads", "head_dim", "swa_window", "chunk_size", "hsa_topk",
                    "hsa_kv_heads", "ffn_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"model.vocab_size must be >= 1 or null, got {self.vocab_size}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                              f"({self.n_kv_heads})")
        if self.hsa_q_heads % self.hsa_kv_heads:
            raise ConfigError(
                f"model.hsa_heads ({self.hsa_q_heads}) must be a multiple of model.hsa_kv_heads ({self.hsa_kv_heads})"
            )
        if self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"model.chunk_size must be a power of two, got {self.chunk_size}")
        if (self.retrieval_dim or self.d_model) % self.retrieval_heads:
            raise ConfigError(
                f"model.retrieval_dim ({self.retrieval_dim or self.d_model}) must divide into "
                f"{self.retrieval_heads} retrieval heads"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        check_rope_scaling(self.rope_scaling)
        if self.attention == "hsa" and self.n_groups < 1:
            raise ConfigError("model.n_groups must be >= 1 when model.attention is 'hsa'")
        if min(self.n_lower_layers, self.n_groups, self.swa_layers_per_group, self.encoder_layers) < 0:
            raise ConfigError("model layer counts (n_lower_layers, n_groups, swa_layers_per_group, encoder_layers) "
                              "must be >= 0")
        if self.moe:
            if self.n_experts < 1 or not 1 <= self.experts_per_token <= self.n_experts:
                raise ConfigError(
                    f"model.experts_per_token ({self.experts_per_token}) must be in [1, model.n_experts "
                    f"({self.n_experts})]"
                )
            if self.expert_hidden < 1:
                raise ConfigError(f"model.expert_hidden must be >= 1, got {self.expert_hidden}")


# Named presets (spec §2). Parameter counts are asserted in tests/test_config.py on the meta device.
PRESETS: dict[str, ModelConfig] = {
    # CPU tests and the default run: ~1.3M parameters, every component present (MoE, chunk encoder, HSA, GQA).
    # Its bias step is 10× DeepSeek-V3's 1e-3 so experts balance within a few hundred steps.
    "tiny": ModelConfig(router_bias_update_rate=1e-2),
    # The authors' published 345M SWA+HSA shape (8 lower SWA blocks + 2 groups × (HSA + 4 SWA), head dim 64, chunk 64,
    # top-k 32, SWA 512, HSA with 1 KV head) at width 640 so it lands at ~130M: one-GPU experiments.
    "small": ModelConfig(
        name="small", vocab_size=32000, d_model=640, n_lower_layers=8, n_groups=2, swa_layers_per_group=4,
        n_heads=10, n_kv_heads=2, head_dim=64, swa_window=512, chunk_size=64, hsa_topk=32, hsa_kv_heads=1,
        retrieval_dim=640, ffn_hidden=2560, moe=False, n_experts=0, experts_per_token=0, expert_hidden=0,
        n_shared_experts=0, first_dense_layers=0,
    ),
    # One-GPU MoE: `small`'s layout (8 SWA blocks + 2 × (HSA + 4 SWA)) at width 768 with 32 routed experts of width
    # 768, 4 active + 1 shared, dense first layer: ~1.06B total, ~0.21B active.
    "moe-1b-a0.2b": ModelConfig(
        name="moe-1b-a0.2b", vocab_size=32000, d_model=768, n_lower_layers=8, n_groups=2, swa_layers_per_group=4,
        n_heads=12, n_kv_heads=2, head_dim=64, swa_window=512, chunk_size=64, hsa_topk=32, hsa_kv_heads=1,
        retrieval_dim=768, ffn_hidden=3072, moe=True, n_experts=32, experts_per_token=4, expert_hidden=768,
        n_shared_experts=1, first_dense_layers=1,
    ),
    # Paper small-scale dense model: ~0.5B, SWA 4K in SWA blocks, HSA blocks with an SWA-512 sub-layer, top-k 64.
    "dense-0.5b": ModelConfig(
        name="dense-0.5b", vocab_size=32000, d_model=1024, n_lower_layers=14, n_groups=2, swa_layers_per_group=6,
        n_heads=16, n_kv_heads=4, head_dim=64, swa_window=4096, chunk_size=64, hsa_topk=64, hsa_kv_heads=1,
        retrieval_dim=1024, hsa_layer_swa=True, hsa_swa_window=512, ffn_hidden=4096, moe=False, n_experts=0,
        experts_per_token=0, expert_hidden=0, n_shared_experts=0, first_dense_layers=0,
    ),
    # Paper's 8B-A1B MoE (Ling-2.0 style): 64 routed experts, 4 active + 1 shared, expert width half the dense width,
    # dense first layer, HSA Hq:Hkv = 16:1. Widths are ours (the paper does not publish them), chosen so that
    # total ≈ 7.7B and active ≈ 1.2B (embeddings included).
    "moe-8b-a1b": ModelConfig(
        name="moe-8b-a1b", vocab_size=157184, d_model=2048, n_lower_layers=12, n_groups=2, swa_layers_per_group=5,
        n_heads=16, n_kv_heads=4, head_dim=128, swa_window=4096, chunk_size=64, hsa_topk=64, hsa_kv_heads=1,
        retrieval_dim=2048, hsa_layer_swa=True, hsa_swa_window=512, ffn_hidden=1536, moe=True, n_experts=64,
        experts_per_token=4, expert_hidden=768, n_shared_experts=1, first_dense_layers=1,
    ),
}


def check_rope_scaling(scaling: Any) -> None:
    """``model.rope_scaling``: null, or a mapping with a supported ``rope_type`` and exactly its keys (numbers; yarn's
    ``truncate`` a bool). Raises one-line ``ConfigError``s naming the key."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"model.rope_scaling must be a mapping with a rope_type, or null; got {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"model.rope_scaling.rope_type: {kind!r} is not supported; supported: "
                          f"{', '.join(ROPE_SCALING_KEYS)} (or rope_scaling: null for plain RoPE)")
    required, optional = ROPE_SCALING_KEYS[kind]
    for key in scaling:
        if key != "rope_type" and key not in required + optional:
            raise ConfigError(f"model.rope_scaling.{key}: unknown key for rope_type {kind} (keys: "
                              f"{', '.join(required + optional)})")
    for key in required:
        if scaling.get(key) is None:
            raise ConfigError(f"model.rope_scaling.{key} is required for rope_type {kind}")
    for key, value in scaling.items():
        if key == "rope_type" or value is None:
            continue
        expected = bool if key == "truncate" else (int, float)
        if not isinstance(value, expected) or (key != "truncate" and isinstance(value, bool)):
            raise ConfigError(f"model.rope_scaling.{key} must be a {'bool' if key == 'truncate' else 'number'}, "
                              f"got {value!r}")
    if scaling["factor"] <= 0 or scaling.get("original_max_position_embeddings", 1) < 1:
        raise ConfigError("model.rope_scaling: factor must be > 0 and original_max_position_embeddings >= 1")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"model.rope_scaling: high_freq_factor ({scaling['high_freq_factor']}) must be greater than "
                          f"low_freq_factor ({scaling['low_freq_factor']})")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}{_suggest(value, allowed)}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""

