"""Spec-level tests (issue #22): one HSA group re-implemented from docs/spec.md, compared with lit_hsa.model.

The reference below is written from the spec with plain loops and einsum: its own RMSNorm, RoPE, softmax, top-k,
attention, chunk encoder, retrieval, fusion and HSA operator. It reads only the model's *weights* (state_dict, by
parameter name); no code path of the project computes any reference value. Conventions that the spec leaves to the
implementation are matched to lit_hsa/model/attention.py: RMSNorm ``x / sqrt(mean(x²) + eps) · weight``; RoPE in the
GPT-NeoX half-split layout with ``inv_freq = base^(-2i/D)``; QK-norm = RMSNorm per head before RoPE; attention scale
1/sqrt(head_dim); GQA query head h reads KV head h // (Hq/Hkv). Spec decisions followed:
- chunk memory (§2): [chunk ; CLS] with the learned [CLS] vector LAST (position S), RoPE over 0..S, bidirectional,
  QKV bias, SwiGLU 64·ceil(8d/3/64), pre-norm, final RMSNorm; landmark = Linear(CLS out) (+ RMSNorm per retrieval
  head with retrieval_norm); K = RMSNorm_head(Linear(tokens)), V = Linear(tokens), no RoPE; with 0 encoder layers
  landmark = Linear(mean(RMSNorm(chunk))) and K/V from RMSNorm(chunk).
- retrieval (§2, §3): computed from h BEFORE the HSA block's SWA sub-layer; q_slc = Linear(RMSNorm(h)) per retrieval
  head; chunk i visible to token t iff t >= (i+1)·S; s = q·lmk/sqrt(Dr); top-k visible; slots most recent first;
  empty slots −1 / weight 0; pos_decay · slot rank added before fusion; softmax or stick-breaking fusion; per KV head
  or one selection shared by all heads.
- HSA block (§2, §4): [h += SWA(norm h)]; q = RMSNorm_head(Linear(norm h)); o = o_proj(Σ_j w_j · softmax over the S
  keys of chunk j · V) (optionally softmax-off-by-one: +1 in each per-chunk denominator); bypass h + FFN(norm(h + o))
  or standard h' = h + o, h' + FFN(norm h').
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch

from lit_hsa.config import ModelConfig
from lit_hsa.model.transformer import HSATransformer

VOCAB = 48
B, S = 2, 4
T = 5 * S + 2  # five complete chunks and a partial one (never visible, never encoded)
DT = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# reference math (fp64, written from the spec)
# ----------------------------------------------------------------------------------------------------------------

def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """x: [..., L, H, D], pos: [L]; half-split layout: pair (i, i + D/2) rotated by pos · base^(-2i/D)."""
    D = x.shape[-1]
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        ang = pos.to(DT) * base ** (-2.0 * i / D)
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


def softmax(x: torch.Tensor, off_by_one: bool = False) -> torch.Tensor:
    m = x.max()
    if off_by_one:  # exp(s_i) / (1 + Σ exp(s_j)), computed stably with the max shifted out of the 1 as well
        m = torch.clamp(m, min=0.0)
        e = torch.exp(x - m)
        return e / (torch.exp(-m) + e.sum())
    e = torch.exp(x - m)
    return e / e.sum()


def linear(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    y = x @ p[name + ".weight"].T
    if name + ".bias" in p:
        y = y + p[name + ".bias"]
    return y


def swiglu(p: dict, pre: str, x: torch.Tensor) -> torch.Tensor:
    g = linear(p, pre + ".w_gate", x)
    return linear(p, pre + ".w_down", g * torch.sigmoid(g) * linear(p, pre + ".w_up", x))


def attention(p: dict, pre: str, cfg: ModelConfig, x: torch.Tensor, visible) -> torch.Tensor:
    """Multi-head GQA attention with QK-RMSNorm (per head) and RoPE at positions 0..L-1 of x [L, d].
    visible(t, j) -> bool says which keys query t sees."""
    L = x.shape[0]
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = linear(p, pre + ".q_proj", x).view(L, H, D)
    k = linear(p, pre + ".k_proj", x).view(L, Hkv, D)
    v = linear(p, pre + ".v_proj", x).view(L, Hkv, D)
    if cfg.qk_norm:
        q = rms(q, p[pre + ".q_norm.weight"], cfg.norm_eps)
        k = rms(k, p[pre + ".k_norm.weight"], cfg.norm_eps)
    pos = torch.arange(L)
    q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)
    out = torch.zeros(L, H, D, dtype=DT)
    for h in range(H):
        g = h // (H // Hkv)
        for t in range(L):
            keys = [j for j in range(L) if visible(t, j)]
            s = torch.stack([q[t, h] @ k[j, g] for j in keys]) / math.sqrt(D)
            pr = softmax(s)
            out[t, h] = sum(pr[n] * v[j, g] for n, j in enumerate(keys))
    return linear(p, pre + ".o_proj", out.reshape(L, H * D))


def swa_visible(window: int):
    return lambda t, j: t - window < j <= t


def ref_swa_block(p: dict, pre: str, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Pre-norm SWA block on one sequence h [T, d]."""
    eps = cfg.norm_eps
    h = h + attention(p, pre + ".attn", cfg, rms(h, p[pre + ".attn_norm.weight"], eps), swa_visible(cfg.swa_window))
    return h + swiglu(p, pre + ".ffn", rms(h, p[pre + ".ffn_norm.weight"], eps))


