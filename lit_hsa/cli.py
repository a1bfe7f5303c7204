"""Command-line entry, argument parsing and dispatch only (nothing imports this module):
``python main.py {fit,validate,generate,eval,experiment,merge,consolidate,convert,export} ...`` (``--help`` on each).

Configuration, checkpoint and data problems are reported as one line on stderr with exit code 2, before any training
starts; a diverged run (non-finite loss or gradients) with exit code 3.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from data_modules.sources import DataError
from lit_hsa.checkpoint_io import CheckpointWriteError, consolidate, load_model
from lit_hsa.config import ConfigError, load_config
from lit_hsa.eval.run import run_eval
from lit_hsa.experiment import run_experiment, seed_list
from lit_hsa.finetune.checkpoints import merge_checkpoint
from lit_hsa.inference.generate import generate
from lit_hsa.interop.convert import convert
from lit_hsa.interop.hf_export import export_checkpoint
from lit_hsa.training.faults import Preempted
from lit_hsa.training.run import run


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", action="append",
                        help="YAML config (configs/tiny.yaml); omitted keys keep their defaults. Repeat it to merge "
                        "several files in order (later keys win)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=30")


def checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `main.py fit`")
    parser.add_argument("--segment-size", type=int, default=4096, help="prefill segment length (bounds memory)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--seed", type=int, default=0)


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    checkpoint_arguments(parser)
    parser.add_argument("--suite", choices=("retrieval", "ruler", "babilong"), default="retrieval",
                        help="retrieval: RULER-style tasks over held-out text, by depth; ruler: NVIDIA RULER's 11 "
                        "synthetic tasks as RULER builds them; babilong: bAbI qa1-qa3 in a haystack, BABILong's "
                        "protocol (docs/experiments.md)")
    parser.add_argument("--tasks", help="comma-separated (default: retrieval "
                        "niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt; ruler: all 11; babilong: "
                        "qa1,qa2,qa3)")
    parser.add_argument("--lengths", default="1k,4k", help="comma-separated, k/m suffixes: 4k,64k,1m")
    parser.add_argument("--depths", help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1; not with --suite ruler)")
    parser.add_argument("--samples", type=int, default=4, help="samples per task × length (× depth)")
    parser.add_argument("--ppl-length", default="0",
                        help="tokens of held-out text for perplexity by position (0: skip)")
    parser.add_argument("--config", help="YAML whose data section names the haystack text (default: embedded corpus; "
                        "retrieval and babilong)")
    parser.add_argument("--essay-dir", help="--suite ruler: text files for RULER's essay haystack (default: the "
                        "embedded corpus)")
    parser.add_argument("--out", default="eval_results",
                        help="folder for eval.json (ruler.json), PNG plots, TensorBoard events")


def experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="experiment YAML (configs/experiments/*.yaml)")
    parser.add_argument("--models", help="comma-separated subset of the file's models (default: all)")
    parser.add_argument("--summarize-only", action="store_true", help="only rebuild the summary from <out_dir>/*.json")
    parser.add_argument("--eval-only", action="store_true", help="evaluate <out_dir>/<model>.weights.pt, no training")
    parser.add_argument("--seeds", type=seed_list, help="comma-separated subset of the file's seeds (default: all)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.trainer.max_steps=10 out_dir=x")


def generate_arguments(parser: argparse.ArgumentParser) -> None:
    checkpoint_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="file holding the prompt (any length: it is prefilled in segments)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--compile", action="store_const", const="inductor", default=None,
                        help="compile the decoding step's blocks (CUDA; tens of seconds once, then faster tokens)")


def ckpt_to_out_arguments(ckpt: str, out: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ckpt", required=True, help=ckpt)
        parser.add_argument("--out", required=True, help=out)
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return add


def merge_arguments(parser: argparse.ArgumentParser) -> None:
    ckpt_to_out_arguments("a LoRA fine-tuning checkpoint (finetune.method=lora)",
                          "the full single-file checkpoint to write")(parser)
    parser.add_argument("--base", help="its base checkpoint (default: the one recorded in --ckpt)")


def convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="the directory (config.json, *.safetensors, tokenizer.json), or a "
                        "folder holding one .gguf file (dequantised with transformers + gguf)")
    parser.add_argument("--out", required=True, help="the checkpoint to write (its tokenizer and a .yaml beside it)")
    parser.add_argument("--to", default="full", choices=("full", "hsa"),
                        help="full: the same network; hsa: SWA + HSA layout, same function at conversion")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new HSA parts (--to hsa)")
    parser.add_argument("--hsa-out-std", type=float, default=0.0,
                        help="--to hsa: draw the HSA output projections from N(0, std²) instead of zero (the "
                        "function then changes a little at conversion); model.hsa_gate=true starts them random "
                        "behind a zero gate instead")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="--to hsa: model.* keys, e.g. model.swa_window=1024 model.hsa_topk=16")


def export_arguments(parser: argparse.ArgumentParser) -> None:
    ckpt_to_out_arguments("a full checkpoint (LoRA: `main.py merge` it first)", "the directory to write")(parser)
    parser.add_argument("--native", default="auto", choices=("auto", "never"),
                        help="auto: a model that is exactly Llama / Qwen2 / Qwen3 / Mistral is written as that "
                        "architecture; never: always the lit_hsa format (trust_remote_code)")


def _cuda() -> bool:
    return torch.cuda.is_available()


def run_generate(args: argparse.Namespace) -> None:
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        raise ConfigError(f"--prompt-file '{args.prompt_file}' does not exist")
    if args.prompt_file is None and not args.prompt:
        raise ConfigError("--prompt is empty: give at least one character")
    if args.segment_size < 1:
        raise ConfigError(f"--segment-size must be >= 1, got {args.segment_size}")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.compile and not str(args.device).startswith("cuda"):
        raise ConfigError(f"--compile speeds up CUDA-graph decoding: it needs a CUDA --device, got '{args.device}'")
    model, tokenizer = load_model(args.ckpt, args.device)
    text = Path(args.prompt_file).read_text() if args.prompt_file is not None else args.prompt
    prompt = torch.as_tensor(tokenizer.encode(text), dtype=torch.long, device=args.device)[None]
    if prompt.shape[1] == 0:
        raise ConfigError(f"the prompt{'' if args.prompt_file is None else f' in {args.prompt_file!r}'} is empty "
                          "(no tokens): give at least one character")
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, tokenizer.eos_id,
                   args.segment_size, torch.Generator(device=args.device).manual_seed(args.seed), compile=args.compile)
    print(tokenizer.decode(out[0, prompt.shape[1] :].tolist()))


def run_experiment_command(args: argparse.Namespace) -> None:
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    run_experiment(args.config, args.overrides, models, args.summarize_only, args.eval_only, args.seeds)


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line description, its arguments, what runs it, and whether ``key=value`` overrides
    may stand between its options (``main.py fit trainer.max_steps=3 --config x.yaml``)."""

    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    intermixed: bool = False


