"""Import a Hugging Face dense checkpoint (Llama, Mistral, Qwen2, Qwen3) as the same network in lit-hsa.

    read_dense(hf_dir) → ImportedModel(cfg, state, tokenizer, eos_token, model_type, dtype)
    write_checkpoint(out, cfg, state, tokenizer_json, eos_token, converted_from)
        → out (what `generate`, `eval`, `fit init_from=` read), <stem>.tokenizer.json, <stem>.yaml (`fit --config`)

A model with L decoder layers becomes ``attention: full`` (or ``swa`` when every layer has the same sliding window)
with ``n_lower_layers = L`` and no HSA groups, so its logits equal the original's. Only ``config.json``,
``model.safetensors`` (or its sharded index) and ``tokenizer.json`` are read; nothing is unpickled and no model code
runs. ``safetensors`` is the optional ``hf`` extra, imported inside ``read_weights``. Anything this mapping cannot
reproduce exactly (another activation, MLP biases, a mixed sliding / full layout, other RoPE types, partial RoPE) is
refused with one ``ConfigError`` line rather than imported approximately.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lit_hsa.checkpoint_io import save_weights
from lit_hsa.config import CONFIG_DIR, ROPE_SCALING_KEYS, ConfigError, ModelConfig
from lit_hsa.interop.names import hf_to_ours, ours_to_hf

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# Tokenizers with no tokenizer.json: the byte tokenizer (ids 0..257) is the only one a checkpoint can name instead.
BYTE_VOCAB = 258
# Keys of config.json that choose the rope type / base and are not part of our rope_scaling mapping.
_ROPE_META = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


@dataclass
class ImportedModel:
    """A Hugging Face model read as an ``HSATransformer``: ``cfg`` its config, ``state`` its weights under our names
    (no ``model.`` prefix; float32), ``tokenizer`` the path of the folder's tokenizer.json (None: none there),
    ``eos_token`` the end-of-sequence token's string (None: unknown), the HF ``model_type`` and the weights' source
    ``dtype`` (e.g. "bfloat16")."""

    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: str | None
    eos_token: str | None
    model_type: str
    dtype: str


def read_dense(hf_dir: str) -> ImportedModel:
    """Read a local Hugging Face model folder (``config.json``, safetensors weights, ``tokenizer.json``) → an
    ``ImportedModel`` whose weights load into ``HSATransformer(cfg)`` with ``load_state_dict`` (strict).

    Weights are converted to float32 (the source dtype is kept in ``dtype``). Raises one-line ``ConfigError``s: the
    folder or its config.json is missing; an unsupported model_type or option; no weight files; missing, unexpected
    or wrongly shaped tensors."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise ConfigError(f"Hugging Face model folder '{hf_dir}' does not exist")
    hf = read_json(folder / "config.json", what="config.json (not a Hugging Face model folder?)")
    cfg = config_from_hf(hf)
    weights, dtype = read_weights(folder)
    state = convert_state(weights, cfg)
    tokenizer = folder / "tokenizer.json"
    tokenizer_path = str(tokenizer) if tokenizer.is_file() else None
    return ImportedModel(cfg, state, tokenizer_path, eos_token_of(folder, hf, tokenizer_path), hf["model_type"],
                         dtype)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"'{path.parent}' has no {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"'{path}' is not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' holds a {type(data).__name__}, not a JSON object")
    return data


# ------------------------------------------------------------------------------------------------------- config


# What transformers' config classes (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config) take for a key a
# config.json leaves out, where that is a constant rather than derived from other fields (a null value is derived:
# KV heads = attention heads, head_dim = width / heads). Mistral's window of 4096 is on when the key is absent.
FAMILY_DEFAULTS = {
    "llama": {},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128},
}