def ref_chunk_memory(p: dict, cfg: ModelConfig, h: torch.Tensor):
    """h: [B, T, d] → landmarks [B, C, Hr, Dr], K, V [B, C·S, Hkv, D]."""
    eps, d = cfg.norm_eps, cfg.d_model
    Bn, Tn, _ = h.shape
    C = Tn // S
    Hr, Dr, Hkv, D = cfg.retrieval_heads, cfg.retrieval_head_dim, cfg.hsa_kv_heads, cfg.head_dim
    if cfg.encoder_layers:  # encoder FFN width 64·ceil(8d/3/64)
        assert p["memory.layers.0.ffn.w_gate.weight"].shape[0] == 64 * math.ceil(8 * d / 3 / 64)
    lmk = torch.zeros(Bn, C, Hr, Dr, dtype=DT)
    K = torch.zeros(Bn, C * S, Hkv, D, dtype=DT)
    V = torch.zeros(Bn, C * S, Hkv, D, dtype=DT)
    for b in range(Bn):
        for c in range(C):
            x = h[b, c * S:(c + 1) * S]
            if cfg.encoder_layers:
                x = torch.cat([x, p["memory.cls"][None]], 0)  # [CLS] appended LAST, at position S
                for l in range(cfg.encoder_layers):
                    pre = f"memory.layers.{l}"
                    x = x + attention(p, pre + ".attn", cfg, rms(x, p[pre + ".attn_norm.weight"], eps),
                                      lambda t, j: True)  # bidirectional
                    x = x + swiglu(p, pre + ".ffn", rms(x, p[pre + ".ffn_norm.weight"], eps))
                x = rms(x, p["memory.norm.weight"], eps)
                summary, tokens = x[S], x[:S]
            else:
                tokens = rms(x, p["memory.norm.weight"], eps)
                summary = tokens.mean(0)
            l_c = (p["memory.landmark.weight"] @ summary).view(Hr, Dr)
            if cfg.retrieval_norm:
                l_c = rms(l_c, p["memory.landmark_norm.weight"], eps)
            lmk[b, c] = l_c
            K[b, c * S:(c + 1) * S] = rms(linear(p, "memory.k_proj", tokens).view(S, Hkv, D),
                                          p["memory.k_norm.weight"], eps)
            V[b, c * S:(c + 1) * S] = linear(p, "memory.v_proj", tokens).view(S, Hkv, D)
    return lmk, K, V


