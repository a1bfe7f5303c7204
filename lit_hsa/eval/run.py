"""``python main.py eval``: retrieval accuracy by task × length × depth and perplexity by position, written as
JSON, PNG plots and TensorBoard events."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from data_modules.packing import tokenize
from data_modules.text import build_document_streams
from lit_hsa.checkpoint_io import load_model
from lit_hsa.config import ConfigError, DataConfig, RetrievalEvalOptions, load_config, parse_length
from lit_hsa.eval.ruler import (
    check_retrieval_samples,
    evaluate_retrieval,
    perplexity_by_position,
    plot_results,
    rows_as_dicts,
)


def held_out_prefix(data_cfg: DataConfig, tokenizer, n_tokens: int) -> np.ndarray:
    """The validation split of the data config's sources (documents joined with EOS) up to the first document that
    reaches ``n_tokens`` tokens; all of it, shorter, when the split is smaller."""
    pieces, total = [], 0
    for stream in build_document_streams(data_cfg)[0]:
        for doc in tokenize(stream.documents("val", 0, 0, 0, 1), tokenizer):
            pieces += [doc.tokens, np.array([tokenizer.eos_id] * doc.last, dtype=np.int32)]
            total += len(doc.tokens) + doc.last
            if total >= n_tokens and doc.last:
                return np.concatenate(pieces)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def held_out_tokens(data_cfg: DataConfig, tokenizer, n_tokens: int) -> np.ndarray:
    """At least ``n_tokens`` tokens of the validation split (``held_out_prefix``), cycled if the split is smaller."""
    tokens = held_out_prefix(data_cfg, tokenizer, n_tokens)
    if not len(tokens):
        raise ConfigError("the held-out split of data.sources is empty")
    return tokens if len(tokens) >= n_tokens else np.resize(tokens, n_tokens)


def cli_options(args) -> RetrievalEvalOptions:
    """``main.py eval``'s comma-separated options → validated ``RetrievalEvalOptions`` (messages name the flags)."""
    try:
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        raise ConfigError(f"--depths: use comma-separated numbers in [0, 1], got '{args.depths}'") from None
    return RetrievalEvalOptions([t.strip() for t in args.tasks.split(",") if t.strip()], args.lengths.split(","),
                                depths, args.samples, args.segment_size,
                                names={k: "--" + k.replace("_", "-") for k in ("tasks", "lengths", "depths",
                                                                               "samples", "segment_size")}).validate()


def run_eval(args) -> None:
    options = cli_options(args)
    tasks, lengths, depths = options.tasks, options.token_lengths(), options.depths
    try:
        ppl_length = parse_length(args.ppl_length)
    except ValueError as e:
        raise ConfigError(f"--ppl-length: {e}") from None
    if ppl_length < 0:
        raise ConfigError(f"--ppl-length must be >= 0, got {args.ppl_length}")
    data_cfg = load_config(args.config).data if args.config else DataConfig()

    model, tokenizer = load_model(args.ckpt, args.device)
    haystack = held_out_tokens(data_cfg, tokenizer, max(lengths + [ppl_length]) * 2)
    try:  # a length too short for a task: fail now, not after the lengths before it were evaluated
        check_retrieval_samples(tokenizer, haystack, tasks, lengths, depths, args.samples, args.seed)
    except ValueError as e:
        message = str(e)
        raise ConfigError("--lengths: " + message.removeprefix("length: ") if message.startswith("length: ")
                          else message) from None
    rows = evaluate_retrieval(model, tokenizer, haystack, tasks, lengths, depths, args.samples, args.seed,
                              args.segment_size, args.device)
    ppl = perplexity_by_position(model, haystack[:ppl_length], args.segment_size, args.device) if ppl_length else []

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(args.ckpt), "retrieval": rows_as_dicts(rows), "perplexity_by_position": ppl}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    plots = plot_results(rows, out)
    writer = SummaryWriter(str(out))
    for r in rows:
        tag = f"eval/{r.task}" + (f"/depth{r.depth:.2f}" if r.depth is not None else "")
        writer.add_scalar(tag, r.accuracy, r.length)
    for b in ppl:
        writer.add_scalar("eval/ppl_by_position", b["ppl"], b["to"])
    writer.close()

    print("| task | length | depth | accuracy |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r.task} | {r.length} | {'' if r.depth is None else f'{r.depth:.2f}'} | {r.accuracy:.2f} |")
    for b in ppl:
        print(f"positions [{b['from']}, {b['to']}): loss {b['loss']:.3f}")
    print(f"wrote {out / 'eval.json'} and {', '.join(plots)}")
