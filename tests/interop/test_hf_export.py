"""Hugging Face export (``lit_hsa/interop/hf_export.py``): tiny random models (every weight and the MoE balancing
biases randomised, so a norm, bias or buffer left out shows) written as checkpoints, exported, and loaded back with
``transformers`` (nothing downloaded): the ``lit_hsa`` format through ``trust_remote_code`` (``modeling_lit_hsa.py``)
gives lit-hsa's logits exactly and its greedy ``generate()`` output; native exports (llama, mistral, qwen2, qwen3) load
without remote code and give the same logits (<= 1e-4, fp32); the byte tokenizer's tokenizer.json encodes and decodes
as ``ByteTokenizer``; an export reads back bit for bit; bad input is one ConfigError line."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402

from data_modules.tokenizers import ByteTokenizer, HFTokenizer  # noqa: E402
from lit_hsa.config import ConfigError, ModelConfig  # noqa: E402
from lit_hsa.inference.generate import generate  # noqa: E402
from lit_hsa.interop.hf_export import export_checkpoint, native_plan, read_lit_hsa_dir  # noqa: E402
from lit_hsa.model.transformer import HSATransformer  # noqa: E402
from tests.helpers import tiny  # noqa: E402

VOCAB = 320  # the byte tokenizer's 258 ids, padded to a multiple of 64
EOS, PAD = ByteTokenizer.eos_id, ByteTokenizer.pad_id


@pytest.fixture(scope="module", autouse=True)
def hf_modules(tmp_path_factory):
    """transformers copies remote code into HF_MODULES_CACHE (read once, at its import) and puts it on sys.path:
    both go to a temporary folder for this module, and come back afterwards."""
    import sys

    import transformers.dynamic_module_utils as dynamic

    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_MODULES_CACHE", str(home / "modules"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(dynamic, "HF_MODULES_CACHE", str(home / "modules"))
        mp.setattr(sys, "path", list(sys.path))
        yield


# ------------------------------------------------------------------------------------------------ helpers


def random_model(cfg: ModelConfig) -> HSATransformer:
    """``HSATransformer(cfg)`` in eval mode with every parameter and buffer randomised (norms around 1): zero
    biases and unit norms would hide one that an export leaves out."""
    model = HSATransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.is_floating_point():
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def write_ckpt(path: Path, model: HSATransformer, tokenizer: str = "byte", eos_token: str | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """A checkpoint file as `main.py fit` writes one (the parts export reads), weights optionally cast to dtype."""
    state = {f"model.{k}": v.to(dtype) if dtype and v.is_floating_point() else v.clone()
             for k, v in model.state_dict().items()}
    hparams = {"model": asdict(model.cfg), "tokenizer": tokenizer, "eos_token": eos_token}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path


def export(tmp_path: Path, native: str = "auto", **overrides):
    """A random tiny model (overrides of ``tiny``) exported → (model, export dir, format written)."""
    model = random_model(tiny(vocab_size=VOCAB, **overrides))
    out = tmp_path / "export"
    fmt = export_checkpoint(str(write_ckpt(tmp_path / "model.ckpt", model)), str(out), native=native)
    return model, out, fmt


def remote(out: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def eos_filled(seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Generated tokens after a row's first EOS set to EOS: lit-hsa fills finished rows with EOS, transformers with
    the pad token."""
    seq = seq.clone()
    done = (seq[:, prompt_len:] == EOS).cumsum(dim=1) > 0
    seq[:, prompt_len:][done] = EOS
    return seq


def assert_generates_like_lit_hsa(hf_model, model: HSATransformer, prompt: torch.Tensor, n: int = 12) -> None:
    want = generate(model, prompt, n, temperature=0.0, eos_id=EOS)
    got = hf_model.generate(prompt, max_new_tokens=n, do_sample=False)
    assert torch.equal(eos_filled(got, prompt.shape[1]), eos_filled(want, prompt.shape[1]))


# ------------------------------------------------------------------------------------------------ lit_hsa format

