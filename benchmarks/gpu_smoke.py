"""GPU smoke run: every command the README shows, on a GPU, at small sizes, in the precision its config uses.

    python benchmarks/gpu_smoke.py [--work /tmp/gpu_smoke] [--out DIR] [--only fit-tiny,generate-graphs ...]

Each command runs as a user would run it (``python main.py ...`` in a subprocess) with overrides that only shorten
it (steps, validation batches, prompt lengths); configs keep their model, precision, context length and data.
Commands that need a checkpoint take the one an earlier command wrote, so they run in order: the training stages
chain through ``init_from=`` as the README describes, fine-tuning starts from the anneal stage's checkpoint, and
``generate`` / ``eval`` / ``validate`` read what ``fit`` wrote. Prints one line per command (PASS/FAIL, seconds)
and writes ``gpu_smoke.json`` (GPU, date, per command: argv, return code, seconds, the output's tail on failure).
Run it before any stop whose change touches code that runs on GPUs.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import ROOT, gpu_name, today, write_result

# Shortening only: a few optimizer steps, one validation batch, progress bar off.
SHORT = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.checkpoint_every_n_steps=3",
         "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.accumulate_grad_batches=1",
         "trainer.enable_progress_bar=false", "data.val_samples=2"]
STAGES = ("warmup", "pretrain", "midtrain", "anneal", "sft")


@dataclass
class Step:
    name: str
    args: list[str]  # after `python`
    needs: list[str] = field(default_factory=list)  # steps whose outputs this one reads


def last_checkpoint(runs: Path, run_name: str) -> Path:
    """The newest ``last.ckpt`` of a run (a file, or a sharded folder)."""
    found = sorted((runs / run_name).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {runs / run_name}")
    return found[-1]


def plan(work: Path) -> list[Step]:
    runs = work / "runs"
    fit = ["main.py", "fit"]
    root = f"trainer.root_dir={runs}"

    def ckpt(run: str) -> str:
        return str(last_checkpoint(runs, run))

    steps = [
        # the README's main job (fp32, as shipped), and the default MoE model under bf16-mixed
        Step("fit-tiny", [*fit, "--config", "configs/tiny.yaml", root, "trainer.max_steps=30",
                          "trainer.val_check_interval=30", "trainer.checkpoint_every_n_steps=30"]),
        Step("fit-tiny-moe-bf16", [*fit, "--config", "configs/tiny.yaml", root, "trainer.precision=bf16-mixed",
                                   "trainer.run_name=tiny-bf16", *SHORT]),
        # `small` with MoE feed-forwards at 4K under bf16-mixed (the paper's model is MoE)
        Step("fit-small-moe-bf16", [*fit, "--config", "configs/stages/pretrain.yaml", root, "model.moe=true",
                                    "model.n_experts=8", "model.experts_per_token=2", "model.expert_hidden=640",
                                    "model.n_shared_experts=1",
                                    "trainer.run_name=small-moe", *SHORT]),
    ]
    previous = None
    for stage in STAGES:
        # every stage starts from the previous one's weights, as the README's stage commands do
        init = [lambda p=previous: f"init_from={ckpt(f'stage-{p}')}"] if previous else []
        steps.append(Step(f"fit-stage-{stage}", [*fit, "--config", f"configs/stages/{stage}.yaml", root,
                                                 f"trainer.run_name=stage-{stage}", *SHORT, *init],
                          [f"fit-stage-{previous}"] if previous else []))
        previous = stage
    anneal = lambda: f"init_from={ckpt('stage-anneal')}"  # noqa: E731
    steps += [
        Step("finetune-lora", [*fit, "--config", "configs/finetune/lora.yaml", root, *SHORT, anneal],
             ["fit-stage-anneal"]),
        Step("finetune-lora-resume", [*fit, "--config", "configs/finetune/lora.yaml", root, *SHORT,
                                      "trainer.max_steps=5", lambda: f"ckpt_path={ckpt('finetune-lora')}"],
             ["finetune-lora"]),
        Step("merge", ["main.py", "merge", "--ckpt", lambda: ckpt("finetune-lora"), "--out",
                       str(work / "merged.ckpt")], ["finetune-lora"]),
        Step("finetune-full", [*fit, "--config", "configs/finetune/full.yaml", root, *SHORT, anneal],
             ["fit-stage-anneal"]),
        Step("validate", ["main.py", "validate", "--config", "configs/tiny.yaml", root, "trainer.limit_val_batches=2",
                          lambda: f"ckpt_path={ckpt('tiny')}"], ["fit-tiny"]),
        Step("resume-tiny", [*fit, "--config", "configs/tiny.yaml", root, "trainer.max_steps=40",
                             "trainer.val_check_interval=40", "trainer.checkpoint_every_n_steps=40",
                             lambda: f"ckpt_path={ckpt('tiny')}"], ["fit-tiny"]),
        Step("generate-graphs", ["main.py", "generate", "--ckpt", lambda: ckpt("tiny"), "--prompt", "def main(",
                                 "--max-new-tokens", "64"], ["fit-tiny"]),
        Step("generate-merged-small", ["main.py", "generate", "--ckpt", str(work / "merged.ckpt"), "--prompt",
                                       "import os\n" * 200, "--max-new-tokens", "64"], ["merge"]),
        Step("generate-compile", ["main.py", "generate", "--ckpt", str(work / "merged.ckpt"), "--prompt",
                                  "import os\n" * 200, "--max-new-tokens", "64", "--compile"], ["merge"]),
        Step("eval", ["main.py", "eval", "--ckpt", lambda: ckpt("tiny"), "--tasks", "niah_single,niah_multiquery,vt",
                      "--lengths", "1k,4k", "--depths", "0,1", "--samples", "1", "--ppl-length", "4k", "--out",
                      str(work / "eval")], ["fit-tiny"]),
        Step("experiment-1min", ["main.py", "experiment", "--config",
                                 "configs/experiments/length_generalization.yaml", "--models", "hsa",
                                 f"out_dir={work / 'experiment'}", "train.trainer.max_time=00:00:01:00",
                                 "eval.lengths=[1k,4k]", "eval.samples=1"]),
        # Hugging Face round trip (docs/interop.md): a full-attention model out to HF format (native Qwen3), back
        # in as HSA, continued with the shipped recipe in bf16
        Step("fit-tiny-full", [*fit, "--config", "configs/tiny.yaml", root, "model.attention=full", "model.moe=false",
                               "trainer.run_name=tiny-full", *SHORT]),
        Step("export", ["main.py", "export", "--ckpt", lambda: ckpt("tiny-full"), "--out", str(work / "hf")],
             ["fit-tiny-full"]),
        Step("convert-to-hsa", ["main.py", "convert", "--hf", str(work / "hf"), "--out",
                                str(work / "converted" / "model.ckpt"), "--to", "hsa", "model.swa_window=64",
                                "model.chunk_size=32"], ["export"]),
        Step("fit-converted", [*fit, "--config", str(work / "converted" / "model.yaml"), "--config",
                               "configs/convert/hsa_from_dense.yaml", root, "data.seq_len=1024",
                               "trainer.run_name=converted", *SHORT], ["convert-to-hsa"]),
        # the paper recipe's phases (self-copy warm-up, then the main stage), BPE tokens, held-out perplexity
        Step("experiment-paper-recipe", ["main.py", "experiment", "--config", "configs/experiments/paper_recipe.yaml",
                                         "--models", "hsa", "--seeds", "0", f"out_dir={work / 'paper_recipe'}",
                                         "phases.0.max_steps=3", "phases.1.max_steps=3", "eval.lengths=[4k]",
                                         "eval.samples=1", "eval.ppl_windows=2", "eval.ppl_lengths=[4k]"]),
        Step("fit-fsdp-1gpu", [*fit, "--config", "configs/tiny.yaml", root, "trainer.strategy=fsdp",
                               "trainer.devices=1", "trainer.run_name=tiny-fsdp", *SHORT]),
        Step("consolidate", ["main.py", "consolidate", "--ckpt", lambda: ckpt("tiny-fsdp"), "--out",
                             str(work / "consolidated.ckpt")], ["fit-fsdp-1gpu"]),
    ]
    return steps


def run_step(step: Step, timeout: float) -> dict:
    args = [a() if callable(a) else a for a in step.args]
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = -1, f"timed out after {timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
    seconds = time.perf_counter() - start
    row = {"name": step.name, "argv": ["python", *args], "rc": rc, "seconds": round(seconds, 1)}
    if rc != 0:
        row["tail"] = output[-3000:]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/gpu_smoke", help="runs, checkpoints and eval outputs (emptied first)")
    parser.add_argument("--out", default=None, help="folder for gpu_smoke.json (default: --work)")
    parser.add_argument("--only", default=None, help="comma-separated step names (and the steps they need)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per command")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to check the plan; slow)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_smoke: no CUDA device (--allow-cpu runs the commands on the CPU)", file=sys.stderr)
        return 2
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    steps = plan(work)
    wanted = set(args.only.split(",")) if args.only else {s.name for s in steps}
    by_name = {s.name: s for s in steps}
    for name in list(wanted):  # what the chosen steps read
        stack = [name]
        while stack:
            for need in by_name[stack.pop()].needs:
                if need not in wanted:
                    wanted.add(need)
                    stack.append(need)
    out = Path(args.out or work)
    rows, failed = [], set()

    def save() -> dict:  # after every step, so a run cut by a time limit keeps what it ran
        result = {"gpu": gpu_name(), "date": today(), "torch": torch.__version__,
                  "passed": sum(r["rc"] == 0 for r in rows), "total": len(rows), "steps": rows}
        write_result(out / "gpu_smoke.json", result, quiet=True)
        return result

    for step in steps:
        if step.name not in wanted:
            continue
        if failed & set(step.needs):
            row = {"name": step.name, "rc": None, "seconds": 0.0, "skipped": f"needs {', '.join(step.needs)}"}
        else:
            row = run_step(step, args.timeout)
        if row["rc"] != 0:
            failed.add(step.name)
        rows.append(row)
        status = "PASS" if row["rc"] == 0 else ("SKIP" if row["rc"] is None else "FAIL")
        print(f"{status}  {step.name:<24} {row['seconds']:7.1f} s", flush=True)
        if status == "FAIL":
            print("      " + row["tail"].strip().splitlines()[-1][:300] if row["tail"].strip() else "", flush=True)
        save()
    result = save()
    print(f"{result['passed']}/{result['total']} passed on {result['gpu']} -> {out / 'gpu_smoke.json'}")
    return 0 if result["passed"] == result["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
