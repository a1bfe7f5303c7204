"""The context-parallel plan (``benchmarks/cp_plan.py``): its byte model equals the bytes the real collectives of
``lit_hsa.training.context_parallel`` pass in a gloo forward + backward (2 and 4 processes; SWA, the HSA blocks' SWA
sub-layer, the chunk memory, documents, activation checkpointing; a window reaching past one slice), its closed forms
match hand-written ones, and the script runs end to end at toy size on the CPU."""
import json
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.context_parallel import ContextGroup, context_parallel_loss
from lit_hsa.training.parallel import parallelize
from tests.helpers import ROOT, VOCAB, tiny

sys.path.insert(0, str(ROOT / "benchmarks"))
import cp_plan  # noqa: E402

T = 64
# name → tiny overrides; tiny: chunks of 8, window 8. swa window 40: at 4 ranks (slices of 16) it reaches 2 back
CONFIGS = {"hsa-swa-sublayer": dict(hsa_layer_swa=True, hsa_swa_window=4, moe=False),
           "swa-wide-window": dict(attention="swa", swa_window=40)}


def counted_step(name: str) -> dict:
    """Bytes passed to all_gather (its output list) and all_reduce, per phase, in one checkpointed fp32 step."""
    torch.manual_seed(0)
    model = parallelize(HSATransformer(tiny(**CONFIGS[name])), activation_checkpointing=True, compile=False)
    x = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:], "doc_ids": (torch.arange(T) >= 24).long().expand(2, T)}
    counts, phase = {}, ["forward"]
    gather, reduce = dist.all_gather, dist.all_reduce

    def count(op, nbytes):
        counts[f"{op}/{phase[0]}"] = counts.get(f"{op}/{phase[0]}", 0) + nbytes

    def all_gather(parts, tensor, *args, **kwargs):
        count("all_gather", sum(p.numel() * p.element_size() for p in parts))
        return gather(parts, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        count("all_reduce", tensor.numel() * tensor.element_size())
        return reduce(tensor, *args, **kwargs)

    dist.all_gather, dist.all_reduce = all_gather, all_reduce
    try:
        loss = context_parallel_loss(model, batch, ContextGroup.of())
        phase[0] = "backward"
        loss.backward()
    finally:
        dist.all_gather, dist.all_reduce = gather, reduce
    return counts


def rank(r: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save({name: counted_step(name) for name in CONFIGS}, f"{out}/rank{r}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_byte_model_equals_the_collectives_bytes(world, tmp_path):
    mp.start_processes(rank, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="fork")
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for name in CONFIGS:
            want = {}
            for e in cp_plan.collectives(tiny(**CONFIGS[name]), T, world, batch=2, elem=4):
                key = f"{e['op']}/{e['phase']}"
                want[key] = want.get(key, 0) + e["calls"] * e["bytes"]
            assert got[name] == want, (name, r)


def test_closed_forms_by_hand():
    """N·(W−1)·B·Hkv·D·2 (K, V)·2 bytes per halo gather; C·S·Hkv·D·2·2 + landmarks for the gathered memory."""
    cfg = tiny(hsa_layer_swa=True, hsa_swa_window=4)  # swa 8, Hkv 2, D 8; memory: S 8, 1 KV head, landmarks 1 × 16
    N, T_, B = 4, 256, 3
    halo = [e for e in cp_plan.collectives(cfg, T_, N, batch=B) if e["layer"] == "swa" and e["op"] == "all_gather"]
    assert [e["bytes"] for e in halo] == [N * 7 * B * 2 * 8 * 2 * 2] * 2  # forward and recomputation
    assert halo[0]["calls"] == cfg.n_layers - cfg.n_groups
    chunks = T_ // 8
    assert sum(cp_plan.memory_parts(cfg, T_).values()) == chunks * 8 * 1 * 8 * 2 * 2 + chunks * 1 * 16 * 2
    reduced = sum(e["bytes"] for e in cp_plan.collectives(cfg, T_, N, batch=B)
                  if e["layer"] == "chunk_memory" and e["op"] == "all_reduce")
    assert reduced == B * sum(cp_plan.memory_parts(cfg, T_).values())  # the backward's all-reduce of the same


def test_cp_plan_smoke_on_cpu(tmp_path):
    out = tmp_path / "cp.json"
    proc = subprocess.run([sys.executable, "benchmarks/cp_plan.py", "--presets", "tiny", "--gpus", "1,2,4",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kind"].startswith("prediction")
    chunk = cp_plan.build_meta("tiny")[0].chunk_size
    longest = {r["gpus"]: r["longest_T"] for r in result["rows"]}
    for N, T_ in longest.items():
        assert T_ > 0 and T_ % (N * chunk) == 0
    assert longest[1] < longest[2] < longest[4]
    four = next(r for r in result["rows"] if r["gpus"] == 4)
    assert four["gathered_memory_bytes"] == sum(cp_plan.memory_parts(cp_plan.build_meta("tiny")[0],
                                                                     four["longest_T"]).values())
    assert "| tiny | 4 |" in proc.stdout
