"""Checkpoint side of LoRA fine-tuning: the frozen base weights of a run (from ``init_from``, or on resume from the
base recorded in the LoRA checkpoint, checked by fingerprint), the check of a LoRA checkpoint's adapters against the
module, and ``main.py merge`` (adapters + base → one full checkpoint).

A LoRA checkpoint is a Lightning checkpoint whose ``state_dict`` holds only ``lora_state_dict`` (adapters and
buffers) and whose ``lora_base`` is ``{"path": base checkpoint, "fingerprint": fingerprint(its state_dict)}``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from lit_hsa.checkpoint_io import checkpoint_state, load_checkpoint_file, save_weights, state_problems
from lit_hsa.config import ConfigError, FinetuneConfig, ModelConfig
from lit_hsa.model.lora import apply_lora, lora_state_dict, merge_lora
from lit_hsa.model.transformer import HSATransformer


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap identity of a set of weights: sha256 over every key, shape, dtype and a strided sample of at most
    ~4096 values per tensor (hashing all of a 0.5B model would read 2 GB for a check)."""
    h = hashlib.sha256()
    for key in sorted(state):
        flat = state[key].detach().reshape(-1)
        h.update(f"{key}{tuple(state[key].shape)}{state[key].dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_base(module, path: str, expected_fingerprint: str | None = None) -> None:
    """Load the frozen base weights of a LoRA ``HSALitModule`` from checkpoint ``path`` (keys and shapes checked
    against the model config); with ``expected_fingerprint`` they must be the weights the adapters were trained on."""
    state = checkpoint_state(path, module)
    found = fingerprint(state)
    if expected_fingerprint is not None and found != expected_fingerprint:
        raise ConfigError(f"base checkpoint '{path}' is not the one the LoRA adapters were trained on (weights "
                          f"fingerprint {found}, expected {expected_fingerprint}); pass the original as init_from=")
    module.load_state_dict(state, strict=False)  # the adapters are not in a base checkpoint (checked above)
    module.lora_base = {"path": str(Path(path).resolve()), "fingerprint": found}


def read_lora_checkpoint(path: str) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"LoRA checkpoint '{path}' does not exist")
    checkpoint = load_checkpoint_file(path)  # weights_only: a crafted file is refused, nothing of it runs
    if not checkpoint.get("lora_base"):
        raise ConfigError(f"'{path}' is not a LoRA checkpoint (it records no base checkpoint); "
                          "to fine-tune from a full checkpoint use init_from=")
    return checkpoint


def _recorded_base(checkpoint: dict, ckpt_path: str, base: str | None) -> tuple[str, str]:
    """(base checkpoint to load: ``base`` if given, else the recorded one; the fingerprint it must have)."""
    record = checkpoint["lora_base"]
    path = base or record["path"]
    if not Path(path).is_file():
        raise ConfigError(f"base checkpoint '{path}' of LoRA checkpoint '{ckpt_path}' does not exist; "
                          "name the base with init_from= (fit) or --base (merge)")
    return path, record["fingerprint"]


def load_lora_base(module, init_from: str | None, ckpt_path: str | None) -> None:
    """Before a LoRA run: a new run's base is ``init_from``; a resumed one (``ckpt_path``) uses ``init_from`` if given,
    else the base recorded in the checkpoint, and checks it against the recorded fingerprint. Lightning then
    restores adapters, optimizer and step from ``ckpt_path``."""
    if ckpt_path is None:
        load_base(module, init_from)
        return
    load_base(module, *_recorded_base(read_lora_checkpoint(ckpt_path), ckpt_path, init_from))


def check_adapters(module, checkpoint: dict) -> None:
    """A LoRA checkpoint's state must be exactly the module's adapters + buffers, with its base already loaded."""
    if module.lora_base is None:
        raise ConfigError("this checkpoint holds LoRA adapters only (no base weights): fold them into a full one "
                          "with `python main.py merge --ckpt <this checkpoint> --out merged.ckpt`")
    problems = state_problems(checkpoint["state_dict"], lora_state_dict(module))
    if problems:
        raise ConfigError(f"LoRA checkpoint does not fit this fine-tuning config ({problems}); "
                          "check finetune.lora_targets and finetune.lora_rank")


def adapted_model(hparams: dict) -> nn.Module:
    """The model of a LoRA run's hyper-parameters with its adapters, held as ``HSALitModule`` holds it (attribute
    ``model``: state-dict keys ``model.…``, and a ``lora_base`` record), so base and LoRA checkpoints load into it."""
    holder = nn.Module()
    holder.model = HSATransformer(ModelConfig(**hparams["model"]))
    apply_lora(holder.model, FinetuneConfig(**hparams["finetune"]))
    holder.lora_base = None
    return holder


def merge_checkpoint(ckpt_path: str, out: str, base: str | None = None) -> None:
    """LoRA checkpoint + its base → a full single-file checkpoint with plain hyper-parameters (no ``finetune``), which
    ``generate``, ``eval``, ``init_from=`` and ``HSALitModule.load_from_checkpoint`` read like any other."""
    checkpoint = read_lora_checkpoint(ckpt_path)
    hparams = dict(checkpoint["hyper_parameters"])
    module = adapted_model(hparams)
    load_base(module, *_recorded_base(checkpoint, ckpt_path, base))
    check_adapters(module, checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    merge_lora(module.model)
    del hparams["finetune"]
    state = module.model.state_dict()
    save_weights(out, state, hparams, global_step=checkpoint.get("global_step", 0), epoch=checkpoint.get("epoch", 0),
                 merged_from={"lora": str(Path(ckpt_path).resolve()), "base": module.lora_base["path"]})
    print(f"wrote {out} ({sum(v.numel() for v in state.values()):,} parameters)")