COMMANDS: dict[str, Command] = {
    "fit": Command("Train (or fine-tune, or resume) a model from a YAML config and overrides.", config_arguments,
                   lambda a: run("fit", load_config(a.config, a.overrides)), intermixed=True),
    "validate": Command("Validation loss of a checkpoint (ckpt_path=...) on a config's held-out data.",
                        config_arguments, lambda a: run("validate", load_config(a.config, a.overrides)),
                        intermixed=True),
    "generate": Command("Generate text from a checkpoint.", generate_arguments, run_generate),
    "eval": Command("RULER-style retrieval accuracy and perplexity by position, RULER's suite or BABILong (--suite).",
                    eval_arguments, run_eval),
    "experiment": Command("Train several models with one recipe, evaluate retrieval by length.",
                          experiment_arguments, run_experiment_command, intermixed=True),
    "merge": Command("Fold LoRA adapters into a full checkpoint.", merge_arguments,
                     lambda a: merge_checkpoint(a.ckpt, a.out, a.base)),
    "consolidate": Command("Turn a sharded (FSDP) checkpoint folder into one file.",
                           ckpt_to_out_arguments("the checkpoint folder (…/checkpoints/last.ckpt/)",
                                                 "the single-file checkpoint to write"),
                           lambda a: consolidate(a.ckpt, a.out)),
    "convert": Command("A local Hugging Face model directory → a lit-hsa checkpoint.", convert_arguments,
                       lambda a: convert(a.hf, a.out, a.to, a.overrides, a.seed, a.hsa_out_std), intermixed=True),
    "export": Command("A lit-hsa checkpoint → a Hugging Face model directory.", export_arguments,
                      lambda a: export_checkpoint(a.ckpt, a.out, a.native, a.overwrite)),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """``main.py`` and one argparse subcommand per ``COMMANDS`` entry (``main.py --help`` lists them)."""
    parser = argparse.ArgumentParser(prog="main.py", description="Train and evaluate HSA-UltraLong models.")
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    commands = {}
    for name, command in COMMANDS.items():
        commands[name] = subparsers.add_parser(name, help=command.description, description=command.description)
        command.arguments(commands[name])
    return parser, commands


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser, commands = build_parser()
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].intermixed:
        # argparse cannot intermix through subparsers: the subcommand's own parser reads the rest
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def one_line(error: Exception) -> str:
    """A DataLoader worker re-raises our error with the worker's traceback in the message: keep its last line."""
    last = str(error).strip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command in ("merge", "consolidate", "convert") and Path(args.out).exists() and not args.overwrite:
            raise ConfigError(f"--out '{args.out}' exists: pass --overwrite to replace it")
        COMMANDS[args.command].run(args)
    except (ConfigError, DataError, CheckpointWriteError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM / SIGUSR1: saved, and says so; 143 = 128 + SIGTERM, as a killed job
        print(f"lit-hsa: {e}", file=sys.stderr)
        return 143
    except SIGTERMException:  # Lightning's own handler, before training started: nothing to save yet
        print("lit-hsa: stopped by SIGTERM before the first training step; nothing was saved", file=sys.stderr)
        return 143
    except FloatingPointError as e:  # NonFiniteLossError (trainer.nan_policy: stop)
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0
