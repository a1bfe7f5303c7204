"""Fingerprint of what the code computes, for checking that a refactor changed nothing (issue 34 item 8): on the CPU,
for hsa / swa / full attention, dense and MoE, the logits of a forward pass, the losses of a few `main.py fit` steps,
greedy generation (segment prefill, then cached decoding) and the retrieval eval rows, each as exact values or a
sha256 of the tensor's bytes. Run it in two checkouts and compare the JSON files: equal means bit-identical.

    python benchmarks/behaviour_fingerprint.py --out /tmp/after.json    # in each checkout, then:
    python benchmarks/behaviour_fingerprint.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {f"{attention}-{'moe' if moe else 'dense'}": (attention, moe)
            for attention in ("hsa", "swa", "full") for moe in (False, True)}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def fit_losses(attention: str, moe: bool, root: Path) -> list[float]:
    """The train/loss of 3 steps of the README's main job, shortened, as a user runs it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    name = f"{attention}-{moe}"
    args = [sys.executable, "main.py", "fit", "--config", "configs/tiny.yaml", f"trainer.root_dir={root}",
            f"trainer.run_name={name}", f"model.attention={attention}", f"model.moe={str(moe).lower()}",
            "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "data.num_workers=0",
            "trainer.accelerator=cpu", "trainer.precision=32-true", "data.seq_len=256", "data.batch_size=2"]
    if attention == "full":
        args.append("trainer.topk_schedule=[]")
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    acc = EventAccumulator(str(sorted((root / name).glob("version_*"))[-1])).Reload()
    return [e.value for e in acc.Scalars("train/loss")]


def model_fingerprint(attention: str, moe: bool) -> dict:
    from data_modules.tokenizers import build_tokenizer
    from lit_hsa.config import ModelConfig
    from lit_hsa.eval.ruler import evaluate_retrieval
    from lit_hsa.inference.generate import generate
    from lit_hsa.model.transformer import HSATransformer

    torch.manual_seed(0)
    model = HSATransformer(ModelConfig.from_name("tiny", vocab_size=320, attention=attention, moe=moe)).eval()
    x = torch.randint(0, 256, (2, 384), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    tokens = generate(model, x[:1, :200], 24, segment_size=64)
    tok = build_tokenizer("byte", None)
    haystack = np.frombuffer((ROOT / "README.md").read_bytes() * 4, dtype=np.uint8).astype(np.int32) + 2
    rows = evaluate_retrieval(model, tok, haystack, ["niah_single", "vt"], [512], [0.0, 1.0], samples=1, seed=0,
                              segment_size=128)
    return {"logits": digest(logits), "generated": tokens[0, 200:].tolist(),
            "eval_rows": [(r.task, r.length, r.depth, r.accuracy) for r in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON to write")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprints")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        diffs = [f"{v}.{k}" for v in before for k in before[v] if before[v][k] != after.get(v, {}).get(k)]
        print("bit-identical" if not diffs else "DIFFERENT: " + ", ".join(diffs))
        return 0 if not diffs else 1
    torch.set_num_threads(1)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (attention, moe) in VARIANTS.items():
            result[name] = {**model_fingerprint(attention, moe), "fit_losses": fit_losses(attention, moe, Path(tmp))}
            print(name, result[name]["logits"], result[name]["fit_losses"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
