"""Hugging Face dense checkpoints (Llama, Mistral, Qwen2, Qwen3) imported as the same network
(``lit_hsa/interop/hf_import.py``): tiny random models built here with ``transformers`` (nothing is downloaded), saved
with ``save_pretrained``, read with ``read_dense``; our logits equal transformers' in fp32 (max abs diff <= 1e-4).
Every parameter is randomised (transformers initialises biases to 0 and norms to 1, which would hide a bias or norm
left out). Then the bad inputs, each one ConfigError line naming the problem, and the written checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from lit_hsa.checkpoint_io import load_model  # noqa: E402
from lit_hsa.config import ConfigError, load_config  # noqa: E402
from lit_hsa.interop.hf_import import read_dense, write_checkpoint  # noqa: E402
from lit_hsa.model.attention import rope_frequencies  # noqa: E402
from lit_hsa.model.transformer import HSATransformer  # noqa: E402

VOCAB = 300
EOT = "<|endoftext|>"
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
# Qwen2.5's long-context form ({type: yarn, factor: 4, original_max_position_embeddings}), at a small scale
QWEN_YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=32)

# name → (config class, overrides of the shared shape, T): hidden 64, 2 layers, 4 heads, vocab 300
CASES = {
    # untied, GQA 2, rope_theta 5e5, llama3 scaling (T=80 > 32 original positions), eps 1e-5; saved in shards
    "llama-llama3-sharded": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                                                 rope_scaling=LLAMA3, eos_token_id=0), 80),
    # tied embeddings, GQA 1 (MHA), attention_bias (q/k/v and o), linear scaling
    "llama-tied-bias-linear": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                   attention_bias=True,
                                                   rope_scaling=dict(rope_type="linear", factor=2.0)), 48),
    # GQA 4, sliding window 12 on all layers with T=64 > window, 3 layers; yarn with mscale / mscale_all_dim
    "mistral-swa-gqa4": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=12, num_hidden_layers=3,
                                               max_position_embeddings=32,
                                               rope_scaling=dict(rope_type="yarn", factor=2.0, mscale=1.0,
                                                                 mscale_all_dim=0.5,
                                                                 original_max_position_embeddings=16)), 64),
    # q/k/v biases (no o bias), tied, rope_theta 1e6, Qwen-style yarn (default attention factor 0.1 ln 4 + 1)
    "qwen2-bias-tied-yarn": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6, rope_scaling=QWEN_YARN),
                             80),
    # all layers sliding (use_sliding_window, max_window_layers 0), window 10, T=40
    "qwen2-sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=10, max_window_layers=0), 40),
    # head_dim 32 != 64 / 4, qk-norm, attention_bias, eps 1e-5, yarn with attention_factor / betas / truncate
    "qwen3-headdim-bias-yarn": ("Qwen3Config", dict(head_dim=32, attention_bias=True, rms_norm_eps=1e-5,
                                                    max_position_embeddings=96,
                                                    rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                      original_max_position_embeddings=24,
                                                                      attention_factor=0.8, beta_fast=16.0,
                                                                      beta_slow=2.0, truncate=False)), 64),
    # plain Qwen3: GQA 2, untied, head_dim 16
    "qwen3-plain": ("Qwen3Config", dict(head_dim=16), 32),
}


def make_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer.json of 280 tokens, ``<|endoftext|>`` first (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world"] * 20, trainer)
    tok.save(str(path))


SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             vocab_size=VOCAB, max_position_embeddings=128)


def save_hf(folder: Path, cls: str, overrides: dict, shard: bool = False, tokenizer: bool = True,
            shape: dict = SHAPE):
    """A random ``cls`` causal LM (every parameter random) saved with ``save_pretrained`` → the model (eval, eager
    attention)."""
    config = getattr(transformers, cls)(**{**shape, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    model.save_pretrained(folder, **({"max_shard_size": "40KB"} if shard else {}))
    if tokenizer:
        make_tokenizer(folder / "tokenizer.json")
    return model


def max_logit_diff(model, imported, T: int) -> float:
    ours = HSATransformer(imported.cfg).eval()
    ours.load_state_dict(imported.state)  # strict: every tensor, nothing else
    x = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        return (model(x).logits - ours(x)).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case, tmp_path):
    cls, overrides, T = CASES[case]
    model = save_hf(tmp_path, cls, overrides, shard=case.endswith("sharded"))
    imported = read_dense(str(tmp_path))
    cfg = imported.cfg
    assert max_logit_diff(model, imported, T) <= 1e-4
    assert (cfg.n_lower_layers, cfg.n_groups, cfg.moe, imported.dtype) == (model.config.num_hidden_layers, 0, False,
                                                                           "float32")
    assert imported.model_type == model.config.model_type and imported.tokenizer == str(tmp_path / "tokenizer.json")
    assert all(v.dtype == torch.float32 for v in imported.state.values())
    if case.endswith("sharded"):
        assert (tmp_path / "model.safetensors.index.json").is_file() and imported.eos_token == EOT
    expected = {  # the options each case is about
        "llama-llama3-sharded": dict(rope_base=500000.0, norm_eps=1e-5, tie_embeddings=False, n_kv_heads=2),
        "llama-tied-bias-linear": dict(tie_embeddings=True, qkv_bias=True, attn_out_bias=True, n_kv_heads=4),
        "mistral-swa-gqa4": dict(attention="swa", swa_window=12, n_kv_heads=1, qkv_bias=False),
        "qwen2-bias-tied-yarn": dict(qkv_bias=True, attn_out_bias=False, tie_embeddings=True, rope_base=1e6),
        "qwen2-sliding": dict(attention="swa", swa_window=10),
        "qwen3-headdim-bias-yarn": dict(head_dim=32, qk_norm=True, qkv_bias=True, attn_out_bias=True),
        "qwen3-plain": dict(head_dim=16, qk_norm=True, qkv_bias=False, attention="full"),
    }[case]
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("kind,params", [
    ("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    ("linear", dict(factor=4.0)),
    ("yarn", dict(factor=4.0, original_max_position_embeddings=4096)),
    ("yarn", dict(factor=8.0, original_max_position_embeddings=2048, beta_fast=16, beta_slow=2, mscale=1.0,
                  mscale_all_dim=0.7, truncate=False)),
])
def test_rope_frequencies_equal_transformers_bit_for_bit(kind, params):
    """At real sizes (head_dim 128, Llama-3.1's and Qwen2.5's settings) the tables are transformers' exactly."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128,
                                      max_position_embeddings=32768, rope_theta=500000.0,
                                      rope_scaling={"rope_type": kind, **params})
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    got, got_factor = rope_frequencies(128, 500000.0, {"rope_type": kind, **params})
    assert torch.equal(got, want) and got_factor == want_factor


