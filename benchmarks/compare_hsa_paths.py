"""End-to-end check of the Triton HSA path (issue 3): train a preset for N steps on GPU twice from the same
initialisation and data, once with the Triton kernels and once with the PyTorch reference, and compare the losses.

    python benchmarks/compare_hsa_paths.py [--preset small] [--steps 20] [--seq-len 2048] [--out f.json]
"""
from __future__ import annotations

import argparse

import torch
from common import gpu_name, write_result

import lit_hsa.kernels.hsa as hsa
from data_modules.packing import DocumentStream, pack_windows, tokenize
from data_modules.sources import stdlib_files
from data_modules.tokenizers import ByteTokenizer
from lit_hsa.config import ModelConfig
from lit_hsa.model.transformer import HSATransformer


def batches(n: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    tok = ByteTokenizer()
    stream = DocumentStream(stdlib_files(), "text", 0.02)
    windows = pack_windows(tokenize(stream.documents("train", 0, 0, 0, 1), tok), seq_len, tok.eos_id)
    flat = [torch.from_numpy(next(windows)[0].astype("int64")) for _ in range(n * batch_size)]
    return [torch.stack(flat[i * batch_size : (i + 1) * batch_size]) for i in range(n)]


def run(backend: str, cfg: ModelConfig, data: list[torch.Tensor]) -> list[float]:
    hsa.set_backend(backend)
    torch.manual_seed(0)
    model = HSATransformer(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    losses = []
    for x in data:
        x = x.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x[:, :-1], labels=x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cfg = ModelConfig.from_name(args.preset, vocab_size=320)
    data = batches(args.steps, args.batch_size, args.seq_len)
    triton_losses = run("auto", cfg, data)
    reference_losses = run("reference", cfg, data)
    diffs = [abs(a - b) for a, b in zip(triton_losses, reference_losses)]
    print("| step | triton | reference | |diff| |\n|---|---|---|---|")
    for i, (a, b, d) in enumerate(zip(triton_losses, reference_losses, diffs)):
        print(f"| {i} | {a:.4f} | {b:.4f} | {d:.4f} |")
    print(f"max |diff| = {max(diffs):.4f}, final losses {triton_losses[-1]:.4f} vs {reference_losses[-1]:.4f}")
    if args.out:
        write_result(args.out, {"gpu": gpu_name(), "preset": args.preset, "triton": triton_losses,
                                "reference": reference_losses})


if __name__ == "__main__":
    main()
