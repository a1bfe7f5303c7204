"""Fine-tuning memory and speed on one GPU (issue 9): peak memory and tokens/s of full vs LoRA fine-tuning of a preset
at several lengths; batch 1, bf16 autocast (fp32 weights, as `precision: bf16-mixed`), activation checkpointing,
AdamW over the trainable parameters. The base is randomly initialised: speed and memory do not depend on its values.
Prints a markdown table and writes JSON.

    python benchmarks/bench_finetune.py [--preset dense-0.5b] [--lengths 8k,32k] [--targets attention,retrieval]
    python benchmarks/bench_finetune.py --preset tiny --lengths 256     # CPU smoke run (no memory figures)
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from common import gpu_name, result_path, sync, today, write_result

from lit_hsa.config import FinetuneConfig, ModelConfig, parse_length
from lit_hsa.model.lora import apply_lora, cast_frozen_matrices
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.parallel import parallelize


def finetune_steps(cfg: ModelConfig, T: int, lora: FinetuneConfig | None, warmup: int, steps: int,
                   device: torch.device) -> dict:
    """``warmup`` untimed then ``steps`` timed optimizer steps on [1, T] random tokens; ``lora`` None = full
    fine-tuning. → tokens/s, peak GiB (CUDA), trainable parameters; ``{"oom": True}`` when memory runs out."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = opt = None
    try:
        with torch.device(device):
            model = HSATransformer(cfg)
        trainable = apply_lora(model, lora) if lora else sum(p.numel() for p in model.parameters())
        if lora is not None and lora.lora_base_dtype == "bf16":
            cast_frozen_matrices(model, torch.bfloat16)
        parallelize(model, activation_checkpointing=True, compile=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
        x = torch.randint(0, cfg.vocab_size, (1, T + 1), device=device)
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                start = time.perf_counter()
            # bf16 autocast on GPUs (bf16-mixed), and wherever the frozen base is bf16 (its matmuls need it)
            bf16_base = lora is not None and lora.lora_base_dtype == "bf16"
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda or bf16_base):
                loss = model(x[:, :-1], labels=x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        elapsed = (time.perf_counter() - start) / steps
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        return {"ok": True, "tokens_per_s": round(T / elapsed), "s_per_step": round(elapsed, 4), "peak_gib": peak,
                "trainable_params": trainable, "loss": round(loss.item(), 3)}
    except torch.OutOfMemoryError:
        return {"ok": False, "oom": True}
    finally:
        del model, opt
        if cuda:
            torch.cuda.empty_cache()


def _cell(result: dict, key: str) -> str:
    if result.get("oom"):
        return "OOM"
    value = result.get(key)
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def table(rows: list[dict]) -> str:
    lines = ["| T | full tokens/s | LoRA tokens/s | full peak GiB | LoRA peak GiB | trainable full | trainable LoRA |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, lo = r.get("full", {}), r.get("lora", {})
        cells = [_cell(x, key) for key in ("tokens_per_s", "peak_gib", "trainable_params") for x in (f, lo)]
        lines.append(f"| {r['T']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dense-0.5b")
    parser.add_argument("--lengths", default="8k,32k")
    parser.add_argument("--targets", default="attention,retrieval", help="LoRA module groups (finetune.lora_targets)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--base-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="LoRA's frozen base matrices (finetune.lora_base_dtype)")
    parser.add_argument("--methods", default="full,lora", help="which of full, lora to run (a large preset: lora)")
    # The first configuration of a process needed more than 2 untimed steps on an H100 (compilation, autotuning).
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/finetune_<gpu>_<date>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cfg = ModelConfig.from_name(args.preset)
    cfg = replace(cfg, vocab_size=cfg.vocab_size or 32000)
    lora = FinetuneConfig(method="lora", lora_rank=args.rank, lora_alpha=args.alpha,
                          lora_targets=args.targets.split(","), lora_base_dtype=args.base_dtype)
    rows = []
    for T in (parse_length(x) for x in args.lengths.split(",")):
        row = {"T": T}
        for method, ft in (("full", None), ("lora", lora)):
            if method not in args.methods.split(","):
                continue
            row[method] = finetune_steps(cfg, T, ft, args.warmup, args.steps, device)
            print(f"T={T} {method}: {row[method]}", flush=True)
        rows.append(row)

    name = gpu_name(device)
    precision = "bf16 autocast" if device.type == "cuda" or args.base_dtype == "bf16" else "fp32"
    print(f"\n{args.preset} on {name}, {precision}, activation checkpointing, batch 1, "
          f"LoRA rank {args.rank} on {args.targets}\n{table(rows)}")
    result = {"device": name, "preset": args.preset, "precision": precision, "date": today(),
              "lora": {"rank": args.rank, "alpha": args.alpha, "targets": lora.lora_targets,
                       "base_dtype": args.base_dtype},
              "warmup": args.warmup, "steps": args.steps, "rows": rows}
    write_result(args.out or result_path("finetune", device), result)
    return result


if __name__ == "__main__":
    main()