@pytest.mark.parametrize("case", ["llama-llama3-sharded", "qwen2-bias-tied-yarn", "qwen2-sliding"])
def test_transformers4_config_format_reads_the_same(case, tmp_path):
    """Most checkpoints on disk were saved by transformers 4: ``rope_scaling`` (with ``type``) and a top-level
    ``rope_theta`` instead of ``rope_parameters``, and no ``layer_types`` (Qwen: use_sliding_window and
    max_window_layers decide). They give the same model config."""
    cls, overrides, _ = CASES[case]
    save_hf(tmp_path, cls, overrides, tokenizer=False)
    new = read_dense(str(tmp_path)).cfg
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    config.pop("layer_types", None)
    if config.get("use_sliding_window"):
        config["sliding_window"] = overrides["sliding_window"]  # transformers 5 writes null when unused
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_dense(str(tmp_path)).cfg == new


def test_bf16_weights_are_read_as_float32(tmp_path):
    model = save_hf(tmp_path / "bf16", "Qwen3Config", dict(head_dim=16, dtype="bfloat16"), tokenizer=False)
    imported = read_dense(str(tmp_path / "bf16"))
    assert imported.dtype == "bfloat16" and all(v.dtype == torch.float32 for v in imported.state.values())
    assert torch.equal(imported.state["norm.weight"], model.model.norm.weight.float())


