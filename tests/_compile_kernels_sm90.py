"""Compile every Triton kernel (HSA attention, ring decoding, decoding blocks) for an H100 (sm_90) on a machine without
a GPU: Triton's front end, LLVM and ptxas check what the interpreter lets through (constexpr use, types, shared memory).
Run by ``test_kernels_compile_for_sm90`` in a fresh process without TRITON_INTERPRET. Exit 77: this Triton cannot do
it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(f"no ahead-of-time compilation in this triton: {e}")
    sys.exit(77)

import lit_hsa.kernels.decode.triton_block as tb  # noqa: E402
import lit_hsa.kernels.decode.triton_hsa as th  # noqa: E402
import lit_hsa.kernels.decode.triton_ring as tr  # noqa: E402
import lit_hsa.kernels.hsa.triton_attention as ta  # noqa: E402

BF16, F32, I32 = "*bf16", "*fp32", "*i32"
COMMON = dict(S=64, D=128, DOT_PREC="tf32")  # the benchmark's shapes: chunk 64, head dim 128, bf16
KERNELS = [  # (kernel, pointer arguments, fp32 scalars, constexprs): 16 query heads per KV head
    (ta._hsa_fwd_kernel, dict(Q=BF16, K=BF16, V=BF16, W=F32, PERM=I32, ITEMS=I32, PART=BF16), {"qk_scale"},
     dict(COMMON, HB=16, BP=4)),
    (ta._hsa_bwd_kernel, dict(Q=BF16, K=BF16, V=BF16, W=F32, DO=BF16, PERM=I32, ITEMS=I32, PART=BF16, DK=F32, DV=F32,
                              DW=F32), {"qk_scale", "sm_scale"}, dict(COMMON, HB=16, BP=4, COMPUTE_DQ=True)),
    (ta._hsa_fwd_qm_kernel, dict(Q=BF16, K=BF16, V=BF16, W=F32, IDX=I32, UNION=I32, UCOUNT=I32, O=BF16),
     {"qk_scale"}, dict(COMMON, HB=16, BT=4, KP=8)),
    (ta._hsa_bwd_qm_kernel, dict(Q=BF16, K=BF16, V=BF16, W=F32, IDX=I32, UNION=I32, UCOUNT=I32, DO=BF16, DQ=BF16,
                                 DW=F32), {"qk_scale", "sm_scale"}, dict(COMMON, HB=16, BT=4, KP=8)),
    (ta._hsa_reduce_kernel, dict(PART=BF16, IDX=I32, RANK=I32, OUT=BF16), set(),
     dict(D=128, GP=16, BT=4, NUM_STAGES=2)),
    # a sliding-window decoding step of the small preset (10 query heads per 2 KV heads, head dim 64)
    # (merged in-kernel; or leaving partials, with the heads' norms and RoPE applied to raw q, k)
    (tr._ring_decode_kernel, dict(Q=BF16, KN=BF16, VN=BF16, CK=BF16, CV=BF16, O=BF16, POS="*i64", PART_M=F32,
                                  PART_L=F32, PART_ACC=F32, LOCKS=I32, COS=F32, SIN=F32, QNW=BF16, KNW=BF16),
     {"qk_scale", "eps"},
     dict(D=64, GP=16, BW=64, SP=8, SC=8, DOT_PREC="tf32", MERGE=True, ROPE=False, HEAD_NORM=False, PDL=False)),
    (tr._ring_decode_kernel, dict(Q=BF16, KN=BF16, VN=BF16, CK=BF16, CV=BF16, O=BF16, POS="*i64", PART_M=F32,
                                  PART_L=F32, PART_ACC=F32, LOCKS="*i64", COS=F32, SIN=F32, QNW=BF16, KNW=BF16),
     {"qk_scale", "eps"},
     dict(D=64, GP=16, BW=128, SP=4, SC=4, DOT_PREC="tf32", MERGE=False, ROPE=True, HEAD_NORM=True, PDL=True)),
    (tr._merge_out_proj_kernel, dict(PART_M=F32, PART_L=F32, PART_ACC=F32, W=BF16, RES=BF16, Y=BF16), set(),
     dict(D=64, GP=16, HP=16, SP=4, BN=8, PDL=True)),
    # a dense block's projections (triton_block): small's attention inputs, gate/up and down; with and without
    # programmatic dependent launch (kernels.decode.pdl)
    (tb._qkv_rope_kernel, dict(X=BF16, NW=BF16, WQ=BF16, WK=BF16, WV=BF16, QNW=BF16, KNW=BF16, COS=F32, SIN=F32,
                               Q=BF16, KO=BF16, VO=BF16), {"eps"}, dict(D=64, BK=256, HEAD_NORM=True, PDL=True)),
    (tb._gemv_kernel, dict(X=BF16, NW=BF16, W1=BF16, W2=BF16, W3=BF16, RES=BF16, Y=BF16), {"eps"},
     dict(BN=8, BK=1024, NORM=True, GATED=True, STACKED=False, RESIDUAL=False, PDL=True)),
    (tb._gemv_kernel, dict(X=BF16, NW=BF16, W1=BF16, W2=BF16, W3=BF16, RES=BF16, Y=BF16), {"eps"},
     dict(BN=4, BK=2048, NORM=False, GATED=False, STACKED=False, RESIDUAL=True, PDL=False)),
    (tb._gemv_kernel, dict(X=BF16, NW=BF16, W1=BF16, W2=BF16, W3=BF16, RES=BF16, Y=BF16), {"eps"},
     dict(BN=4, BK=1024, NORM=True, GATED=False, STACKED=True, RESIDUAL=False, PDL=True)),
    # a step's rotary table (fp64 angle reduction) and the chunk memory's pending-row write
    (tb._rope_table_kernel, dict(POS="*i64", INV_FREQ=BF16, COS=F32, SIN=F32), set(), dict(BH=32, PDL=True)),
    (tb._write_slot_kernel, dict(X=BF16, BUF=BF16, POS="*i64"), set(), dict(BD=1024, PDL=True)),
    # an HSA block's decoding step (triton_hsa) at small's shapes: chunk scores + each range's top k, the selection
    # (maxima ranked; or, for many ranges, bisected, with stick-breaking and the recency term), chunk attention
    (th._chunk_topk_kernel, dict(QS=BF16, QNW=BF16, LMK=BF16, POS="*i64", CAND_S=F32, CAND_I=I32), {"scale", "eps"},
     dict(CPP=256, BD=64, QNORM=True, PDL=True)),
    (th._select_kernel, dict(CAND_S=F32, CAND_I=I32, DECAY=BF16, KEPT_S=F32, KEPT_I=I32, SEL_S=F32, SEL_I=I32,
                             SEL_W=F32), set(),
     dict(RP=128, RANK_RANGES=256, CB=4096, MP=64, KP=32, FUSION=0, POS_DECAY=False, PDL=True)),
    (th._select_kernel, dict(CAND_S=F32, CAND_I=I32, DECAY=BF16, KEPT_S=F32, KEPT_I=I32, SEL_S=F32, SEL_I=I32,
                             SEL_W=F32), set(),
     dict(RP=1024, RANK_RANGES=256, CB=4096, MP=64, KP=32, FUSION=1, POS_DECAY=True, PDL=False)),
    (th._hsa_chunks_kernel, dict(Q=BF16, QNW=BF16, KM=BF16, VM=BF16, SEL_I=I32, SEL_W=F32, PART=F32),
     {"eps", "qk_scale"}, dict(D=64, GP=16, S=64, SLOTS=2, HEAD_NORM=True, DOT_PREC="tf32", PDL=True)),
]

for fn, pointers, floats, consts in KERNELS:
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in floats else "i32") for n in names}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    except TypeError as e:  # another Triton generation's API
        print(f"ASTSource API differs in triton {triton.__version__}: {e}")
        sys.exit(77)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    print(f"{fn.__name__}: sm_90 ok, {compiled.metadata.shared} bytes of shared memory")