REMOTE = {  # overrides of `tiny` (chunks of 8, top-k 2, window 8)
    "hsa-moe": {},
    "hsa-dense": dict(moe=False, hsa_layer_swa=True, hsa_swa_window=4),
    "swa-moe": dict(attention="swa"),
    "full-moe": dict(attention="full"),
    "full-dense-never": dict(attention="full", moe=False),  # natively mappable, but native="never"
}


@pytest.mark.parametrize("variant", REMOTE)
def test_lit_hsa_format_loads_with_remote_code_and_matches(tmp_path, variant, capsys):
    """T = 40 (5 chunks, 5 windows): logits equal lit-hsa's; generate() decodes incrementally through lit-hsa's
    decoding state and equals lit-hsa's generate(), also for a prompt that is not a whole number of chunks."""
    native = "never" if variant.endswith("never") else "auto"
    model, out, fmt = export(tmp_path, native, **REMOTE[variant])
    assert fmt == "lit_hsa" and capsys.readouterr().out.count("\n") == 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lit_hsa" and config["architectures"] == ["LitHSAForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_lit_hsa.LitHSAConfig",
                                  "AutoModelForCausalLM": "modeling_lit_hsa.LitHSAForCausalLM"}
    assert config["lit_hsa"] == asdict(model.cfg) and config["vocab_size"] == VOCAB
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (EOS, PAD, None)
    hf_model = remote(out)
    assert type(hf_model).__name__ == "LitHSAForCausalLM"
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        want, got = model(x), hf_model(x, attention_mask=torch.ones_like(x)).logits
    print(f"{variant}: max |logit diff| {max_diff(got, want):.3g}")
    assert max_diff(got, want) <= 1e-5
    assert_generates_like_lit_hsa(hf_model, model, x[:, :19])


