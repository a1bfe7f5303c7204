"""Memory plan of a preset under FSDP2 (issue 23): bytes per GPU for 1, 2, 4, 8 GPUs at a context length with
activation checkpointing, and whether it fits in 80 GB (H100) and 141 GB (H200). Runs on the CPU.

    python benchmarks/memory_plan.py [--preset moe-8b-a1b] [--seq-len 32k] [--out benchmarks/results/...json]

How each term is obtained (bf16-mixed as the configs train: fp32 parameters sharded by FSDP2, bf16 compute):
- parameters, gradients, AdamW moments: counted on a meta-device build, 4 + 4 + 8 bytes per parameter, / N GPUs;
- FSDP2 working set: the largest unit (block or chunk encoder) all-gathered in fp32, twice (the unit in use and the
  one prefetched), plus its unsharded fp32 gradient before the reduce-scatter;
- activations with activation checkpointing: every unit keeps its input (the fp32 residual stream, [T, d]); the
  backward recomputes one unit at a time, whose saved tensors are MEASURED: one unit of each kind is built at the
  preset's widths and run forward at two short lengths on the CPU under bf16 autocast, with saved-tensor hooks
  counting every tensor autograd keeps (shared storage once), fitted as a fixed part (bf16 copies of the unit's
  weights kept for backward) plus a part per token, then taken at the target length. The attention ops (flex SWA, HSA
  attention, chunk selection) are replaced there by stand-ins that keep exactly what their GPU kernels save (q, k, v,
  output and log-sum-exp; q, k, v, weights and indices; q, landmarks and indices): the CPU references keep [T, T] or
  gathered tensors the kernels never build. Everything else (norms, projections, routed and shared experts) is the real
  code;
- the LM loss: one row chunk of fp32 logits and their gradient (``chunked_cross_entropy``'s ``chunk_rows``).
Not counted: the CUDA context and allocator fragmentation (a few GB), the chunk memory's K/V (included in the
chunk encoder's output, small). Measured peaks on a GPU belong next to this plan (pending a GPU session).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch  # noqa: E402
from common import result_path, today, write_result

from lit_hsa.config import ModelConfig, parse_length  # noqa: E402
from lit_hsa.kernels.hsa import hsa_attention_reference, select_chunks_reference  # noqa: E402
from lit_hsa.model import attention as attention_module  # noqa: E402
from lit_hsa.model import hsa as hsa_module  # noqa: E402
from lit_hsa.model.loss import chunked_cross_entropy  # noqa: E402
from lit_hsa.model.transformer import HSATransformer  # noqa: E402
from lit_hsa.model.units import transformer_units  # noqa: E402

GB = 1e9
CAPACITIES = {"H100 80GB": 80, "H200 141GB": 141}


class _Keeps(torch.autograd.Function):
    """Returns ``out`` and keeps ``kept`` for backward, as a GPU kernel's autograd function would."""

    @staticmethod
    def forward(ctx, out, *kept):
        ctx.save_for_backward(*kept)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):  # never called: the plan measures the forward only
        return (grad, *(None for _ in ctx.saved_tensors))


def flex_like_attend(q, k, v, mask):
    """Sliding-window / causal attention keeping what flex_attention keeps: q, k, v, output, log-sum-exp."""
    with torch.no_grad():
        out = torch.zeros_like(q)
        lse = torch.zeros(q.shape[:3], dtype=torch.float32)
    return _Keeps.apply(out.requires_grad_(), q, k, v, out, lse)


def hsa_kernel_like(q, k, v, weights, indices, chunk_size=64, sm_scale=None, off_by_one=False, q_start=0):
    # the output is a placeholder of the right shape (only what is saved is measured): q_start is not needed for it
    with torch.no_grad():
        out = hsa_attention_reference(q[:, :1], k, v, weights[:, :1], indices[:, :1], chunk_size).expand_as(q)
    return _Keeps.apply(out.contiguous().requires_grad_(), q, k, v, weights, indices.to(torch.int32))


def select_kernel_like(q_slc, landmarks, topk, chunk_size=64, doc_ids=None, **kwargs):
    with torch.no_grad():
        scores, indices = select_chunks_reference(q_slc.detach(), landmarks.detach(), topk, chunk_size, doc_ids,
                                                  **kwargs)
    return _Keeps.apply(scores.requires_grad_(), q_slc, landmarks, indices), indices


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps while ``fn()`` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def unit_activations(cfg: ModelConfig, T: int) -> dict[str, int]:
    """Saved-tensor bytes of one unit of each kind (largest block per kind) at length T, bf16 autocast, CPU."""
    torch.manual_seed(0)
    small = ModelConfig(**{**cfg.__dict__, "n_lower_layers": 2, "n_groups": 1, "swa_layers_per_group": 0,
                           "vocab_size": 256})
    model = HSATransformer(small)
    h = torch.randn(1, T, cfg.d_model, requires_grad=True)
    ctx = model.make_context(T, "cpu", None)
    out = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model.memory(h) if model.memory is not None else None
        out["swa_block"] = saved_bytes(lambda: model.lower[-1](h, ctx, None))  # layer ≥ first_dense: MoE if any
        if model.memory is not None:
            out["chunk_encoder"] = saved_bytes(lambda: model.memory(h))
            out["hsa_block"] = saved_bytes(lambda: model.upper[0](h, ctx, memory))
    return out


def build_meta(preset: str) -> tuple[ModelConfig, HSATransformer]:
    """The preset's config (vocabulary 32000 if unset) and its model built on the meta device (no memory)."""
    cfg = ModelConfig.from_name(preset)
    cfg = replace(cfg, vocab_size=cfg.vocab_size or 32000)
    with torch.device("meta"):
        return cfg, HSATransformer(cfg)