def ref_retrieval(p: dict, pre: str, cfg: ModelConfig, h: torch.Tensor, lmk: torch.Tensor):
    """h: [B, T, d] (the HSA block's input, before its SWA sub-layer) → weights, indices [B, T, Hkv, topk]."""
    eps, k = cfg.norm_eps, cfg.hsa_topk
    Bn, Tn, _ = h.shape
    C, Hr, Dr = lmk.shape[1], cfg.retrieval_heads, cfg.retrieval_head_dim
    W = torch.zeros(Bn, Tn, Hr, k, dtype=DT)
    I = torch.full((Bn, Tn, Hr, k), -1, dtype=torch.long)
    q = linear(p, pre + ".q_proj", rms(h, p[pre + ".norm.weight"], eps)).view(Bn, Tn, Hr, Dr)
    if cfg.retrieval_norm:
        q = rms(q, p[pre + ".q_norm.weight"], eps)
    decay = p[pre + ".pos_decay"] if cfg.pos_decay else 0.0
    for b in range(Bn):
        for t in range(Tn):
            visible = [i for i in range(C) if t >= (i + 1) * S]
            for r in range(Hr):
                score = {i: float(q[b, t, r] @ lmk[b, i, r]) / math.sqrt(Dr) for i in visible}
                kept = sorted(visible, key=lambda i: -score[i])[:k]
                kept = sorted(kept, reverse=True)  # most recent chunk first
                if not kept:
                    continue
                s = torch.tensor([score[i] for i in kept], dtype=DT) + decay * torch.arange(len(kept), dtype=DT)
                if cfg.fusion == "softmax":
                    w = softmax(s)
                else:  # stick-breaking: w_j = σ(s_j) Π_{l<j} σ(−s_l)
                    w = torch.stack([torch.sigmoid(s[j]) * torch.prod(torch.sigmoid(-s[:j])) for j in range(len(kept))])
                W[b, t, r, :len(kept)] = w
                I[b, t, r, :len(kept)] = torch.tensor(kept)
    if Hr != cfg.hsa_kv_heads:  # one selection shared by all KV heads
        W, I = W.expand(-1, -1, cfg.hsa_kv_heads, -1), I.expand(-1, -1, cfg.hsa_kv_heads, -1)
    return W, I


def ref_hsa(q, K, V, W, I, off_by_one: bool):
    """q [B, T, Hq, D]; K, V [B, C·S, Hkv, D]; W, I [B, T, Hkv, k] → [B, T, Hq, D]; per-chunk softmax."""
    Bn, Tn, Hq, D = q.shape
    Hkv = K.shape[2]
    out = torch.zeros_like(q)
    for b in range(Bn):
        for t in range(Tn):
            for h in range(Hq):
                g = h // (Hq // Hkv)
                for j in range(I.shape[-1]):
                    c = int(I[b, t, g, j])
                    if c < 0:
                        continue
                    Kc, Vc = K[b, c * S:(c + 1) * S, g], V[b, c * S:(c + 1) * S, g]
                    pr = softmax(Kc @ q[b, t, h] / math.sqrt(D), off_by_one)
                    out[b, t, h] += W[b, t, g, j] * (pr @ Vc)
    return out


def ref_hsa_block(p: dict, pre: str, cfg: ModelConfig, h: torch.Tensor, memory):
    """The HSA block of spec §2 on h [B, T, d] → (h_out, (weights, indices))."""
    eps = cfg.norm_eps
    lmk, K, V = memory
    W, I = ref_retrieval(p, pre + ".retrieval", cfg, h, lmk)  # from h before the SWA sub-layer
    if cfg.hsa_layer_swa:
        window = cfg.hsa_swa_window or cfg.swa_window
        h = h + torch.stack([attention(p, pre + ".swa", cfg, rms(x, p[pre + ".swa_norm.weight"], eps),
                                       swa_visible(window))
                             for x in h])
    Bn, Tn, _ = h.shape
    q = linear(p, pre + ".q_proj", rms(h, p[pre + ".hsa_norm.weight"], eps)).view(Bn, Tn, cfg.hsa_q_heads, cfg.head_dim)
    q = rms(q, p[pre + ".q_norm.weight"], eps)
    o = ref_hsa(q, K, V, W, I, getattr(cfg, "softmax_off_by_one", False))
    o = linear(p, pre + ".o_proj", o.reshape(Bn, Tn, -1))
    if cfg.hsa_residual == "bypass":
        out = h + swiglu(p, pre + ".ffn", rms(h + o, p[pre + ".ffn_norm.weight"], eps))
    else:
        h = h + o
        out = h + swiglu(p, pre + ".ffn", rms(h, p[pre + ".ffn_norm.weight"], eps))
    return out, (W, I)


