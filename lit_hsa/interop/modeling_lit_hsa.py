"""lit-hsa models (HSA, SWA, full attention; dense or MoE) as Hugging Face ``transformers`` models.

Exported model directories (``python main.py export``) carry this file, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads a ``LitHSAForCausalLM``. It runs lit-hsa's own code, so the ``lit_hsa`` package must be installed
(``pip install lit-hsa``, or ``pip install -e .`` in a clone); this file adds only the ``transformers`` wrapper:

- ``LitHSAConfig``: the lit-hsa ``ModelConfig`` as the nested dict ``config.lit_hsa``, plus the token ids.
- ``LitHSAForCausalLM``: ``lit_hsa.model.transformer.HSATransformer`` under ``self.model`` (weights ``model.<our
  name>``). ``forward(input_ids, attention_mask=None, labels=None, cache=None, use_cache=None)`` → logits
  [B, T, V] (and the mean next-token cross-entropy when ``labels`` [B, T] are given, shifted inside as in every
  ``transformers`` causal LM; without the MoE balance loss of lit-hsa's training).
- ``generate()`` decodes incrementally through lit-hsa's decoding state (``lit_hsa.inference.decode.DecodeState``:
  bounded sliding-window caches, the chunk memory of HSA, full-attention caches) carried between steps as the
  cache (``LitHSACache``), exactly as ``lit_hsa.inference.generate.generate`` does: greedy outputs are the same.
  With ``use_cache=False`` every step recomputes the whole sequence. Beam search and assisted decoding reorder or
  crop caches, which this state cannot do: they need ``use_cache=False``.

lit-hsa has no padding mask: ``attention_mask`` may be given but must be all ones (batches of equal-length rows).
The tokenizer: ``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)`` (transformers 5 reads config.json
first: without the flag it asks whether to run this file, then falls back to a plain config; the tokenizer is the
same). Tested with transformers 5.25.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lit_hsa.inference.decode import DecodeState, decode_forward, uncompiled
from lit_hsa.model.config import ModelConfig
from lit_hsa.model.loss import IGNORE_INDEX
from lit_hsa.model.transformer import HSATransformer

# The output field of the cache: `cache` in transformers 5 (`past_key_values` before), which `generate()` reads back.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Prompt tokens per prefill step: lit_hsa.inference.generate.generate's default segment_size, so that prefill (and
# with it every later logit) runs the same computations as lit-hsa's own generate().
PREFILL_SEGMENT = 4096


class LitHSAConfig(PretrainedConfig):
    """``lit_hsa``: ``dataclasses.asdict(ModelConfig)``; ``vocab_size`` defaults to its vocabulary."""

    model_type = "lit_hsa"

    def __init__(self, lit_hsa: dict | None = None, vocab_size: int | None = None, **kwargs):
        self.lit_hsa = dict(lit_hsa or {})
        self.vocab_size = vocab_size if vocab_size is not None else self.lit_hsa.get("vocab_size")
        # The model ties its head to the embedding itself (one tensor): transformers has nothing to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.lit_hsa)


class LitHSACache:
    """lit-hsa's decoding state between ``generate()`` steps: ``state`` holds every layer's cache; its position is
    the number of tokens already fed."""

    def __init__(self):
        self.state = DecodeState()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.pos

    # generate() reorders (beam search) or crops (assisted decoding) a cache that has these methods, and silently
    # skips one that has not: refuse instead of decoding from the wrong rows.
    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        raise NotImplementedError("lit-hsa's decoding state cannot be reordered for beam search: pass use_cache=False")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("lit-hsa's decoding state cannot be cropped (assisted decoding): pass "
                                  "use_cache=False")


def fresh_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The non-persistent buffers of a newly built ``HSATransformer(cfg)`` (rotary frequencies, MoE load counters)
    by name, computed on the CPU while every parameter is sent to the meta device as it is registered (no weight
    memory used), so they are whatever lit-hsa computes, however it computes them."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, None if param is None else nn.Parameter(param.to("meta"), param.requires_grad))

    nn.Module.register_parameter = register_on_meta
    try:
        with torch.device("cpu"):
            model = HSATransformer(cfg)
    finally:
        nn.Module.register_parameter = register
    saved = model.state_dict().keys()
    return {name: buffer for name, buffer in model.named_buffers() if name not in saved}


class LitHSAForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LitHSAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: LitHSAConfig):
        super().__init__(config)
        self.model = HSATransformer(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() would otherwise hand forward() a DynamicCache; forward() makes its own LitHSACache instead.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """``from_pretrained`` builds the model on the meta device and loads the saved tensors only: the buffers
        that are not saved are computed here as lit-hsa computes them (tensors it loaded are left alone)."""
        super()._init_weights(module)
        if not hasattr(self, "_fresh_buffers"):
            self._fresh_buffers = fresh_buffers(self.config.model_config())
            self._module_names = {m: name for name, m in self.model.named_modules()}
        prefix = self._module_names.get(module)
        if prefix is None:
            return
        with torch.no_grad():
            for name, buffer in module.named_buffers(recurse=False):
                fresh = self._fresh_buffers.get(f"{prefix}.{name}" if prefix else name)
                if fresh is not None:
                    buffer.copy_(fresh)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.lm_head  # None when tied to the embedding

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache: LitHSACache | None = None,
                                      past_key_values: LitHSACache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        """input_ids: [B, T] all tokens so far → the forward's inputs: only the tokens the cache has not seen."""
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, CACHE_FIELD: cache, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: LitHSACache | None = None,
                past_key_values: LitHSACache | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        """input_ids [B, T] int64 → logits [B, T, V]. ``cache`` (or, with ``use_cache``, a new one): the tokens
        follow those the cache has seen, and it is extended in place. ``labels`` [B, T]: loss of predicting
        labels[:, t + 1] at t (−100 ignored)."""
        if inputs_embeds is not None:
            raise ValueError("LitHSAForCausalLM takes input_ids only, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask has zeros (padding): lit-hsa models have no padding mask; "
                             "pass rows of equal length without padding")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = LitHSACache()
        if cache is not None:
            with uncompiled():  # as lit-hsa's generate(): growing caches must not recompile compiled blocks
                logits = torch.cat([decode_forward(self.model, input_ids[:, s : s + PREFILL_SEGMENT], cache.state)
                                    for s in range(0, input_ids.shape[1], PREFILL_SEGMENT)], dim=1)
        else:
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().to(logits.device),
                                   ignore_index=IGNORE_INDEX)
        if return_dict is False:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