def fit_unit_activations(cfg: ModelConfig) -> dict:
    """Saved-tensor bytes of one unit of each kind measured at two short lengths (the attention ops replaced by
    stand-ins keeping what their GPU kernels keep), fitted per kind as ``fixed + per_token · T``."""
    patches = [(attention_module, "attend", flex_like_attend), (hsa_module, "hsa_attention", hsa_kernel_like),
               (hsa_module, "select_chunks", select_kernel_like)]
    originals = [(m, n, getattr(m, n)) for m, n, _ in patches]
    for m, n, f in patches:
        setattr(m, n, f)
    try:
        short = [512, 1024]
        per_kind = [unit_activations(cfg, T) for T in short]
    finally:
        for m, n, f in originals:
            setattr(m, n, f)
    # bytes = fixed + per_token · T per unit kind: the fixed part is what does not grow with T (bf16 copies of the
    # unit's weights kept for backward), fitted from the two lengths
    per_token = {k: (per_kind[1][k] - per_kind[0][k]) / (short[1] - short[0]) for k in per_kind[1]}
    fixed = {k: per_kind[0][k] - per_token[k] * short[0] for k in per_kind[1]}
    return {"short": short, "measured": per_kind, "per_token": per_token, "fixed": fixed}


def activation_bytes(cfg: ModelConfig, fit: dict, n_units: int, seq_len: int) -> dict[str, float]:
    """Activation bytes of one sequence of ``seq_len`` tokens with activation checkpointing (``fit``:
    ``fit_unit_activations``): unit-boundary inputs, the largest recomputed unit, one chunk of the loss."""
    unit_peak = max(fit["fixed"][k] + fit["per_token"][k] * seq_len for k in fit["per_token"])
    checkpoint_inputs = n_units * seq_len * cfg.d_model * 4  # the fp32 residual stream at every unit boundary
    chunk_rows = chunked_cross_entropy.__defaults__[1]
    loss_chunk = 2 * min(chunk_rows, seq_len) * cfg.vocab_size * 4  # fp32 logits of one row chunk + their grad
    return {"checkpoint_inputs": checkpoint_inputs, "unit_peak": unit_peak, "loss_chunk": loss_chunk}


def plan(preset: str, seq_len: int) -> dict:
    cfg, model = build_meta(preset)
    total, active = model.num_parameters()
    units = transformer_units(model)
    largest_unit = max(sum(p.numel() for p in u.parameters()) for u in units)
    fit = fit_unit_activations(cfg)  # measured at two lengths, per unit kind, then scaled linearly
    short, per_kind, per_token, fixed = fit["short"], fit["measured"], fit["per_token"], fit["fixed"]
    n_units = len(units)
    terms = activation_bytes(cfg, fit, n_units, seq_len)
    checkpoint_inputs, unit_peak, loss_chunk = terms["checkpoint_inputs"], terms["unit_peak"], terms["loss_chunk"]
    activations = checkpoint_inputs + unit_peak + loss_chunk
    rows = []
    for n in (1, 2, 4, 8):
        sharded = total * (4 + 4 + 8) / n
        working = largest_unit * 4 * 3  # two all-gathered fp32 units + one unsharded fp32 gradient
        per_gpu = sharded + working + activations
        rows.append({"gpus": n, "params_gb": round(total * 4 / n / GB, 2), "grads_gb": round(total * 4 / n / GB, 2),
                     "adamw_gb": round(total * 8 / n / GB, 2), "fsdp_working_gb": round(working / GB, 2),
                     "activations_gb": round(activations / GB, 2), "total_gb": round(per_gpu / GB, 1),
                     **{f"fits_{k.split()[0]}": per_gpu / GB <= cap for k, cap in CAPACITIES.items()}})
    return {"preset": preset, "seq_len": seq_len, "date": today(), "parameters": total, "active": active,
            "units": n_units, "largest_unit_parameters": largest_unit,
            "activations": {"checkpoint_inputs_gb": round(checkpoint_inputs / GB, 2),
                            "recomputed_unit_gb": round(unit_peak / GB, 2), "loss_chunk_gb": round(loss_chunk / GB, 2),
                            "per_unit_kind_fixed_mb": {k: round(v / 1e6, 1) for k, v in fixed.items()},
                            "per_unit_kind_per_token_kb": {k: round(v / 1e3, 2) for k, v in per_token.items()},
                            "measured_mb": {T: {k: round(v / 1e6, 1) for k, v in m.items()}
                                            for T, m in zip(short, per_kind)}},
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="moe-8b-a1b")
    parser.add_argument("--seq-len", default="32k")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = plan(args.preset, parse_length(args.seq_len))
    print(f"{args.preset}: {result['parameters'] / 1e9:.2f}B parameters ({result['active'] / 1e9:.2f}B active), "
          f"{result['seq_len']} tokens, FSDP2, bf16-mixed, activation checkpointing")
    print("| GPUs | params GB | grads GB | AdamW GB | FSDP working GB | activations GB | total GB/GPU | 80 GB | 141 "
          "GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['gpus']} | {r['params_gb']} | {r['grads_gb']} | {r['adamw_gb']} | {r['fsdp_working_gb']} | "
              f"{r['activations_gb']} | {r['total_gb']} | {'yes' if r['fits_H100'] else 'no'} | "
              f"{'yes' if r['fits_H200'] else 'no'} |")
    print("activations:", result["activations"])
    write_result(args.out or result_path(f"memory_plan_{args.preset}_{args.seq_len}", "cpu"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
