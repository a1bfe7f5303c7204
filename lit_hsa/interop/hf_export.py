"""Export a lit-hsa checkpoint as a Hugging Face model directory (``python main.py export``), and read an exported
``lit_hsa``-format directory back (``read_lit_hsa_dir``).

Two formats:

- ``lit_hsa`` (every model: HSA, SWA, full; dense or MoE): ``model.safetensors`` with our state-dict names under
  ``model.``, in the checkpoint's dtype; ``config.json`` (``model_type: lit_hsa``, the ``ModelConfig`` as the nested
  dict ``lit_hsa``, ``auto_map`` to ``modeling_lit_hsa.py``, which is copied alongside). Loading it needs
  ``trust_remote_code=True`` and the ``lit_hsa`` package installed; it runs lit-hsa's own code.
- native: a model that is exactly a ``transformers`` architecture (full or sliding-window attention, dense SwiGLU
  feed-forwards, no HSA) is written as that architecture, which loads without remote code: ``llama`` (full),
  ``mistral`` (sliding window), ``qwen3`` (QK-norm; full or sliding window), ``qwen2`` (q/k/v biases without
  o bias; full or sliding window). The sliding windows agree: in both a query sees keys with ``q - k < window``.

Both formats carry the tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``;
for ``byte`` an equivalent byte-level tokenizer, see ``byte_tokenizer.py``) and ``generation_config.json``.

Needs the ``hf`` extra (``transformers``, ``safetensors``), imported where used: the CLI imports this module for
every command.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from data_modules.sources import DataError
from data_modules.tokenizers import build_tokenizer
from lit_hsa.checkpoint_io import full_checkpoint, state_problems, tokenizer_spec
from lit_hsa.config import ConfigError, ModelConfig, check_choice
from lit_hsa.interop.byte_tokenizer import EOS_TOKEN, PAD_TOKEN, byte_tokenizer
from lit_hsa.interop.hf_import import read_json
from lit_hsa.interop.names import ours_to_hf
from lit_hsa.model.transformer import HSATransformer

if TYPE_CHECKING:
    from transformers import PretrainedConfig

NATIVE_CHOICES = ("auto", "never")
MODELING_FILE = "modeling_lit_hsa.py"
WEIGHTS_FILE = "model.safetensors"
# Every file an export may write: what `overwrite` replaces (other files in the folder are left alone).
EXPORT_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, MODELING_FILE, "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json")
NATIVE_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                        "qwen3": "Qwen3ForCausalLM"}
# RoPE scalings whose transformers form is computed from their dict alone, as lit-hsa computes them (types that also
# read max_position_embeddings, e.g. dynamic, would not map: a lit-hsa model has no such length).
NATIVE_ROPE_SCALINGS = ("default", "linear", "llama3", "yarn")
# lit-hsa models have no position limit; transformers configs and tokenizers want one (none of the above reads it).
MAX_POSITIONS = 131072


# ------------------------------------------------------------------------------------------------ export


def export_checkpoint(ckpt: str, out_dir: str, native: str = "auto", overwrite: bool = False) -> str:
    """Write checkpoint ``ckpt`` (a full one: ``fit``, ``merge``, ``consolidate``) as a Hugging Face model directory
    ``out_dir``. ``native``: ``auto`` writes a native ``transformers`` architecture where the model is exactly one,
    else the ``lit_hsa`` format; ``never`` always the ``lit_hsa`` format. ``overwrite``: replace an earlier export's
    files in a non-empty ``out_dir``. Returns the format written (``lit_hsa``, ``llama``, ``mistral``, ``qwen2``,
    ``qwen3``) and prints one line on it. Bad input raises one-line ``ConfigError``s."""
    check_choice("--native", native, NATIVE_CHOICES)
    require_hf()
    from transformers import GenerationConfig

    out = Path(out_dir)
    check_out_dir(out, overwrite)
    cfg, state, tokenizer_spec, tokenizer = read_checkpoint(ckpt)
    model_type, why_not = native_plan(cfg, state) if native == "auto" else (None, "--native never")
    for name in EXPORT_FILES:  # an earlier export's files (overwrite): none of them may outlive this one
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tokens = write_tokenizer(out, tokenizer_spec, tokenizer)
    dtype = weights_dtype(state)
    if model_type is None:
        write_lit_hsa(out, cfg, state, tokens, dtype)
        fmt, note = "lit_hsa", f"lit_hsa format, remote code ({why_not})"
    else:
        write_native(out, native_config(model_type, cfg, tokens, dtype), state, cfg)
        fmt, note = model_type, f"native {model_type}"
    GenerationConfig(bos_token_id=None, eos_token_id=tokens["eos_token_id"], pad_token_id=tokens["pad_token_id"],
                     do_sample=False).save_pretrained(out)
    params = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {note}; {params:,} weights in {str(dtype).removeprefix('torch.')}, tokenizer {tokenizer_spec}")
    return fmt


def require_hf() -> None:
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"export needs the hf extra ({e.name} is not installed): pip install 'lit-hsa[hf]'") from None


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out '{out}' exists and is not empty: choose another directory or pass --overwrite")


def read_checkpoint(ckpt: str) -> tuple[ModelConfig, dict[str, torch.Tensor], str, object]:
    """(model config, weights by our names in the checkpoint's own dtypes, tokenizer spec, tokenizer).
    ``full_checkpoint`` checks the file (missing, LoRA adapters only, weights that do not fit); the weights are
    mapped from it, not read."""
    cfg, state, checkpoint = full_checkpoint(ckpt, mmap=True)
    hparams = checkpoint["hyper_parameters"]
    spec = tokenizer_spec(ckpt, hparams)
    try:
        tokenizer = build_tokenizer(spec, hparams.get("eos_token"))
    except DataError as e:  # the tokenizer the checkpoint names (e.g. a tokenizer.json that has moved)
        raise ConfigError(f"checkpoint '{ckpt}': {e}") from None
    return cfg, state, spec, tokenizer


def weights_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the floating-point weights (the most common one, should they be mixed)."""
    counts: dict[torch.dtype, int] = {}
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def write_lit_hsa(out: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokens: dict, dtype) -> None:
    config = {
        "architectures": ["LitHSAForCausalLM"],
        "model_type": "lit_hsa",
        "auto_map": {"AutoConfig": "modeling_lit_hsa.LitHSAConfig",
                     "AutoModelForCausalLM": "modeling_lit_hsa.LitHSAForCausalLM"},
        "lit_hsa": asdict(cfg),
        "vocab_size": cfg.vocab_size,
        **tokens,
        "tie_word_embeddings": False,  # tied inside the model (one tensor): nothing for transformers to tie
        "dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_weights({f"model.{k}": v for k, v in state.items()}, out / WEIGHTS_FILE)
    shutil.copyfile(Path(__file__).with_name(MODELING_FILE), out / MODELING_FILE)


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # format=pt: transformers reads files without it as another framework's
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600); the folder's other files follow the umask
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ------------------------------------------------------------------------------------------------ native formats


def native_plan(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    """(transformers model_type, "") when the model maps exactly onto a native architecture, else (None, why not)."""
    qkv_bias, out_bias, scaling = cfg.qkv_bias, cfg.attn_out_bias, cfg.rope_scaling
    if cfg.attention == "hsa":
        return None, "HSA attention has no transformers equivalent"
    if cfg.moe and cfg.first_dense_layers < cfg.n_layers:
        return None, "MoE feed-forwards (router bias, shared experts) have no exact transformers equivalent"
    if scaling and scaling.get("rope_type", scaling.get("type")) not in NATIVE_ROPE_SCALINGS:
        return None, f"RoPE scaling {scaling} has no exact transformers form here"
    if out_bias and not qkv_bias:
        return None, "a bias on the attention output alone has no transformers equivalent"
    if cfg.qk_norm:
        if qkv_bias != out_bias:
            return None, "QK-norm with q/k/v biases but no output bias has no transformers equivalent"
        model_type = "qwen3"
    elif qkv_bias and not out_bias:
        model_type = "qwen2"
    elif cfg.attention == "full":
        model_type = "llama"
    elif qkv_bias:
        return None, "sliding-window attention with biases on q, k, v and o has no transformers equivalent"
    else:
        model_type = "mistral"
    unmapped = sorted(set(state) - set(ours_to_hf(cfg.n_layers, cfg.n_lower_layers)))
    if unmapped:
        return None, f"weights without a {model_type} name: {', '.join(unmapped[:3])}"
    return model_type, ""


def native_config(model_type: str, cfg: ModelConfig, tokens: dict, dtype) -> PretrainedConfig:
    """The transformers config of ``model_type`` (chosen by ``native_plan``) for ``cfg``."""
    from transformers import AutoConfig

    window = None if cfg.attention == "full" else cfg.swa_window
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=MAX_POSITIONS,
        dtype=str(dtype).removeprefix("torch."), **tokens, **rope_kwargs(model_type, cfg),
    )
    if model_type in ("llama", "qwen3"):
        kwargs["attention_bias"] = cfg.qkv_bias  # (then also o's: native_plan checked)
    if model_type == "mistral":
        kwargs["sliding_window"] = window
    if model_type in ("qwen2", "qwen3"):  # sliding window in every layer or none
        kwargs.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                      layer_types=["sliding_attention" if window else "full_attention"] * cfg.n_layers)
    config = AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [NATIVE_ARCHITECTURES[model_type]]
    return config


