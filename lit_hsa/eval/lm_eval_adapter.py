"""The model ``lit_hsa`` for EleutherAI's lm-evaluation-harness (the ``eval`` extra: ``pip install 'lit-hsa[eval]'``):
any harness task on a lit-hsa checkpoint, scored through our own decoding path (segment prefill and cached steps,
``lit_hsa.inference``), with the checkpoint's own tokenizer (byte or BPE).

    python -m lit_hsa.eval.lm_eval_adapter --model lit_hsa --model_args ckpt=run/checkpoints/last.ckpt \\
        --tasks lambada_openai,hellaswag --batch_size 4 --output_path results/

The harness finds models only in its registry, which imports fill: its ``lm_eval`` command loads no plugins (no
entry points) and ``--include_path`` adds tasks, not models. So this module registers ``lit_hsa`` and, run with
``python -m``, hands its arguments to the harness's own command line (every ``lm_eval`` option and subcommand works).
In Python: ``import lit_hsa.eval.lm_eval_adapter`` first, then ``lm_eval.simple_evaluate(model="lit_hsa", ...)``.

The requests mirror ``lm_eval/models/huggingface.py``: loglikelihood scores a continuation after its context, left-
truncated to ``max_length`` tokens of input; loglikelihood_rolling sums disjoint windows of ``max_length``
(``get_rolling_token_windows``); generate_until decodes greedily up to ``max_gen_toks`` tokens, EOS or a stop string.
Importing ``lit_hsa`` never imports this module, nor lm-eval.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    raise ImportError(f"the lm-eval adapter needs the eval extra ({e.name} is not installed): "
                      "pip install 'lit-hsa[eval]'") from e
from tqdm import tqdm

from lit_hsa.checkpoint_io import load_model
from lit_hsa.inference.decode import DecodeState, decode_forward, uncompiled
from lit_hsa.inference.generate import generate, prefill
from lit_hsa.model.transformer import HSATransformer

MODEL_NAME = "lit_hsa"
# A checkpoint records no sequence length (and HSA has no positional limit): without the run's config.yaml beside it,
# the harness's own default for a model that declares no maximum (HFLM's).
DEFAULT_MAX_LENGTH = 2048
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # autocast dtypes (None: off)
# Options of transformers' generate that change nothing in greedy decoding (they shape sampling only).
SAMPLING_ONLY = ("top_p", "top_k", "min_p")

log = logging.getLogger(__name__)


def recorded_training_length(ckpt: str | Path) -> int | None:
    """The longest sequence length a ``main.py fit`` run trained at (``data.seq_len``, or the longest stage of
    ``trainer.seq_len_schedule``), from the ``config.yaml`` fit saves in the run folder that holds ``checkpoints/``;
    None for a checkpoint anywhere else (merged, converted, moved), whose file records no length."""
    path = Path(ckpt).resolve()
    config = path.parent.parent / "config.yaml"
    if path.parent.name != "checkpoints" or not config.is_file():
        return None
    cfg = OmegaConf.load(config)
    stages = OmegaConf.select(cfg, "trainer.seq_len_schedule") or []
    lengths = [OmegaConf.select(cfg, "data.seq_len"), *(seq_len for _, seq_len in stages)]
    return max((int(n) for n in lengths if n is not None), default=None)


@torch.no_grad()
def tail_logits(model: HSATransformer, tokens: torch.Tensor, n: int, segment_size: int) -> torch.Tensor:
    """Logits [B, n, V] of the last ``n`` positions of tokens [B, T]: the positions before them are prefilled in
    segments without keeping their logits (a long context's [T, V] logits would not fit), the last ``n`` follow in
    segments through the same decoding state. Equals the full forward's logits there (``decode_forward``)."""
    split = tokens.shape[1] - n
    state = DecodeState()
    if split > 0:
        prefill(model, tokens[:, :split], segment_size, state)
    with uncompiled():
        parts = [decode_forward(model, tokens[:, start : start + segment_size], state)
                 for start in range(split, tokens.shape[1], segment_size)]
    return torch.cat(parts, dim=1)


def greedy_until(model: HSATransformer, tokenizer, prompt: list[int], max_new_tokens: int, until: list[str],
                 segment_size: int) -> str:
    """The text greedy decoding appends to ``prompt`` (token ids, prefilled in segments), one cached step per token,
    up to ``max_new_tokens`` tokens, the tokenizer's EOS, or the first of the ``until`` strings (cut there). Steps run
    eagerly: a CUDA graph captured per request would cost more than the few tokens a harness answer takes."""
    def stop(new: torch.Tensor) -> bool:
        text = tokenizer.decode(new[0].tolist())
        return any(s and s in text for s in until)

    out = generate(model, torch.tensor([prompt], device=model.embed.weight.device), max_new_tokens,
                   eos_id=tokenizer.eos_id, segment_size=segment_size, cuda_graphs=False, stop=stop)
    new = out[0, len(prompt):].tolist()
    if new and new[-1] == tokenizer.eos_id:
        new.pop()
    return postprocess_generated_text(tokenizer.decode(new), until, None)


class LitHSALM(TemplateLM):
    """A lit-hsa checkpoint as a harness model. ``--model_args``: ``ckpt`` (required: any full checkpoint that
    ``main.py generate`` reads), ``device`` (or ``--device``; default cuda if available), ``dtype`` (auto: bfloat16
    autocast on CUDA, as the models train, float32 elsewhere; float32 | bfloat16 | float16), ``batch_size`` (requests
    of loglikelihood per forward, right-padded; generation runs one request at a time, since our decoding state has
    no padding mask), ``max_length`` (default: the training length, ``recorded_training_length``, else
    ``DEFAULT_MAX_LENGTH``), ``max_gen_toks`` (default 256, as the harness's), ``segment_size`` (prefill segment,
    default 4096)."""

    def __init__(self, ckpt: str, device: str | None = None, dtype: str = "auto", batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256, segment_size: int = 4096,
                 max_batch_size: int | None = None):
        super().__init__()
        del max_batch_size  # the harness passes it for batch_size=auto, which is refused below
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            # (the harness's command line passes --device, default cuda:0, even on a machine without CUDA; HFLM
            # falls back to the CPU there too)
            if device is not None:
                log.warning("lit_hsa: device %s requested, but CUDA is not available: using the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype: one of auto, {', '.join(DTYPES)}; got '{dtype}'")
        self.autocast_dtype = DTYPES[dtype]
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size: a number of requests (batch_size=auto is not supported), got "
                             f"'{batch_size}'") from None
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = load_model(ckpt, str(self._device))
        if max_length is None:
            recorded = recorded_training_length(ckpt)
            max_length = recorded or DEFAULT_MAX_LENGTH
            log.info("lit_hsa: max_length=%d (%s)", max_length,
                     "the run's training length" if recorded else "no config.yaml beside the run: the default")
        self._max_length, self.max_gen_toks, self.segment_size = int(max_length), int(max_gen_toks), int(segment_size)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id  # also the prefix of an empty context (TemplateLM.prefix_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).tolist()  # our tokenizers add no special tokens

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self._device.type, dtype=self.autocast_dtype)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(cache key, context ids, continuation ids) → (sum of the continuation's log-probabilities, whether greedy
        decoding would produce it). The model reads ``(context + continuation)[-(max_length + 1):][:-1]``: the
        context left-truncated so that input and continuation fit ``max_length``."""
        for _, _, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length="
                                 f"{self.max_length}: pass a larger max_length in --model_args")
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first, as the harness's models do: rows of a batch have similar lengths (little padding)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="lit_hsa loglikelihood"):
            rows = order[start : start + self.batch_size]
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in rows]
            width = max(map(len, inputs))
            # right padding: causal attention keeps it out of every real position; the continuations of all rows lie
            # within the last n positions of the batch
            n = width - min(len(x) - len(requests[i][2]) for i, x in zip(rows, inputs))
            batch = torch.tensor([x + [self.eot_token_id] * (width - len(x)) for x in inputs], device=self.device)
            with self.autocast():
                logprobs = tail_logits(self.model, batch, n, self.segment_size).float().log_softmax(dim=-1)
            for row, (i, x) in enumerate(zip(rows, inputs)):
                key, _, continuation = requests[i]
                end = n - (width - len(x))  # one past the position that predicts the last continuation token
                scores = logprobs[row, end - len(continuation) : end]
                target = torch.tensor(continuation, device=scores.device)
                results[i] = (float(scores.gather(-1, target[:, None]).sum()),
                              bool((scores.argmax(dim=-1) == target).all()))
                if key is not None:  # rolling windows have no key: loglikelihood_rolling caches their sum
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood after the EOS token, over disjoint windows of ``max_length`` predicted tokens,
        each with as much preceding text as fits (``get_rolling_token_windows``, as HFLM)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generation_options(self, gen_kwargs: dict) -> tuple[int, list[str]]:
        """A request's generation kwargs → (max_gen_toks, stop strings with the EOS text), normalised as the harness
        does (``max_new_tokens`` and the other aliases); sampling and any option greedy decoding would ignore
        silently are refused."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        if kwargs.pop("do_sample"):
            raise ValueError(f"lit_hsa decodes greedily; this task samples ({gen_kwargs}): set do_sample=false and "
                             "temperature=0 in its generation_kwargs")
        max_gen_toks = kwargs.pop("max_gen_toks")
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
        unsupported = sorted(set(kwargs) - {"temperature", *SAMPLING_ONLY})
        if unsupported:
            raise ValueError(f"lit_hsa's greedy decoding does not support generation options {unsupported}")
        return max_gen_toks, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of each request's context (left-truncated to ``max_length - max_gen_toks``), cut at
        its ``until`` strings."""
        outputs = []
        for req in tqdm(requests, disable=disable_tqdm, desc="lit_hsa generate_until"):
            context, gen_kwargs = req.args
            max_gen_toks, until = self.generation_options(gen_kwargs)
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for the context in max_length="
                                 f"{self.max_length}")
            prompt = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            with self.autocast():
                text = greedy_until(self.model, self.tokenizer, prompt, max_gen_toks, until, self.segment_size)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs


# Registered by import path, not by class: run with `python -m`, this file executes twice, as __main__ and as
# lit_hsa.eval.lm_eval_adapter; both register the same path, and the harness uses the importable module's class.
model_registry.register(MODEL_NAME, target=f"lit_hsa.eval.lm_eval_adapter:{LitHSALM.__name__}")


def main() -> None:
    """lm-eval's own command line (``sys.argv``: ``run``, ``ls``, ``validate`` or the legacy flags) with ``lit_hsa``
    registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
