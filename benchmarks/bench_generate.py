"""Long-context inference on one GPU (issue 6): segment prefill time and peak memory against context length, and
decode latency per token with N tokens cached, for HSA (chunk K/V on GPU or offloaded to host) against the same
model with `attention: full` and a KV cache. Random weights (speed and memory do not depend on them).

    python benchmarks/bench_generate.py [--preset small] [--lengths 4k,64k,1m,4m] [--segment 16k] [--out f.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_hsa.config import ModelConfig  # noqa: E402
from lit_hsa.eval.ruler import parse_length  # noqa: E402
from lit_hsa.generate import prefill  # noqa: E402
from lit_hsa.model import HSATransformer  # noqa: E402


@torch.no_grad()
def measure(model: HSATransformer, T: int, segment: int, offload: bool, decode_steps: int = 16) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, T), device="cuda")
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, state = prefill(model, prompt, segment, offload_memory=offload)
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - start
            token = logits.argmax(-1, keepdim=True)
            model(token, state=state)  # warm-up of the one-token path
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(decode_steps):
                token = model(token, state=state)[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        decode_ms = (time.perf_counter() - start) / decode_steps * 1e3
        return {"ok": True, "prefill_s": round(prefill_s, 3), "prefill_us_per_token": round(prefill_s / T * 1e6, 2),
                "decode_ms_per_token": round(decode_ms, 2),
                "peak_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)}
    except torch.OutOfMemoryError:
        return {"ok": False, "oom": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lengths", default="4k,16k,64k,256k,1m,4m")
    parser.add_argument("--full-lengths", default="4k,16k,64k,256k,1m", help="lengths for the full-attention model")
    parser.add_argument("--segment", default="16k")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    segment = parse_length(args.segment)
    rows = []
    for attention, offloads, lengths in (("hsa", (False, True), args.lengths), ("full", (False,), args.full_lengths)):
        model = HSATransformer(ModelConfig.from_name(args.preset, attention=attention)).cuda().eval()
        for offload in offloads:
            for T in (parse_length(x) for x in lengths.split(",")):
                r = {"attention": attention, "offload": offload, "T": T, **measure(model, T, segment, offload)}
                rows.append(r)
                print(r, flush=True)
                if not r["ok"]:
                    break
        del model
    print(f"\n{args.preset} on {torch.cuda.get_device_name()}, bf16, batch 1, prefill segments of {segment:,}")
    print("| model | K/V | context | prefill s | µs/token | decode ms/token | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        kv = "host" if r["offload"] else "GPU"
        if r["ok"]:
            print(f"| {r['attention']} | {kv} | {r['T']:,} | {r['prefill_s']} | {r['prefill_us_per_token']} | "
                  f"{r['decode_ms_per_token']} | {r['peak_gib']} |")
        else:
            print(f"| {r['attention']} | {kv} | {r['T']:,} | OOM | | | |")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