def config_from_hf(hf: dict) -> ModelConfig:
    """A Llama / Mistral / Qwen2 / Qwen3 ``config.json`` (as a dict) → the ``ModelConfig`` of the same network."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    hf = {**FAMILY_DEFAULTS[model_type], **hf}
    where = f"config.json ({model_type})"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {hf.get(key)!r}")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):  # both are SiLU in transformers' ACT2FN; our FFN is SwiGLU
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (the feed-forward is SwiGLU: silu only)")
    if hf.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias true is not supported (the feed-forward has no biases)")
    n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    rope_base, rope_scaling = rope_from_hf(hf, where)
    attention, window = attention_layout(hf, model_type, n_layers, where)
    # Qwen2 always biases q/k/v (not o); Llama and Qwen3 bias all four with attention_bias; Mistral none.
    qkv_bias = model_type == "qwen2" or (model_type in ("llama", "qwen3") and bool(hf.get("attention_bias")))
    out_bias = model_type in ("llama", "qwen3") and bool(hf.get("attention_bias"))
    cfg = ModelConfig(
        name=model_type, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_lower_layers=n_layers, n_groups=0,
        swa_layers_per_group=0, n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        swa_window=window or ModelConfig.swa_window, rope_base=float(rope_base), rope_scaling=rope_scaling,
        qk_norm=model_type == "qwen3", qkv_bias=qkv_bias, attn_out_bias=out_bias, attention=attention,
        ffn_hidden=hf["intermediate_size"], moe=False, n_experts=0, experts_per_token=0, expert_hidden=0,
        n_shared_experts=0, first_dense_layers=0, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where} maps to an invalid model config: {e}") from None
    return cfg


def rope_from_hf(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, our ``rope_scaling`` or None) from ``rope_parameters`` (transformers 5) or ``rope_scaling`` +
    ``rope_theta`` (older files), completed as transformers' ``standardize_rope_params`` completes them."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    layer_types = set(hf.get("layer_types") or ()) | {"full_attention", "sliding_attention"}
    if params and set(params) <= layer_types:  # one dict per layer type: importable when they are all the same
        per_type = list(params.values())
        if any(p != per_type[0] for p in per_type[1:]):
            raise ConfigError(f"{where}: rope_parameters differ between layer types ({', '.join(params)}); "
                              "one RoPE for all layers is supported")
        params = per_type[0] or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor {partial} is not supported (RoPE on every dimension only)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"{where}: rope_type {kind!r} is not supported; supported: default, "
                          f"{', '.join(ROPE_SCALING_KEYS)}")
    required, optional = ROPE_SCALING_KEYS[kind]
    unknown = [k for k in params if k not in _ROPE_META and k not in required + optional]
    if unknown:
        raise ConfigError(f"{where}: rope key {unknown[0]!r} is not understood for rope_type {kind} "
                          f"(keys: {', '.join(required + optional)})")
    scaling = {"rope_type": kind, **{k: params[k] for k in required + optional if params.get(k) is not None}}
    if kind in ("llama3", "yarn"):
        # transformers: a top-level original_max_position_embeddings wins (Phi-3 style), else the dict's, else
        # max_position_embeddings
        original = hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = original or hf.get("max_position_embeddings")
    if kind == "yarn" and scaling.get("factor") is None and scaling["original_max_position_embeddings"]:
        scaling["factor"] = hf.get("max_position_embeddings", 0) / scaling["original_max_position_embeddings"]
    return theta, scaling


def attention_layout(hf: dict, model_type: str, n_layers: int, where: str) -> tuple[str, int | None]:
    """("full", None) or ("swa", window) from the sliding-window keys. Transformers' window is ours: a query sees
    the ``sliding_window`` newest keys, itself included (masking_utils: kv > q - window; ours: q - k < window)."""
    if model_type == "mistral":  # one window on every layer, or none
        window = hf.get("sliding_window")
        return ("swa", window) if window else ("full", None)
    if model_type not in ("qwen2", "qwen3"):
        return "full", None
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers' default: the layers from max_window_layers on slide
        first = hf.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(n_layers)]
    if len(layer_types) != n_layers or set(layer_types) - {"full_attention", "sliding_attention"}:
        raise ConfigError(f"{where}: layer_types must name full_attention or sliding_attention for each of the "
                          f"{n_layers} layers, got {layer_types}")
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if sliding and window is None:
        raise ConfigError(f"{where}: layer_types has sliding_attention layers but use_sliding_window is false or "
                          "sliding_window is null")
    if sliding and len(sliding) < n_layers:
        raise ConfigError(f"{where}: layers {', '.join(map(str, sliding))} use a sliding window and the others full "
                          "attention; only uniform layouts import (all full or all sliding)")
    return ("swa", window) if sliding else ("full", None)


# ------------------------------------------------------------------------------------------------------ weights


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of ``model.safetensors`` or of the shards ``model.safetensors.index.json`` lists → ({HF name:
    float32 tensor}, the source dtype most tensors had). Each tensor is converted as it is read, so the peak memory
    is the float32 model plus one source tensor."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, what=index.name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"'{index}' has no weight_map")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConfigError(f"'{folder}': shard {absent[0]} listed in {index.name} is missing"
                              f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}")
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" ({others[0]} is a pickle: convert it to safetensors first)" if others else ""
        raise ConfigError(f"'{folder}' has no model.safetensors or model.safetensors.index.json{hint}")
    from safetensors import safe_open

    weights, dtypes = {}, Counter()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
                    weights[name] = tensor.float() if tensor.is_floating_point() else tensor
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
            raise ConfigError(f"'{file}' is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return weights, dtypes.most_common(1)[0][0] if dtypes else "float32"


def convert_state(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named tensors → our state dict for ``HSATransformer(cfg)``, checked against the model's own names and
    shapes (built on the meta device: no memory)."""
    from lit_hsa.model.transformer import HSATransformer

    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in HSATransformer(cfg).state_dict().items()}
    n = cfg.n_lower_layers
    to_ours, to_hf = hf_to_ours(n, n), ours_to_hf(n, n)
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}  # old files: recomputed
    if cfg.tie_embeddings and "lm_head.weight" in weights:
        # some tied checkpoints store the head anyway; transformers then uses the embedding for both
        head, embed = weights.pop("lm_head.weight"), weights.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(head, embed):
            raise ConfigError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                              "set tie_word_embeddings false in config.json to keep a separate head")
    state, unexpected = {}, []
    for name, tensor in weights.items():
        ours = to_ours.get(name)
        if ours not in own:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != own[ours]:
            raise ConfigError(f"tensor {name} has shape {tuple(tensor.shape)} but config.json implies {own[ours]}")
        state[ours] = tensor.contiguous()
    missing = [to_hf.get(k, k) for k in own if k not in state]
    if missing or unexpected:
        parts = [f"{what} tensors {_first(names)}" for what, names in (("missing", missing),
                                                                       ("unexpected", unexpected)) if names]
        raise ConfigError(f"weights do not fit config.json ({cfg.name}): {'; '.join(parts)}")
    return state


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def eos_token_of(folder: Path, hf: dict, tokenizer_json: str | None) -> str | None:
    """The string of the end-of-sequence id (generation_config.json's, else config.json's ``eos_token_id``; the
    first of a list) in tokenizer.json; None when either is unknown."""
    gen = folder / "generation_config.json"
    ids = [read_json(gen, what=gen.name).get("eos_token_id")] if gen.is_file() else []
    eos_id = next((i for i in ids + [hf.get("eos_token_id")] if i is not None and i != []), None)
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    if eos_id is None or tokenizer_json is None:
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # the Rust side raises a plain Exception with the parse error
        raise ConfigError(f"'{tokenizer_json}' is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    return tokenizer.id_to_token(int(eos_id))


# ---------------------------------------------------------------------------------------------------- checkpoint


def write_checkpoint(out: str, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer_json: str | None,
                     eos_token: str | None, converted_from: dict[str, Any]) -> None:
    """Write ``out`` in the one weights format (``checkpoint_io.save_weights``: float32 weights; hyper-parameters
    ``model``, ``tokenizer``, ``eos_token``, ``converted_from``), the file ``load_model`` / ``init_from=`` read.
    Beside it: ``<stem>.tokenizer.json`` (a copy of ``tokenizer_json``; its absolute path is what the checkpoint
    records) and ``<stem>.yaml``, a config fragment (the whole model section, data.tokenizer, data.eos_token,
    init_from) for ``main.py fit --config``. Without a tokenizer.json the checkpoint records the byte tokenizer, which
    only a vocabulary of at most 258 ids can use; the tokenizer must load (and fit the vocabulary) before anything is
    written."""
    from omegaconf import OmegaConf

    from data_modules.sources import DataError
    from data_modules.tokenizers import build_tokenizer

    out_path = Path(out)
    vocab = cfg.vocab_size or 0
    if tokenizer_json is None and vocab > BYTE_VOCAB:
        raise ConfigError(f"no tokenizer.json for a vocabulary of {vocab} tokens: a tokenizer.json is needed "
                          f"(the byte tokenizer covers {BYTE_VOCAB})")
    try:
        tok = build_tokenizer(tokenizer_json or "byte", eos_token)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if tok.vocab_size > vocab:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {vocab}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = "byte"
    if tokenizer_json is not None:
        copy = out_path.with_name(out_path.stem + ".tokenizer.json")
        if Path(tokenizer_json).resolve() != copy.resolve():
            shutil.copyfile(tokenizer_json, copy)
        tokenizer = str(copy.resolve())
    model = asdict(cfg)
    save_weights(out_path, {k: v.float().contiguous() for k, v in state.items()},
                 {"model": model, "tokenizer": tokenizer, "eos_token": eos_token,
                  "converted_from": dict(converted_from)})
    # Paths relative to the fragment's own folder (config.CONFIG_DIR): the converted files can move together
    fragment = {"model": model,
                "data": {"tokenizer": tokenizer if tokenizer == "byte" else f"{CONFIG_DIR}/{Path(tokenizer).name}",
                         "eos_token": eos_token},
                "init_from": f"{CONFIG_DIR}/{out_path.name}"}
    OmegaConf.save(OmegaConf.create(fragment), out_path.with_suffix(".yaml"))
