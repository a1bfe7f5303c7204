"""RULER-style retrieval evaluation (spec §6) over real haystack text, and perplexity by position bucket.

Every sample is built by ``data_modules.synthetic.make_task`` (the generators training mixes in), prefilled in
segments, then answered greedily; ``synthetic.score`` is RULER's string match.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_modules.synthetic import make_task, score
from lit_hsa.inference.decode import DecodeState, decode_forward, uncompiled
from lit_hsa.inference.generate import generate
from lit_hsa.model.transformer import HSATransformer

DEPTHLESS_TASKS = ("self_copy",)


@dataclass
class EvalRow:
    task: str
    length: int
    depth: float | None
    accuracy: float
    samples: int


def retrieval_sample(task: str, length: int, depth: float | None, i: int, seed: int, haystack: np.ndarray,
                     tokenizer):
    """Sample ``i`` of (task, length, depth): deterministic given ``seed``, over a random window of ``haystack``."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), length, int((depth or 0) * 1000), i])
    start = int(rng.integers(0, max(1, len(haystack) - length)))
    return make_task(task, haystack[start : start + length], length, tokenizer, rng, depth)


def check_retrieval_samples(tokenizer, haystack: np.ndarray, tasks: list[str], lengths: list[int],
                            depths: list[float], samples: int, seed: int = 0) -> None:
    """Build every sample ``evaluate_retrieval`` would score (cheap next to decoding them), so that a length too
    short for a task fails before hours of evaluation, not in the middle. Raises make_task's ``ValueError``
    ("length: 64 tokens cannot hold task 'niah_single': its needles, question and answer take 123 tokens")."""
    for task in tasks:
        for length in lengths:
            for depth in ([None] if task in DEPTHLESS_TASKS else depths):
                for i in range(samples):
                    retrieval_sample(task, length, depth, i, seed, haystack, tokenizer)


@torch.no_grad()
def evaluate_retrieval(model: HSATransformer, tokenizer, haystack: np.ndarray, tasks: list[str], lengths: list[int],
                       depths: list[float], samples: int = 4, seed: int = 0, segment_size: int = 4096,
                       device: str | torch.device = "cpu") -> list[EvalRow]:
    """Accuracy per (task, length, depth), each the mean score of ``samples`` generated answers."""
    model.eval()
    rows = []
    for task in tasks:
        for length in lengths:
            for depth in ([None] if task in DEPTHLESS_TASKS else depths):
                total = 0.0
                for i in range(samples):
                    sample = retrieval_sample(task, length, depth, i, seed, haystack, tokenizer)
                    prompt = torch.as_tensor(sample.tokens[: sample.prompt_len], dtype=torch.long)
                    answer = greedy_answer(model, tokenizer, prompt, length - sample.prompt_len, segment_size, device)
                    total += score(sample, answer)
                rows.append(EvalRow(task, length, depth, total / samples, samples))
    return rows


@torch.no_grad()
def greedy_answer(model: HSATransformer, tokenizer, prompt: torch.Tensor, max_new_tokens: int, segment_size: int,
                  device: str | torch.device, stop_at_eos: bool = False) -> str:
    """The text a model generates greedily after ``prompt`` ([P] int64; prefilled in segments); with ``stop_at_eos``,
    up to its first EOS (as a Hugging Face model's generate answers RULER and BABILong)."""
    eos = tokenizer.eos_id if stop_at_eos else None
    out = generate(model, prompt.to(device)[None], max_new_tokens, eos_id=eos, segment_size=segment_size)
    new = out[0, prompt.shape[0] :].tolist()
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new)


@torch.no_grad()
def perplexity_by_position(model: HSATransformer, tokens: np.ndarray, segment_size: int = 4096,
                           device: str | torch.device = "cpu") -> list[dict]:
    """Next-token loss of one long sequence, averaged over position buckets [0, 2^k): does the loss keep falling
    (or at least not rise) past the training length? tokens: [T] int."""
    model.eval()
    x = torch.as_tensor(tokens, dtype=torch.long, device=device)[None]
    state, losses = DecodeState(), []
    for start in range(0, x.shape[1] - 1, segment_size):
        seg = x[:, start : min(start + segment_size, x.shape[1] - 1)]
        with uncompiled():
            logits = decode_forward(model, seg, state)
        target = x[:, start + 1 : start + 1 + seg.shape[1]]
        losses.append(F.cross_entropy(logits[0].float(), target[0], reduction="none").cpu())
    loss = torch.cat(losses)
    rows, lo, hi = [], 0, 1
    while lo < len(loss):
        hi = min(max(hi, 64), len(loss))
        rows.append({"from": lo, "to": hi, "loss": float(loss[lo:hi].mean()), "ppl": float(loss[lo:hi].mean().exp())})
        lo, hi = hi, hi * 2
    return rows


def plot_results(rows: list[EvalRow], out_dir) -> list[str]:
    """accuracy_vs_length.png (one line per task, mean over depths) and depth_length_<task>.png heat-maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = sorted({r.task for r in rows})
    lengths = sorted({r.length for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in tasks:
        acc = [np.mean([r.accuracy for r in rows if r.task == task and r.length == n]) for n in lengths]
        ax.plot(lengths, acc, marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_length.png", dpi=120)
    plt.close(fig)
    written.append("accuracy_vs_length.png")
    for task in tasks:
        depths = sorted({r.depth for r in rows if r.task == task and r.depth is not None})
        if not depths:
            continue
        grid = np.array([[next(r.accuracy for r in rows if (r.task, r.length, r.depth) == (task, n, d))
                          for n in lengths] for d in depths])
        fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 1.2 + 0.5 * len(depths)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [short_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(task)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        name = f"depth_length_{task}.png"
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def short_length(n: int) -> str:
    return f"{n // 1024**2}M" if n >= 1024**2 and n % 1024**2 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def rows_as_dicts(rows: list[EvalRow]) -> list[dict]:
    return [asdict(r) for r in rows]
