"""``python main.py eval``: retrieval accuracy by task × length × depth and perplexity by position (``--suite
retrieval``), NVIDIA RULER's synthetic tasks (``--suite ruler``, ``eval/ruler_suite.py``) or bAbI in a haystack
(``--suite babilong``, ``eval/babilong.py``) by task × length, written as JSON, PNG plots and TensorBoard events."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from data_modules.packing import tokenize
from data_modules.ruler_tasks import RULER_TASKS, RulerLengthError, essay_words_from_dir
from data_modules.text import build_document_streams
from lit_hsa.checkpoint_io import load_model
from lit_hsa.config import ConfigError, DataConfig, RetrievalEvalOptions, check_choice, load_config, parse_length
from lit_hsa.eval import babilong
from lit_hsa.eval.ruler import (
    check_retrieval_samples,
    evaluate_retrieval,
    perplexity_by_position,
    plot_results,
    rows_as_dicts,
)
from lit_hsa.eval.ruler_suite import evaluate_ruler, plot_ruler, ruler_averages

RETRIEVAL_TASKS = "niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt"  # --tasks' default, --suite retrieval
RETRIEVAL_DEPTHS = "0,0.25,0.5,0.75,1"


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
    depths_text = RETRIEVAL_DEPTHS if args.depths is None else args.depths
    try:
        depths = [float(d) for d in depths_text.split(",")]
    except ValueError:
        raise ConfigError(f"--depths: use comma-separated numbers in [0, 1], got '{depths_text}'") from None
    tasks = RETRIEVAL_TASKS if args.tasks is None else args.tasks
    return RetrievalEvalOptions([t.strip() for t in tasks.split(",") if t.strip()], args.lengths.split(","),
                                depths, args.samples, args.segment_size,
                                names={k: "--" + k.replace("_", "-") for k in ("tasks", "lengths", "depths",
                                                                               "samples", "segment_size")}).validate()


def run_eval(args) -> None:
    if args.suite == "ruler":
        return run_ruler_eval(args)
    if args.suite == "babilong":
        return run_babilong_eval(args)
    if args.essay_dir is not None:
        raise ConfigError("--essay-dir applies to --suite ruler (the retrieval suite's haystack is --config's data)")
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


def suite_cli_options(args, all_tasks: tuple[str, ...], refused: dict[str, bool]) -> tuple[list[str], list[int]]:
    """``main.py eval --suite ruler|babilong``'s options → (tasks, lengths in tokens); ``refused``: {flag: given} of
    the options that suite has no use for, each refused by name."""
    for flag, given in refused.items():
        if given:
            raise ConfigError(f"{flag} does not apply to --suite {args.suite}")
    tasks = list(all_tasks) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"--tasks is empty: name at least one {args.suite} task")
    for task in tasks:
        check_choice("--tasks", task, all_tasks)
    options = RetrievalEvalOptions([], args.lengths.split(","), None, args.samples, args.segment_size,
                                   names={k: "--" + k.replace("_", "-") for k in ("lengths", "samples",
                                                                                  "segment_size")}).validate()
    return tasks, options.token_lengths()


def run_ruler_eval(args) -> None:
    # RULER draws needle depths itself and builds its own haystacks
    tasks, lengths = suite_cli_options(args, tuple(RULER_TASKS), {
        "--depths": args.depths is not None, "--ppl-length": str(args.ppl_length) != "0",
        "--config": args.config is not None})
    essay_words = None  # None: the embedded corpus
    if args.essay_dir is not None:
        try:
            essay_words = essay_words_from_dir(args.essay_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--essay-dir: {e}") from None
    model, tokenizer = load_model(args.ckpt, args.device)
    try:  # every haystack is sized before any decoding: a length that cannot hold a task fails now
        rows = evaluate_ruler(model, tokenizer, tasks, lengths, args.samples, args.seed, args.segment_size,
                              args.device, essay_words)
    except RulerLengthError as e:
        raise ConfigError(f"--lengths: {e}") from None
    write_suite(args, tasks, lengths, rows, "RULER score")


def run_babilong_eval(args) -> None:
    # BABILong spreads the facts over the held-out text of --config's data (the retrieval suite's haystack)
    tasks, lengths = suite_cli_options(args, babilong.TASKS, {
        "--depths": args.depths is not None, "--ppl-length": str(args.ppl_length) != "0",
        "--essay-dir": args.essay_dir is not None})
    data_cfg = load_config(args.config).data if args.config else DataConfig()
    model, tokenizer = load_model(args.ckpt, args.device)
    background = babilong.sentences(tokenizer.decode(held_out_tokens(data_cfg, tokenizer, 2 * max(lengths)).tolist()))
    try:  # every sample is built before any decoding: a length too short for its facts fails now
        rows = babilong.evaluate_babilong(model, tokenizer, tasks, lengths, args.samples, args.seed, background,
                                          args.segment_size, args.device)
    except babilong.BabilongLengthError as e:
        raise ConfigError(f"--lengths: {e}") from None
    write_suite(args, tasks, lengths, rows, "BABILong accuracy (%)")


def write_suite(args, tasks: list[str], lengths: list[int], rows: list[dict], ylabel: str) -> None:
    """<out>/<suite>.json (rows, the mean over tasks per length and overall), <suite>_vs_length.png, TensorBoard
    scalars <suite>/<task>/<length> and <suite>/average/<length>, and a markdown table."""
    suite, averages = args.suite, ruler_averages(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(args.ckpt), "suite": suite, "seed": args.seed, "rows": rows,
              "average_per_length": [{"length": n, "score": s} for n, s in averages["per_length"].items()],
              "average": averages["overall"]}
    (out / f"{suite}.json").write_text(json.dumps(result, indent=2))
    plot = plot_ruler(rows, out, suite, ylabel)
    writer = SummaryWriter(str(out / "tb"))
    for r in rows:
        writer.add_scalar(f"{suite}/{r['task']}/{r['length']}", r["score"], 0)
    for n, score in averages["per_length"].items():
        writer.add_scalar(f"{suite}/average/{n}", score, 0)
    writer.close()

    score = {(r["task"], r["length"]): r["score"] for r in rows}
    print("| task | " + " | ".join(map(str, lengths)) + " |\n|---|" + "---|" * len(lengths))
    for task in tasks:
        print(f"| {task} | " + " | ".join(f"{score[(task, n)]:.2f}" for n in lengths) + " |")
    print("| average | " + " | ".join(f"{averages['per_length'][n]:.2f}" for n in lengths) + " |")
    print(f"{suite} average over lengths: {averages['overall']:.2f}")
    print(f"wrote {out / (suite + '.json')}, {plot} and TensorBoard events in {out / 'tb'}")
