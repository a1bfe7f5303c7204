"""Reading single-file checkpoints a user names (``ckpt_path=``, ``init_from=``, ``--ckpt``, experiment weights)
without ever running code from them.

``torch.load(weights_only=False)`` unpickles anything, so a crafted file runs whatever it likes; every load here is
``weights_only=True``. Our own files need no extra safe globals: Lightning checkpoints (full, LoRA, merged,
consolidated) and ``<model>.weights.pt`` hold only tensors, dicts, lists, tuples, strings and numbers (hyper-parameters
are stored as plain dicts on purpose, see ``HSALitModule.__init__``).

Sharded (folder) checkpoints (FSDP resume, ``main.py consolidate``) are read by the strategy / Lightning: their
``meta.pt`` weights-only, but ``torch.distributed.checkpoint`` reads its own ``.metadata`` file with plain
``pickle.load``: resume or consolidate only folders you trust.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

# Lightning's loaders (Trainer.fit/validate, load_from_checkpoint) take this too: their default (None) defers to
# torch's default, which an environment variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn off.
WEIGHTS_ONLY = True


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict:
    """The dict saved in checkpoint file ``path``, loaded with ``weights_only=True``.

    Raises one-line ``ConfigError``s: the file does not exist; it holds objects other than tensors and plain data
    (a pickle that would import and call code: refused, nothing of it runs); it cannot be read (truncated, not a
    PyTorch file, not a dict)."""
    if Path(path).is_dir():
        raise ConfigError(f"checkpoint '{path}' is a folder (a sharded checkpoint?), not a checkpoint file")
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=WEIGHTS_ONLY)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the first global it refuses ("Unsupported global: GLOBAL os.system");
        # any other unpickling failure is a file that is not a checkpoint at all.
        if "Unsupported global" in str(e):
            raise ConfigError(f"checkpoint '{path}' holds objects other than tensors and plain data: refusing to "
                              "unpickle it (weights_only)") from None
        raise ConfigError(unreadable(path)) from None
    except PermissionError as e:
        raise ConfigError(f"checkpoint '{path}' cannot be read: {e.strerror}") from None
    except Exception:  # RuntimeError (zip reader), EOFError, OSError, KeyError...: what a damaged file raises
        raise ConfigError(unreadable(path)) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a checkpoint's dict")
    return checkpoint


def unreadable(path: str | Path) -> str:
    return f"checkpoint '{path}' is not a readable checkpoint (truncated or not a PyTorch file)"