def rope_kwargs(model_type: str, cfg: ModelConfig) -> dict:
    """RoPE base and scaling in the config class's own form: ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (before)."""
    from transformers import AutoConfig

    scaling = dict(cfg.rope_scaling or {})
    if hasattr(AutoConfig.for_model(model_type), "rope_parameters"):
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        return {"rope_parameters": {**scaling, "rope_type": rope_type, "rope_theta": cfg.rope_base}}
    return {"rope_theta": cfg.rope_base, "rope_scaling": scaling or None}


def write_native(out: Path, config: PretrainedConfig, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Weights under the architecture's names, after checking them against the architecture itself (built on the
    meta device: no memory): any name or shape it does not have is a bug in the mapping, not a user error."""
    from transformers import AutoModelForCausalLM

    names = ours_to_hf(cfg.n_layers, cfg.n_lower_layers)
    tensors = {names[k]: v for k, v in state.items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # named_parameters lists a tied head once, under the embedding's name (the one lit-hsa saves)
    problems = state_problems(tensors, dict(model.named_parameters()))
    if problems:
        raise RuntimeError(f"the {config.model_type} weights do not match the architecture ({problems})")
    config.save_pretrained(out)
    save_weights(tensors, out / WEIGHTS_FILE)


# ------------------------------------------------------------------------------------------------ tokenizer


def write_tokenizer(out: Path, spec: str, tokenizer) -> dict:
    """The tokenizer files for lit-hsa tokenizer ``spec`` (``byte`` or a tokenizer.json path) whose ids ``tokenizer``
    (``ByteTokenizer`` / ``HFTokenizer``) gives → the token ids for the configs."""
    if spec == "byte":
        tok, names = byte_tokenizer(), (EOS_TOKEN, PAD_TOKEN)
        tok.save(str(out / "tokenizer.json"))
    else:
        data = json.loads(Path(spec).read_text(encoding="utf-8"))
        # lit-hsa encodes without special tokens: a post-processor (e.g. adding BOS) would give transformers'
        # default encode() ids the model never saw
        data["post_processor"] = None
        (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        tok = Tokenizer.from_file(spec)
        names = (tok.id_to_token(tokenizer.eos_id), tok.id_to_token(tokenizer.pad_id))
    special = {"eos_token": names[0], "pad_token": names[1]}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        # ByteTokenizer encodes the text "<|endoftext|>" as its bytes: so does transformers with this flag
        "split_special_tokens": spec == "byte",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return {"bos_token_id": None, "eos_token_id": int(tokenizer.eos_id), "pad_token_id": int(tokenizer.pad_id)}


# ------------------------------------------------------------------------------------------------ reading back


def read_lit_hsa_dir(hf_dir: str) -> tuple[ModelConfig, dict[str, torch.Tensor], str, str]:
    """An exported ``lit_hsa``-format directory → (ModelConfig, weights by our state-dict names, path of its
    tokenizer.json, end-of-document token): the checkpoint's config and tensors, bit for bit. Raises one-line
    ``ConfigError``s for anything else (no config.json, another model type, missing or misfit tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(hf_dir)
    config = read_json(path / "config.json", what="config.json (not a Hugging Face model folder?)")
    model_type = config.get("model_type")
    if model_type != "lit_hsa":
        raise ConfigError(f"'{hf_dir}' holds a '{model_type}' model, not a lit_hsa export (native models are "
                          "imported by `python main.py convert`)")
    try:
        cfg = ModelConfig(**config["lit_hsa"])
    except (KeyError, TypeError) as e:  # no `lit_hsa` dict, or keys this ModelConfig does not have
        raise ConfigError(f"'{hf_dir}/config.json' holds no valid lit_hsa model config ({e})") from None
    cfg.validate()
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"'{hf_dir}' has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"'{weights}' is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    with torch.device("meta"):  # shapes only, no memory
        own = HSATransformer(cfg).state_dict()
    problems = "; ".join(filter(None, [state_problems(state, own),
                                       *(f"unexpected {k}" for k in tensors if not k.startswith("model."))]))
    if problems:
        raise ConfigError(f"'{weights}' does not hold this model's weights ({problems})")
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        raise ConfigError(f"'{hf_dir}' has no tokenizer.json")
    eos_id = config.get("eos_token_id")
    eos = Tokenizer.from_file(str(tokenizer)).id_to_token(eos_id) if isinstance(eos_id, int) else None
    if eos is None:
        raise ConfigError(f"'{hf_dir}/config.json': eos_token_id {eos_id!r} is not a token of its tokenizer.json")
    return cfg, state, str(tokenizer), eos