# ---------------------------------------------------------------------------------------------------- checkpoint


def test_written_checkpoint_loads_with_the_same_logits(tmp_path):
    """write_checkpoint → load_model gives the same logits; its tokenizer (copied beside it) encodes and knows the
    EOS; the YAML beside it loads as a config (the whole model section, tokenizer, init_from)."""
    cls, overrides, T = CASES["llama-llama3-sharded"]
    save_hf(tmp_path / "hf", cls, overrides)
    imported = read_dense(str(tmp_path / "hf"))
    out = tmp_path / "out" / "llama.ckpt"
    converted_from = {"hf_dir": str(tmp_path / "hf"), "model_type": imported.model_type, "dtype": imported.dtype}
    write_checkpoint(str(out), imported.cfg, imported.state, imported.tokenizer, imported.eos_token, converted_from)
    model, tokenizer = load_model(str(out), "cpu")
    direct = HSATransformer(imported.cfg).eval()
    direct.load_state_dict(imported.state)
    x = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        assert torch.equal(model(x), direct(x))
    ids = tokenizer.encode("hello world, the lazy fox")
    assert len(ids) > 0 and tokenizer.decode(ids) == "hello world, the lazy fox" and tokenizer.eos_id == 0
    saved = torch.load(out, weights_only=True)["hyper_parameters"]
    assert saved["tokenizer"] == str((tmp_path / "out" / "llama.tokenizer.json").resolve())
    assert saved["converted_from"] == converted_from and saved["eos_token"] == EOT
    cfg = load_config(str(out.with_suffix(".yaml")))
    assert cfg.model == imported.cfg and cfg.init_from == str(out.resolve())
    assert (cfg.data.tokenizer, cfg.data.eos_token) == (saved["tokenizer"], EOT)


def test_checkpoint_without_tokenizer_json(tmp_path):
    """No tokenizer.json: a vocabulary over 258 ids needs one (one line); a byte-sized one records 'byte'."""
    save_hf(tmp_path / "hf", "LlamaConfig", {}, tokenizer=False)
    imported = read_dense(str(tmp_path / "hf"))
    assert imported.tokenizer is None and imported.eos_token is None
    with pytest.raises(ConfigError, match="a tokenizer.json is needed") as e:
        write_checkpoint(str(tmp_path / "x.ckpt"), imported.cfg, imported.state, None, None, {})
    assert "\n" not in str(e.value) and not (tmp_path / "x.ckpt").exists()
    save_hf(tmp_path / "bytes", "LlamaConfig", dict(vocab_size=258), tokenizer=False)
    imported = read_dense(str(tmp_path / "bytes"))
    write_checkpoint(str(tmp_path / "b.ckpt"), imported.cfg, imported.state, None, None, {})
    assert torch.load(tmp_path / "b.ckpt", weights_only=True)["hyper_parameters"]["tokenizer"] == "byte"


# ---------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """A plain Llama and a sharded one, saved once; each bad-input case edits a copy."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    save_hf(root / "llama", "LlamaConfig", {})
    save_hf(root / "sharded", "LlamaConfig", {}, shard=True, tokenizer=False)
    return root


def edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def rewrite_weights(drop: str | None = None, add: str | None = None):
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors.pop(drop, None)
        if add:
            tensors[add] = torch.zeros(96)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


