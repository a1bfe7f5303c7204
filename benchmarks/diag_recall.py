"""Can a model variant *learn* to retrieve beyond its attention window? Associative recall as a learnability probe.

Each sequence is random filler tokens with one key-value pair at a random position in the first half; the last two
tokens repeat the key, and the loss is on predicting the value after it. The pair is far outside the SWA window, so
only full attention or HSA retrieval can solve it. Every variant trains from the same seed on the same batches;
the table shows accuracy on fresh batches by step (chance: 1/16), and the first step at which it reached 0.9.

    python benchmarks/diag_recall.py [--steps 1000] [--variants "full:attention=full" "hsa:attention=hsa" ...]
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from common import write_result

from lit_hsa.config import ModelConfig
from lit_hsa.model.transformer import HSATransformer

VOCAB, N_FILLER, N_KEYS = 64, 32, 16  # filler 0..31, keys 32..47, values 48..63
DEFAULT_VARIANTS = ["full:attention=full", "swa:attention=swa", "hsa:attention=hsa",
                    "hsa-dense:attention=hsa,hsa_topk=16", "hsa-standard:attention=hsa,hsa_residual=standard",
                    "hsa-norm:attention=hsa,retrieval_norm=true",
                    "hsa-standard-norm:attention=hsa,hsa_residual=standard,retrieval_norm=true"]


def recall_batch(n: int, seq_len: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """→ tokens [n, seq_len], labels [n, seq_len] (−100 except the value after the final key)."""
    x = torch.randint(0, N_FILLER, (n, seq_len), generator=generator)
    k = torch.randint(N_FILLER, N_FILLER + N_KEYS, (n,), generator=generator)
    v = torch.randint(N_FILLER + N_KEYS, VOCAB, (n,), generator=generator)
    pos = torch.randint(8, seq_len // 2, (n,), generator=generator)
    rows = torch.arange(n)
    x[rows, pos], x[rows, pos + 1] = k, v
    x[:, -2], x[:, -1] = k, v
    labels = torch.full((n, seq_len), -100)
    labels[:, -2] = v
    return x.to(device), labels.to(device)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
    return name, overrides


def train_variant(overrides: dict, args, device) -> dict:
    base = dict(name="tiny", vocab_size=VOCAB, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, n_lower_layers=2,
                n_groups=1, swa_layers_per_group=1, swa_window=16, chunk_size=16, hsa_topk=4, moe=False,
                ffn_hidden=256, hsa_kv_heads=1, retrieval_dim=128)
    torch.manual_seed(0)
    model = HSATransformer(ModelConfig(**{**base, **overrides})).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    train_gen, eval_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    curve, solved_at, start = [], None, time.perf_counter()
    for step in range(1, args.steps + 1):
        x, labels = recall_batch(args.batch, args.seq_len, train_gen, device)
        with autocast:
            loss = model(x, labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            x, _ = recall_batch(512, args.seq_len, eval_gen, device)
            with torch.no_grad(), autocast:
                acc = float((model(x)[:, -2].argmax(-1) == x[:, -1]).float().mean())
            curve.append((step, round(acc, 3)))
            if acc >= 0.9 and solved_at is None:
                solved_at = step
    return {"overrides": overrides, "curve": curve, "solved_at": solved_at,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="name:key=value,key=value")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for text in args.variants:
        name, overrides = parse_variant(text)
        results[name] = train_variant(overrides, args, device)
        r = results[name]
        print(f"| {name} | {r['solved_at'] or '—'} | " + " ".join(f"{a:.2f}" for _, a in r["curve"])
              + f" | {r['seconds']:.0f} s |", flush=True)
    if args.out:
        write_result(args.out, {"args": vars(args), "device": str(device), "results": results})


if __name__ == "__main__":
    main()
