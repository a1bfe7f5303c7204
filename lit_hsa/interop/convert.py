"""``python main.py convert``: a local Hugging Face model directory (or a folder holding one GGUF file) → a lit-hsa
checkpoint (with its tokenizer and a config to continue training from it), as the same network (``--to full``) or as
an HSA model (``--to hsa``)."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from omegaconf import OmegaConf

from lit_hsa.config import ConfigError, ModelConfig, parse_overrides
from lit_hsa.interop.gguf import as_hf_folder
from lit_hsa.interop.hf_export import read_lit_hsa_dir
from lit_hsa.interop.hf_import import read_dense, read_json, write_checkpoint
from lit_hsa.interop.to_hsa import dense_to_hsa

TARGETS = ("full", "hsa")


def model_overrides(overrides: list[str] | None) -> dict:
    """``model.key=value`` strings → {key: typed value}; any other key, or no such model field, is one ConfigError."""
    node = OmegaConf.to_container(parse_overrides(overrides))
    other = [k for k in node if k != "model"]
    if other:
        raise ConfigError(f"convert takes model.* overrides only, got '{other[0]}'")
    known = {f.name for f in fields(ModelConfig)}
    values = node.get("model") or {}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key 'model.{key}'")
    return values


def convert(hf_dir: str, out: str, to: str = "full", overrides: list[str] | None = None, seed: int = 0,
            hsa_out_std: float = 0.0) -> None:
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got '{to}'")
    with as_hf_folder(hf_dir) as (folder, gguf):  # a folder of one .gguf: dequantised into a temporary HF folder
        config = read_json(Path(folder, "config.json"),
                           what="config.json or .gguf file (not a Hugging Face model folder?)")
        if config.get("model_type") == "lit_hsa":  # a directory `main.py export` wrote: read back exactly
            cfg, state, tokenizer, eos_token = read_lit_hsa_dir(folder)
            source = {"hf_dir": str(Path(hf_dir).resolve()), "model_type": "lit_hsa"}
        else:
            imported = read_dense(folder)
            cfg, state, tokenizer, eos_token = imported.cfg, imported.state, imported.tokenizer, imported.eos_token
            source = {"hf_dir": str(Path(hf_dir).resolve()), "model_type": imported.model_type,
                      "dtype": imported.dtype}
        if gguf is not None:
            source["gguf"] = gguf
        values = model_overrides(overrides)
        if to == "hsa":
            cfg, state = dense_to_hsa(cfg, state, seed=seed, out_std=hsa_out_std, **values)
            source["to"] = "hsa"
        elif values or hsa_out_std:
            raise ConfigError("--to full keeps the network as it is: model.* overrides and --hsa-out-std apply with "
                              "--to hsa")
        write_checkpoint(out, cfg, state, tokenizer, eos_token, source)  # copies the tokenizer out of the folder
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out} ({source['model_type']} → {cfg.attention}: {cfg.n_layers} blocks, {n:,} parameters) with "
          f"{Path(out).with_suffix('.yaml')}: python main.py fit --config {Path(out).with_suffix('.yaml')} ...")
