"""A model folder holding one GGUF file (llama.cpp's format, quantised or not) read as a Hugging Face folder:
``transformers`` (with the ``gguf`` package) dequantises it to float32 into a temporary folder of ``config.json``,
safetensors weights and ``tokenizer.json``, which ``main.py convert`` then reads like any other."""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lit_hsa.config import ConfigError


def gguf_file(folder: Path) -> Path | None:
    """The folder's one ``.gguf`` file when it has no ``config.json`` (None: a plain HF folder, or no folder). Several
    ``.gguf`` files are a ConfigError: which one to read is not for convert to guess."""
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        raise ConfigError(f"'{folder}' holds {len(files)} .gguf files ({', '.join(f.name for f in files)}): "
                          "convert reads a folder with exactly one")
    return files[0] if files else None


@contextmanager
def as_hf_folder(hf_dir: str) -> Iterator[tuple[str, str | None]]:
    """(the folder to read as a Hugging Face model, the GGUF file's name or None). A folder with one ``.gguf`` and
    no ``config.json`` is dequantised into a temporary folder, removed on exit; any other path is given back as it
    is (its errors are the HF reader's)."""
    gguf = gguf_file(Path(hf_dir))
    if gguf is None:
        yield hf_dir, None
        return
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF through it)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ConfigError(f"reading '{gguf.name}' needs the gguf and transformers packages ({e.name} is missing): "
                          "pip install gguf transformers") from None
    with tempfile.TemporaryDirectory(prefix="lit-hsa-gguf-") as tmp:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise ConfigError(f"'{gguf}' could not be read as a GGUF model: {str(e).splitlines()[0]}") from None
        # transformers will not save_pretrained a model loaded from GGUF (it stays flagged as quantised, though its
        # weights are dequantised): the config without that flag and the weights (a tied head once) go out directly
        from safetensors.torch import save_file

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        Path(tmp, "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(Path(tmp, "model.safetensors")))
        tokenizer.save_pretrained(tmp)
        yield tmp, gguf.name