BAD = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "unsupported model_type": (edit_config(model_type="gpt2"),
                               "model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    "pickle weights": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                       "pytorch_model.bin is a pickle"),
    "missing tensor": (rewrite_weights(drop="model.layers.1.mlp.up_proj.weight"),
                       "missing tensors model.layers.1.mlp.up_proj.weight"),
    "unexpected tensor": (rewrite_weights(add="model.layers.0.mlp.gate_proj.bias"),
                          "unexpected tensors model.layers.0.mlp.gate_proj.bias"),
    "shape": (edit_config(intermediate_size=128),
              r"tensor model.layers.0.mlp.down_proj.weight has shape \(64, 96\) but config.json implies \(64, 128\)"),
    "activation": (edit_config(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    "mlp bias": (edit_config(mlp_bias=True), "mlp_bias true is not supported"),
    "dynamic rope": (edit_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                     "rope_type 'dynamic' is not supported; supported: default, linear, llama3, yarn"),
    "longrope": (edit_config(rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
                             rope_parameters=None), "rope_type 'longrope' is not supported"),
    "partial rope": (edit_config(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    "mixed sliding layout": (edit_config(model_type="qwen3", use_sliding_window=True, sliding_window=8,
                                         max_window_layers=1),
                             "layers 1 use a sliding window and the others full attention; only uniform layouts"),
    "mixed layer_types": (edit_config(model_type="qwen2", use_sliding_window=True, sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"]),
                          "layers 0 use a sliding window"),
    # a tied config whose file holds a head of its own (the untied model's)
    "tied with its own head": (edit_config(tie_word_embeddings=True),
                               "lm_head.weight differs from model.embed_tokens.weight"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_it(case, base_dirs, tmp_path):
    edit, message = BAD[case]
    folder = tmp_path / "m"
    shutil.copytree(base_dirs / "llama", folder)
    edit(folder)
    with pytest.raises(ConfigError, match=message) as e:
        read_dense(str(folder))
    assert "\n" not in str(e.value)


def test_missing_folder_and_shard(base_dirs, tmp_path):
    with pytest.raises(ConfigError, match="Hugging Face model folder '.*nope' does not exist"):
        read_dense(str(tmp_path / "nope"))
    folder = tmp_path / "sharded"
    shutil.copytree(base_dirs / "sharded", folder)
    assert read_dense(str(folder)).state  # the copy itself imports
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConfigError, match=f"shard {shard.name} listed in model.safetensors.index.json is missing"):
        read_dense(str(folder))


def test_tied_file_holding_a_copy_of_the_embedding_imports(base_dirs, tmp_path):
    """Some tied checkpoints store lm_head.weight anyway: equal to the embedding, it is dropped (the model is tied)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(base_dirs / "llama", folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    edit_config(tie_word_embeddings=True)(folder)
    imported = read_dense(str(folder))
    assert imported.cfg.tie_embeddings and "lm_head.weight" not in imported.state


def test_broken_tokenizer_json_is_one_line(base_dirs, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(base_dirs / "llama", folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer.json' is not a valid tokenizer.json") as e:
        read_dense(str(folder))
    assert "\n" not in str(e.value)


REQUIRED_KEYS = {"architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_hidden_layers", "vocab_size", "torch_dtype", "dtype", "transformers_version"}


@pytest.mark.parametrize("cls", ["LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config"])
def test_a_minimal_config_json_reads_as_transformers_reads_it(cls, tmp_path):
    """config.json files in the wild leave out what has a default (save_pretrained writes every key, so the other
    tests never saw a missing one) and give eos_token_id as a list: with every optional key removed, our model
    is the one transformers builds from the same file (its own defaults: KV heads, head_dim from the width,
    rope_theta, eps, tied or not), logits equal."""
    # 32 heads, as the classes' defaults assume (their KV-head and head_dim defaults are constants), width 256
    required = dict(hidden_size=256, num_attention_heads=32, num_hidden_layers=2, intermediate_size=96,
                    vocab_size=VOCAB)
    save_hf(tmp_path, cls, {}, shape=required)  # every other field at the class's default
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    minimal = {k: v for k, v in config.items() if k in REQUIRED_KEYS}
    minimal["eos_token_id"] = [0, 1]
    path.write_text(json.dumps(minimal))
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    imported = read_dense(str(tmp_path))
    assert max_logit_diff(hf, imported, 40) <= 1e-4
    c, cfg = hf.config, imported.cfg
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings, cfg.norm_eps) == (
        c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        c.tie_word_embeddings, c.rms_norm_eps)
    assert imported.eos_token == EOT  # the first id of the list
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    assert (cfg.swa_window if cfg.attention == "swa" else None) == window  # Mistral: 4096 when left out