def test_remote_model_generation_paths_loss_and_padding(tmp_path):
    """One HSA model: the cache carries lit-hsa's DecodeState and only new tokens are fed; use_cache=False recomputes
    and gives the same tokens; labels give lit-hsa's loss (shifted inside, as transformers does); padding is refused."""
    model, out, _ = export(tmp_path)
    hf_model = remote(out)
    x = torch.randint(0, 256, (2, 21))
    fed = []
    hook = hf_model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                              with_kwargs=True)
    cached = hf_model.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert fed == [21, 1, 1, 1, 1, 1]
    fed.clear()
    recomputed = hf_model.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=None, use_cache=False)
    assert fed == [21, 22, 23, 24, 25, 26] and torch.equal(cached, recomputed)
    assert torch.equal(cached, generate(model, x, 6, temperature=0.0))
    hook.remove()
    with pytest.raises(NotImplementedError, match="use_cache=False"):  # not silently decoding from the wrong beams
        hf_model.generate(x, max_new_tokens=3, num_beams=2, do_sample=False)
    assert hf_model.generate(x, max_new_tokens=3, num_beams=2, do_sample=False, use_cache=False).shape == (2, 24)

    labels = x.clone()
    labels[0, 5] = -100
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        assert abs(hf_model(x, labels=labels).loss.item() - model(x, labels=shifted).item()) <= 1e-5

    left_padded = torch.ones_like(x)
    left_padded[1, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        hf_model(x, attention_mask=left_padded)
    with pytest.raises(ValueError, match="padding"):
        hf_model.generate(x, attention_mask=left_padded, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ native formats

NATIVE = {  # overrides of `tiny` → (model_type, class); T = 40 > every window (8)
    "full-qknorm": (dict(attention="full", moe=False), "qwen3", "Qwen3ForCausalLM"),
    "full-no-qknorm": (dict(attention="full", moe=False, qk_norm=False), "llama", "LlamaForCausalLM"),
    "swa-no-qknorm": (dict(attention="swa", moe=False, qk_norm=False), "mistral", "MistralForCausalLM"),
    "swa-qknorm-untied": (dict(attention="swa", moe=False, tie_embeddings=False), "qwen3", "Qwen3ForCausalLM"),
    "hsa-shape-all-dense": (dict(attention="full", first_dense_layers=4), "qwen3", "Qwen3ForCausalLM"),
    "full-qkv-bias": (dict(attention="full", moe=False, qk_norm=False, qkv_bias=True), "qwen2",
                      "Qwen2ForCausalLM"),
    "swa-qkv-bias": (dict(attention="swa", moe=False, qk_norm=False, qkv_bias=True), "qwen2", "Qwen2ForCausalLM"),
    "full-all-bias": (dict(attention="full", moe=False, qk_norm=False, qkv_bias=True, attn_out_bias=True),
                      "llama", "LlamaForCausalLM"),
    "full-qknorm-all-bias": (dict(attention="full", moe=False, qkv_bias=True, attn_out_bias=True), "qwen3",
                             "Qwen3ForCausalLM"),
    "full-llama3-rope": (dict(attention="full", moe=False, qk_norm=False, rope_base=500000.0,
                              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=16)),
                         "llama", "LlamaForCausalLM"),
    "swa-yarn-rope": (dict(attention="swa", moe=False, qk_norm=False,
                           rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
                      "mistral", "MistralForCausalLM"),
    "full-linear-rope": (dict(attention="full", moe=False, rope_scaling=dict(rope_type="linear", factor=2.0)),
                         "qwen3", "Qwen3ForCausalLM"),
    # an eps other than both sides' default (1e-6), large enough to move the logits: config.json must carry it
    "full-norm-eps-1e-2": (dict(attention="full", moe=False, norm_eps=1e-2), "qwen3", "Qwen3ForCausalLM"),
}

@pytest.mark.parametrize("variant", NATIVE)
def test_native_export_loads_without_remote_code_and_matches(tmp_path, variant):
    overrides, model_type, cls = NATIVE[variant]
    model, out, fmt = export(tmp_path, **overrides)
    assert fmt == model_type and not (out / "modeling_lit_hsa.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [cls] and "auto_map" not in config
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == cls
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        diff = max_diff(hf_model(x).logits, model(x))
    print(f"{variant} ({model_type}): max |logit diff| {diff:.3g}")
    assert diff <= 1e-4
    assert_generates_like_lit_hsa(hf_model, model, x[:, :19])


def test_native_plan_maps_only_exact_architectures():
    """The choices without building anything, bias combinations included."""

    def plan(qkv_bias=False, out_bias=False, **overrides):
        cfg = tiny(vocab_size=VOCAB, qkv_bias=qkv_bias, attn_out_bias=out_bias, **overrides)
        return native_plan(cfg, HSATransformer(cfg).state_dict())

    dense = dict(moe=False)
    assert plan(attention="full", **dense)[0] == "qwen3"
    assert plan(attention="full", qk_norm=False, **dense)[0] == "llama"
    assert plan(attention="swa", qk_norm=False, **dense)[0] == "mistral"
    assert plan(attention="swa", **dense)[0] == "qwen3"
    assert plan(attention="swa", qk_norm=False, qkv_bias=True, **dense)[0] == "qwen2"
    assert plan(attention="full", qk_norm=False, qkv_bias=True, out_bias=True, **dense)[0] == "llama"
    assert plan(attention="full", qkv_bias=True, out_bias=True, **dense)[0] == "qwen3"
    for why, kwargs in [("HSA", {}), ("MoE", dict(attention="full")),
                        ("output alone", dict(attention="full", out_bias=True, **dense)),
                        ("QK-norm with q/k/v biases", dict(attention="full", qkv_bias=True, **dense)),
                        ("sliding-window attention with biases", dict(attention="swa", qk_norm=False, qkv_bias=True,
                                                                      out_bias=True, **dense))]:
        model_type, reason = plan(**kwargs)
        assert model_type is None and why in reason
    cfg = tiny(vocab_size=VOCAB, attention="full", moe=False)
    assert native_plan(cfg, {"lower.0.extra.weight": None})[1].startswith("weights without a qwen3 name")


# ------------------------------------------------------------------------------------------------ tokenizers

TEXTS = ["plain ASCII: The quick brown fox, 42!", "multi-byte: héllo wörld — €5, 日本語, 😀🚀", "  lead\tand\ttabs\n\n",
         "trailing   \r\n", "\x00\x01\x7f controls", "", " ", "<|endoftext|> as text", "<pad>"]


def test_byte_tokenizer_export_encodes_and_decodes_as_byte_tokenizer(tmp_path):
    _, out, _ = export(tmp_path)
    byte = ByteTokenizer()
    auto = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id) == (EOS, PAD, None)
    everything = "".join(chr(c) for c in range(128)) + "".join(TEXTS) + "ÿ\u0100\uffff\U0010ffff"
    for text in [*TEXTS, everything]:
        ids = byte.encode(text).tolist()
        assert auto(text)["input_ids"] == ids, text  # add_special_tokens=True by default: nothing added
        assert auto.decode(ids) == byte.decode(ids) == text
        if "<|endoftext|>" not in text and "<pad>" not in text:  # tokenizers matches added tokens in text
            assert raw.encode(text, add_special_tokens=False).ids == ids
    broken = [0xE2, 0x82, 0x41, 0xFF, EOS, 0x41, PAD]  # cut-off euro sign, a byte that is never UTF-8, specials
    assert auto.decode(broken, skip_special_tokens=True) == byte.decode(broken)
    # lit-hsa reads the exported file as an HFTokenizer with the byte tokenizer's ids
    read_back = HFTokenizer(str(out / "tokenizer.json"))
    assert (read_back.eos_id, read_back.pad_id, read_back.vocab_size) == (EOS, PAD, byte.vocab_size)
    assert read_back.encode(TEXTS[1]).tolist() == byte.encode(TEXTS[1]).tolist()


def test_tokenizer_json_checkpoint_exports_the_ids_lit_hsa_uses(tmp_path):
    """A BPE tokenizer.json whose post-processor adds BOS: lit-hsa never applies it, so neither does the export."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world, hello there"] * 20 + TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path / "tok.json"
    tok.save(str(path))
    lit = HFTokenizer(str(path))
    model = random_model(tiny(vocab_size=320))
    out = tmp_path / "export"
    export_checkpoint(str(write_ckpt(tmp_path / "m.ckpt", model, tokenizer=str(path))), str(out))
    auto = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    for text in TEXTS[:4]:
        assert auto(text)["input_ids"] == lit.encode(text).tolist()
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == auto.eos_token_id == lit.eos_id == tok.token_to_id("<|endoftext|>")
    assert read_lit_hsa_dir(str(out))[3] == "<|endoftext|>"


# ------------------------------------------------------------------------------------------------ reading back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    """checkpoint → export → read_lit_hsa_dir: the same config and tensors (values, dtype), in the checkpoint's
    dtype; the model built from them gives the checkpoint model's logits; the tokenizer reads back with its ids."""
    model = random_model(tiny(vocab_size=VOCAB, hsa_layer_swa=True, pos_decay=True))
    ckpt = write_ckpt(tmp_path / "m.ckpt", model, dtype=dtype)
    out = tmp_path / "export"
    export_checkpoint(str(ckpt), str(out))
    cfg, state, tokenizer, eos = read_lit_hsa_dir(str(out))
    saved = torch.load(ckpt, weights_only=True)
    assert cfg == ModelConfig(**saved["hyper_parameters"]["model"])
    want = {k.removeprefix("model."): v for k, v in saved["state_dict"].items()}
    assert state.keys() == want.keys()
    for k, v in want.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    rebuilt = HSATransformer(cfg).eval()
    rebuilt.load_state_dict(state)  # strict: every tensor the model has
    if dtype == torch.float32:
        x = torch.randint(0, 256, (1, 24))
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))
    read_back = HFTokenizer(tokenizer, eos)
    assert (eos, read_back.eos_id, read_back.pad_id) == ("<|endoftext|>", EOS, PAD)


