"""The one place that writes and reads weights files, and reads the checkpoints a user names (``ckpt_path=``,
``init_from=``, ``--ckpt``) without ever running code from them.

One weights format (``save_weights``): a dict ``{"state_dict": {"model.<name>": tensor}, "hyper_parameters":
{"model": ModelConfig as a dict, "tokenizer", "eos_token", ...}, ...records}``, the layout of the Lightning
checkpoints ``fit`` writes, so ``merge``, ``convert``, ``consolidate``, the experiment's phase ends and trained
weights load wherever a ``fit`` checkpoint does (``generate``, ``eval``, ``init_from=``). Files of the layout the
experiment runner wrote before (``model_config`` + ``state_dict``) are read as this one (``upgrade_layout``).

``torch.load(weights_only=False)`` unpickles anything, so a crafted file runs whatever it likes; every load here is
``weights_only=True``. Our own files need no extra safe globals: Lightning checkpoints (full, LoRA, merged,
consolidated) and ``<model>.weights.pt`` hold only tensors, dicts, lists, tuples, strings and numbers (hyper-parameters
are stored as plain dicts on purpose, see ``HSALitModule.__init__``).

Sharded (folder) checkpoints (FSDP resume, ``main.py consolidate``) are read by the strategy / Lightning: their
``meta.pt`` weights-only, but ``torch.distributed.checkpoint`` reads its own ``.metadata`` file with plain
``pickle.load``: resume or consolidate only folders you trust.
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.fabric.utilities.load import _load_distributed_checkpoint

from data_modules.tokenizers import build_tokenizer
from lit_hsa.config import ConfigError, ModelConfig
from lit_hsa.model.hsa import upgrade_pos_decay
from lit_hsa.model.lora import is_adapter_key
from lit_hsa.model.transformer import HSATransformer

# Lightning's loaders (Trainer.fit/validate, load_from_checkpoint) take this too: their default (None) defers to
# torch's default, which an environment variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn off.
WEIGHTS_ONLY = True

TEMPORARY_MARK = ".tmp-"  # ".<name>.tmp-<pid>": a checkpoint being written by process <pid>


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the previous one is unchanged."""


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(checkpoint: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s folder, fsync, rename over ``path``, fsync the folder. On any
    failure (or interruption) the temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        full = is_out_of_space(e) or free_bytes(path.parent) < FULL_DISK_BYTES  # (before the temporary goes)
        temporary.unlink(missing_ok=True)
        if full:
            raise CheckpointWriteError(f"cannot write checkpoint '{path}': no space left on its filesystem; the "
                                       "previous checkpoint is unchanged: free space or set trainer.root_dir "
                                       "elsewhere") from None
        if isinstance(e, PermissionError):
            raise CheckpointWriteError(f"cannot write checkpoint '{path}': {e.strerror}") from None
        raise
    fsync_folder(path.parent)


FULL_DISK_BYTES = 1 << 20  # a failed write with less free space than this left on the filesystem: a full disk


def is_out_of_space(e: BaseException) -> bool:
    """ENOSPC, as Python raises it, or as torch's zip writer reports it (a RuntimeError naming the failed write)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, RuntimeError) and ("file write failed" in str(e) or "No space left" in str(e))


def free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return FULL_DISK_BYTES


def save_weights(out: str | Path, state: dict[str, torch.Tensor], hparams: dict, **records: Any) -> None:
    """Write ``out`` atomically in the one weights format: ``state`` (the model's state-dict names, without the
    ``model.`` prefix a Lightning checkpoint adds), ``hparams`` (at least ``model``: the ModelConfig as a dict; also
    ``tokenizer``, ``eos_token`` where known) and ``records`` (plain data: what made the file)."""
    if not isinstance(hparams.get("model"), dict):
        raise TypeError("save_weights: hparams['model'] must be the model config as a dict")
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": hparams,
                  "pytorch-lightning_version": lightning.__version__, **records}
    write_atomically(checkpoint, Path(out))


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """The dict saved in checkpoint file ``path``, loaded with ``weights_only=True``. ``mmap``: tensors are mapped
    from the file, not read (for checks of keys and shapes; files of torch's zip format, every other one is read).

    Raises one-line ``ConfigError``s: the file does not exist; it holds objects other than tensors and plain data
    (a pickle that would import and call code: refused, nothing of it runs); it cannot be read (truncated, not a
    PyTorch file, not a dict)."""
    if Path(path).is_dir():
        raise ConfigError(f"checkpoint '{path}' is a folder (a sharded checkpoint?), not a checkpoint file")
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=WEIGHTS_ONLY,
                                mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the first global it refuses ("Unsupported global: GLOBAL os.system");
        # any other unpickling failure is a file that is not a checkpoint at all.
        if "unsupported global" in str(e).lower():  # also "...GLOBAL posix.system whose module posix is blocked"
            raise ConfigError(f"checkpoint '{path}' holds objects other than tensors and plain data: refusing to "
                              "unpickle it (weights_only)") from None
        raise ConfigError(unreadable(path)) from None
    except PermissionError as e:
        raise ConfigError(f"checkpoint '{path}' cannot be read: {e.strerror}") from None
    except Exception:  # RuntimeError (zip reader), EOFError, OSError, KeyError...: what a damaged file raises
        raise ConfigError(unreadable(path)) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a checkpoint's dict")
    upgrade_layout(checkpoint)
    if isinstance(checkpoint.get("state_dict"), dict):
        upgrade_pos_decay(checkpoint["state_dict"])
    return checkpoint


def upgrade_layout(checkpoint: dict) -> None:
    """A file of the experiment runner's former layouts (``{"model_config", "state_dict", ...}``; phase ends with
    ``model.``-prefixed names, trained weights without) → the one weights format, in place."""
    if "model_config" in checkpoint and "hyper_parameters" not in checkpoint:
        checkpoint["hyper_parameters"] = {"model": checkpoint.pop("model_config")}
        state = checkpoint.get("state_dict") or {}
        checkpoint["state_dict"] = {k if k.startswith("model.") else f"model.{k}": v for k, v in state.items()}


def unreadable(path: str | Path) -> str:
    return f"checkpoint '{path}' is not a readable checkpoint (truncated or not a PyTorch file)"


def consolidate(folder: str, out: str) -> None:
    """Gather every rank's shard of a distributed checkpoint into one file that `generate`, `eval`, `init_from=` and
    `HSALitModule.load_from_checkpoint` read like any other (weights, hyper-parameters, optimizer state, step)."""
    if not Path(folder).is_dir():
        raise ConfigError(f"--ckpt '{folder}' is not a sharded checkpoint folder")
    checkpoint = _load_distributed_checkpoint(Path(folder))
    write_atomically(checkpoint, Path(out))
    print(f"wrote {out} ({sum(v.numel() for v in checkpoint['state_dict'].values()):,} parameters)")


def checkpoint_state(path: str, module, mmap: bool = False) -> dict:
    """The model weights of a checkpoint, checked against ``module``: mismatches raise one ConfigError naming them.
    ``mmap``: mapped, not read (``load_checkpoint_file``), for a check whose weights are not used."""
    checkpoint = load_checkpoint_file(path, mmap=mmap)
    if checkpoint.get("lora_base"):
        raise ConfigError(f"checkpoint '{path}' holds LoRA adapters only: resume it with finetune.method=lora, or "
                          f"make a full one with `python main.py merge --ckpt {path} --out merged.ckpt`")
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"checkpoint '{path}' holds no state_dict: not a checkpoint written by `main.py fit`")
    state = checkpoint["state_dict"]
    problems = state_problems(state, {k: v for k, v in module.state_dict().items() if not is_adapter_key(k)})
    if problems:
        raise ConfigError(f"checkpoint '{path}' does not fit this model config ({problems}); check the model.* keys")
    return state


def state_problems(state: dict, own: dict) -> str:
    """The first differences in keys and shapes between a loaded ``state`` and a module's ``own``, one line ('' if
    none)."""
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
    return "; ".join(problems[:4]) + (f"; … {len(problems) - 4} more" if len(problems) > 4 else "")


def full_checkpoint(path: str | Path, mmap: bool = False) -> tuple[ModelConfig, dict, dict]:
    """A full checkpoint (``fit``, ``merge``, ``consolidate``, ``convert``, the experiment's weights) → (its model
    config, its weights by the model's state-dict names in the dtypes saved, the rest of the file: hyper-parameters
    and records), checked against the model the config builds (on the meta device). ``mmap``: tensors mapped from
    the file, not read (``load_checkpoint_file``)."""
    checkpoint = load_checkpoint_file(path, mmap=mmap)
    if checkpoint.get("lora_base"):
        raise ConfigError(f"checkpoint '{path}' holds LoRA adapters only: make a full one with "
                          f"`python main.py merge --ckpt {path} --out merged.ckpt`")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), dict):
        raise ConfigError(f"checkpoint '{path}' records no model hyper-parameters: not a checkpoint of `main.py fit`")
    cfg = ModelConfig(**hparams["model"])
    state = {k[len("model."):]: v for k, v in checkpoint.pop("state_dict", {}).items() if k.startswith("model.")}
    with torch.device("meta"):  # names and shapes only
        problems = state_problems(state, HSATransformer(cfg).state_dict())
    if problems:
        raise ConfigError(f"checkpoint '{path}' does not hold this model's weights ({problems})")
    return cfg, state, checkpoint


def load_net(path: str | Path) -> tuple[HSATransformer, dict]:
    """A file of the one weights format (or any full checkpoint) → (``HSATransformer`` on the CPU in fp32, the whole
    checkpoint dict without its weights: hyper-parameters and records); no Lightning involved."""
    cfg, state, checkpoint = full_checkpoint(path)
    model = HSATransformer(cfg)
    model.load_state_dict(state)  # copies into the fp32 parameters whatever dtype was saved
    return model, checkpoint


def load_model(path: str, device: str):
    """A full checkpoint → (``HSATransformer`` in eval mode on ``device``, tokenizer), from the weights and the plain
    hyper-parameters it records (``full_checkpoint``); no Lightning involved."""
    model, checkpoint = load_net(path)
    hparams = checkpoint["hyper_parameters"]
    tokenizer = build_tokenizer(tokenizer_spec(path, hparams), hparams.get("eos_token"))
    return model.to(device).eval(), tokenizer


def tokenizer_spec(path: str, hparams: dict) -> str:
    """The tokenizer a checkpoint records; a tokenizer.json no longer where it was recorded is looked for beside the
    checkpoint (a converted model's folder, moved or copied elsewhere, keeps its tokenizer there)."""
    spec = hparams.get("tokenizer", "byte")
    if spec != "byte" and not Path(spec).is_file() and (Path(path).parent / Path(spec).name).is_file():
        return str(Path(path).parent / Path(spec).name)
    return spec