def ref_logits(p: dict, cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    h = p["embed.weight"][ids]
    for i in range(cfg.n_lower_layers):
        h = torch.stack([ref_swa_block(p, f"lower.{i}", cfg, x) for x in h])
    memory = ref_chunk_memory(p, cfg, h)
    idx = 0
    for _ in range(cfg.n_groups):
        h, _ = ref_hsa_block(p, f"upper.{idx}", cfg, h, memory)
        for j in range(cfg.swa_layers_per_group):
            h = torch.stack([ref_swa_block(p, f"upper.{idx + 1 + j}", cfg, x) for x in h])
        idx += 1 + cfg.swa_layers_per_group
    h = rms(h, p["norm.weight"], cfg.norm_eps)
    head = p["lm_head.weight"] if "lm_head.weight" in p else p["embed.weight"]
    return h @ head.T


# ----------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------

def config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, chunk_size=S, swa_window=6,
                ffn_hidden=48, retrieval_dim=16, moe=False, n_lower_layers=1, n_groups=1, swa_layers_per_group=1,
                hsa_kv_heads=1, hsa_topk=2, encoder_layers=1)
    base.update(overrides)
    return ModelConfig.from_name("tiny", **base)


# Hq/Hkv ratio = hsa_heads (default n_heads = 4) / hsa_kv_heads. 5 chunks exist; the last token sees all 5.
CASES = {
    "base-ratio4-softmax-bypass": dict(),
    "kv2-ratio2-stick-top3": dict(hsa_kv_heads=2, fusion="stick_breaking", hsa_topk=3),
    "kv2-ratio4-standard-top8": dict(hsa_heads=8, hsa_kv_heads=2, hsa_residual="standard", hsa_topk=8),
    "kv4-ratio1-posdecay-top1-enc2": dict(hsa_kv_heads=4, pos_decay=True, hsa_topk=1, encoder_layers=2),
    "shared-kv2-stick-posdecay-top3": dict(hsa_kv_heads=2, shared_selection=True, fusion="stick_breaking",
                                           pos_decay=True, hsa_topk=3),
    "shared-kv4-softmax-posdecay-top4": dict(hsa_kv_heads=4, shared_selection=True, pos_decay=True, hsa_topk=4),
    "enc0-kv2-top2": dict(encoder_layers=0, hsa_kv_heads=2),
    "retrieval-norm-enc2-top4-noqknorm": dict(retrieval_norm=True, encoder_layers=2, hsa_topk=4, qk_norm=False),
    "2groups-kv2-stick-standard": dict(n_groups=2, hsa_kv_heads=2, fusion="stick_breaking",
                                       hsa_residual="standard", hsa_topk=3),
    # spec (a): retrieval from h before the HSA block's SWA sub-layer
    "swa-sublayer-bypass": dict(hsa_layer_swa=True, hsa_swa_window=3, hsa_kv_heads=2),
    "swa-sublayer-2groups-standard-stick-posdecay": dict(hsa_layer_swa=True, hsa_swa_window=3, n_groups=2,
                                                         hsa_residual="standard", fusion="stick_breaking",
                                                         pos_decay=True, hsa_topk=3),
    # spec (b): softmax off by one inside each chunk
    "off-by-one-softmax": dict(softmax_off_by_one=True),
    "off-by-one-kv2-ratio2-stick-swa": dict(softmax_off_by_one=True, hsa_kv_heads=2, fusion="stick_breaking",
                                            hsa_layer_swa=True, hsa_swa_window=3, hsa_topk=3),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-degenerate random weights: unit-gain linear maps, norm gains around 1, O(1) biases, [CLS] and decay."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            r = torch.randn(prm.shape, generator=g, dtype=prm.dtype)
            if name.endswith("pos_decay"):
                prm.copy_(0.7 + 0.1 * r)
            elif name.endswith("cls") or name == "embed.weight":
                prm.copy_(r)
            elif "norm" in name:
                prm.copy_(1.0 + 0.3 * r)
            elif name.endswith("bias"):
                prm.copy_(0.3 * r)
            else:
                prm.copy_(r / math.sqrt(prm.shape[-1]))


@functools.cache
def run_case(name: str):
    """Model forward in fp64 with the tensors each check needs captured by hooks (cached per case)."""
    cfg = config(**CASES[name])
    torch.manual_seed(0)
    model = HSATransformer(cfg).eval()
    model.double()
    randomize(model, seed=sum(map(ord, name)))
    got = {"blocks": {}, "retrieval": {}}
    handles = [model.memory.register_forward_hook(
        lambda m, args, out: got.update(h_lower=args[0].detach().clone(), memory=(out.landmarks, out.k, out.v)))]
    for i, blk in enumerate(model.upper):
        if hasattr(blk, "retrieval"):
            handles.append(blk.register_forward_hook(
                lambda m, args, out, i=i: got["blocks"].__setitem__(i, (args[0].detach().clone(), out.detach()))))
            handles.append(blk.retrieval.register_forward_hook(
                lambda m, args, out, i=i: got["retrieval"].__setitem__(i, out)))
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
    for hd in handles:
        hd.remove()
    p = {k: v.detach().to(DT) for k, v in model.state_dict().items()}
    memory = ref_chunk_memory(p, cfg, got["h_lower"])
    return cfg, model, p, ids, logits, got, memory


def close(actual, expected, what, tol=1e-5):
    torch.testing.assert_close(actual.to(DT), expected, rtol=tol, atol=tol * max(1.0, float(expected.abs().max())),
                               msg=lambda m: f"{what}: {m}")


def check_selection(w_got, i_got, W, I, what):
    """Model slots may be fewer than topk (it clamps topk to the chunk count): the rest must be empty in the spec."""
    k = i_got.shape[-1]
    assert torch.equal(i_got.long(), I[..., :k]), f"{what}: indices differ\nmodel\n{i_got[0, :, 0]}\nspec\n{I[0, :, 0]}"
    assert (I[..., k:] == -1).all(), f"{what}: the model has {k} slots, the spec keeps more chunks"
    close(w_got, W[..., :k], what + " weights")


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_chunk_memory_matches_spec(case):
    cfg, model, p, ids, logits, got, (lmk, K, V) = run_case(case)
    g_lmk, g_k, g_v = got["memory"]
    assert g_lmk.shape == lmk.shape and g_k.shape == K.shape and g_v.shape == V.shape
    close(g_lmk, lmk, "landmarks")
    close(g_k, K, "K")
    close(g_v, V, "V")


@pytest.mark.parametrize("case", list(CASES))
def test_retrieval_matches_spec(case):
    """Indices exactly, fusion weights to 1e-5, from the HSA block's input h (before its SWA sub-layer)."""
    cfg, model, p, ids, logits, got, memory = run_case(case)
    assert got["retrieval"], "retrieval never ran"
    for i, (w_got, i_got) in got["retrieval"].items():
        h_in = got["blocks"][i][0]
        W, I = ref_retrieval(p, f"upper.{i}.retrieval", cfg, h_in, memory[0])
        check_selection(w_got, i_got, W, I, f"upper.{i}")


@pytest.mark.parametrize("case", list(CASES))
def test_hsa_block_output_matches_spec(case):
    cfg, model, p, ids, logits, got, memory = run_case(case)
    for i, (h_in, out) in got["blocks"].items():
        ref, _ = ref_hsa_block(p, f"upper.{i}", cfg, h_in, memory)
        close(out, ref, f"upper.{i} output")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_spec(case):
    """Whole model: embed → SWA block → chunk memory → group(s) → norm → tied head."""
    cfg, model, p, ids, logits, got, memory = run_case(case)
    close(logits, ref_logits(p, cfg, ids), "logits")


@pytest.mark.parametrize("case", ["base-ratio4-softmax-bypass", "shared-kv2-stick-posdecay-top3"])
def test_topk_sweep(case):
    """Top-k below, at and above the number of visible chunks (1..5 of 5, and 9)."""
    cfg, model, p, ids, logits, got, memory = run_case(case)
    blk = model.upper[0]
    h_in = got["blocks"][0][0]
    mem = model.memory(got["h_lower"])
    old = cfg.hsa_topk
    try:
        for k in (1, 3, 5, 9):
            model.set_hsa_topk(k)
            with torch.no_grad():
                w_got, i_got = blk.retrieval(h_in, mem, None)
            W, I = ref_retrieval(p, "upper.0.retrieval", replace(cfg, hsa_topk=k), h_in, memory[0])
            assert I.shape[-1] == k
            check_selection(w_got, i_got, W, I, f"topk={k}")
    finally:
        model.set_hsa_topk(old)