# ------------------------------------------------------------------------------------------------ bad input


def one_line_error(fn, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_export_refuses_bad_input_in_one_line(tmp_path):
    out = tmp_path / "out"
    one_line_error(lambda: export_checkpoint(str(tmp_path / "missing.ckpt"), str(out)), "does not exist")
    model = random_model(tiny(vocab_size=VOCAB, attention="full", moe=False))
    lora = tmp_path / "lora.ckpt"
    torch.save({"lora_base": {"path": "base.ckpt"}, "state_dict": {}, "hyper_parameters": {}}, lora)
    one_line_error(lambda: export_checkpoint(str(lora), str(out)),
                   r"python main\.py merge --ckpt .* --out merged\.ckpt")
    ckpt = write_ckpt(tmp_path / "m.ckpt", model)
    one_line_error(lambda: export_checkpoint(str(ckpt), str(out), native="always"), "--native")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(lambda: export_checkpoint(str(ckpt), str(out)), "not empty")
    assert not (out / "config.json").exists()
    # overwrite replaces an earlier export's files: a lit_hsa export's remote code does not outlive a native one
    assert export_checkpoint(str(ckpt), str(out), native="never", overwrite=True) == "lit_hsa"
    assert (out / "modeling_lit_hsa.py").exists()
    assert export_checkpoint(str(ckpt), str(out), overwrite=True) == "qwen3"
    assert not (out / "modeling_lit_hsa.py").exists() and (out / "notes.txt").read_text() == "mine"


def test_read_lit_hsa_dir_refuses_bad_input_in_one_line(tmp_path):
    one_line_error(lambda: read_lit_hsa_dir(str(tmp_path)), "no config.json")
    model = random_model(tiny(vocab_size=VOCAB, attention="full", moe=False))
    ckpt = write_ckpt(tmp_path / "m.ckpt", model)
    export_checkpoint(str(ckpt), str(tmp_path / "native"))
    one_line_error(lambda: read_lit_hsa_dir(str(tmp_path / "native")), "'qwen3' model, not a lit_hsa export")

    out = tmp_path / "lit"
    export_checkpoint(str(ckpt), str(out), native="never")
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))

    def rewrite(changed: dict):
        save_file(changed, str(weights), metadata={"format": "pt"})

    rewrite({k: v for k, v in tensors.items() if k != "model.norm.weight"})
    one_line_error(lambda: read_lit_hsa_dir(str(out)), "missing norm.weight")
    rewrite({**tensors, "model.norm.weight": torch.ones(7)})
    one_line_error(lambda: read_lit_hsa_dir(str(out)), r"norm.weight \(7,\) vs \(32,\)")
    rewrite({**tensors, "extra": torch.ones(1)})
    one_line_error(lambda: read_lit_hsa_dir(str(out)), "unexpected extra")
    rewrite(tensors)
    assert read_lit_hsa_dir(str(out))[0] == model.cfg
    weights.unlink()
    one_line_error(lambda: read_lit_hsa_dir(str(out)), "no model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["lit_hsa"]["no_such_key"] = 1
    (out / "config.json").write_text(json.dumps(config))
    one_line_error(lambda: read_lit_hsa_dir(str(out)), "no valid lit_hsa model config")
    shutil.rmtree(out)


@pytest.mark.parametrize("native", ["auto", "never"])
def test_exported_files_all_follow_the_umask(tmp_path, native):
    """safetensors writes its file through a private temporary (0600): the weights were unreadable to the group and
    others while every other exported file followed the umask."""
    model = random_model(tiny(vocab_size=VOCAB, attention="full", moe=False))
    ckpt = write_ckpt(tmp_path / "m.ckpt", model)
    old = os.umask(0o022)
    try:
        export_checkpoint(str(ckpt), str(tmp_path / "out"), native=native)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
