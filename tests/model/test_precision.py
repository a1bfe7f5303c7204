"""Precision paths on CPU: what the GPU configs run (bf16 autocast, or a model cast to bf16), checked where CI can
see it. CPU autocast to bf16 takes the same dtype decisions as CUDA autocast (matmuls and linears in bf16, norms,
softmax and losses where the code asks for fp32), so a dtype mismatch that crashes a GPU run crashes here too.

The matrix: attention hsa / swa / full × dense / MoE feed-forwards × plain / LoRA-adapted, each for one training
step (forward + backward) and for prefill + static decoding (``GraphDecoder``, the path ``generate`` takes on
CUDA), under autocast and with the model cast to bf16. Every result must be finite and close to the fp32 result:
bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 0.002 per operation), and a few layers of tiny random models
compound that to a few percent, so the tolerance is 5% of the fp32 values' scale (max |x|) for losses and logits,
and gradients must be finite and agree in direction: cosine > 0.995 over all parameters together (measured ≥ 0.9985),
> 0.9 per tensor (small LoRA and router gradients of MoE layers, where bf16 rounding can flip a token's top-k choice,
measured down to 0.96).
"""
import copy

import pytest
import torch

from lit_hsa.config import FinetuneConfig
from lit_hsa.inference.generate import prefill
from lit_hsa.inference.static_decode import GraphDecoder
from lit_hsa.model.lora import apply_lora, is_adapter_key
from lit_hsa.model.transformer import HSATransformer
from tests.helpers import VOCAB, assert_close_to_scale, tiny

ATTENTION = ("hsa", "swa", "full")
FFN = ("dense", "moe")
ADAPTERS = ("plain", "lora")


def build(attention: str, ffn: str, adapters: str) -> HSATransformer:
    torch.manual_seed(0)
    model = HSATransformer(tiny(attention=attention, moe=ffn == "moe", first_dense_layers=1))
    if adapters == "lora":
        apply_lora(model, FinetuneConfig(method="lora", lora_rank=4,
                                         lora_targets=["attention", "retrieval", "experts", "ffn"]))
        for name, p in model.named_parameters():  # non-zero updates, so the adapters' own precision path counts
            if is_adapter_key(name) and name.endswith("_B"):  # LoRALinear's lora_B, the experts' lora_<w>_B
                torch.nn.init.normal_(p, 0.0, 0.02)
    return model


def grads(model: HSATransformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("adapters", ADAPTERS)
@pytest.mark.parametrize("ffn", FFN)
@pytest.mark.parametrize("attention", ATTENTION)
def test_training_step_under_bf16_autocast(attention, ffn, adapters):
    """One forward + backward under CPU bf16 autocast: finite, loss within 5% of fp32's, every trainable
    parameter's gradient finite and pointing the way fp32's does."""
    model = build(attention, ffn, adapters).train()
    x = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    want = reference(x[:, :-1], labels=x[:, 1:]) + reference.aux_loss()
    want.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x[:, :-1], labels=x[:, 1:]) + model.aux_loss()
    got.backward()
    assert_close_to_scale(got.detach(), want.detach(), "loss")
    got_grads, want_grads = grads(model), grads(reference)
    assert got_grads.keys() == want_grads.keys() and got_grads
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(torch.cat(list(got_grads.values())), torch.cat(list(want_grads.values())), dim=0) > 0.995
    for name, g in got_grads.items():
        assert torch.isfinite(g).all(), name
        w = want_grads[name]
        if w.norm() > 1e-6:
            assert cosine(g, w, dim=0) > 0.9, name


def decode(model: HSATransformer, x: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill x[:, :prompt] in segments, then static decoding of the rest → logits [B, T - prompt, V]."""
    _, state = prefill(model, x[:, :prompt], segment_size=5)
    decoder = GraphDecoder(model, state, max_len=x.shape[1])
    return torch.stack([decoder.step(x[:, t]) for t in range(prompt, x.shape[1])], dim=1)


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
@pytest.mark.parametrize("adapters", ADAPTERS)
@pytest.mark.parametrize("ffn", FFN)
@pytest.mark.parametrize("attention", ATTENTION)
def test_prefill_and_static_decoding_in_bf16(attention, ffn, adapters, mode):
    """Prefill + static decoding across a chunk completion (chunk 8: positions 13..20 complete chunk 1 at 15) under
    bf16 autocast, and with the whole model cast to bf16: logits finite and within 5% of the fp32 full forward."""
    model = build(attention, ffn, adapters).eval()
    x = torch.randint(0, VOCAB, (1, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)[:, 13:]
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = decode(model, x, 13)
        else:
            got = decode(copy.deepcopy(model).to(torch.bfloat16), x, 13)
    assert_close_to_scale(got, want, f"{mode} logits")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["hsa", "swa"])
def test_gpu_generate_under_autocast_with_fused_blocks(attention):
    """The GPU path ``experiment`` evaluates with: fp32 weights, prefill under CUDA bf16 autocast, then CUDA-graph
    decoding whose fused Triton blocks compute in the weights' dtype (chunk 16 and head dim 16, so the HSA blocks
    fuse too). Logits within 5% of the fp32 forward."""
    torch.manual_seed(0)
    # SDPA for the reference forward: flex_attention's Triton template finds no kernel for fp32 at head dim 16
    # (torch 2.11, H200: NoValidChoicesError), and this test is about decoding
    cfg = tiny(attention=attention, chunk_size=16, head_dim=16, hsa_topk=3, swa_window=16, first_dense_layers=2,
               attn_backend="sdpa")
    model = HSATransformer(cfg).cuda().eval()
    x = torch.randint(0, VOCAB, (1, 70), device="cuda")
    with torch.no_grad():
        want = model(x)[:, 40:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = decode(model, x, 40)
    assert_close_to_scale(got, want, "logits")
