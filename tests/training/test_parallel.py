"""Parallelism configured from the trainer config: activation checkpointing is exact; FSDP2 over 2 CPU processes
(gloo), each rank reading its own documents, trains, writes a sharded checkpoint, resumes from it and matches a
single-process run over both ranks' documents; data shards follow the rank; MoE expert load is summed over ranks."""
import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_modules.text import TextDataModule
from lit_hsa.config import DataConfig, OptimConfig
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.model.units import transformer_units
from lit_hsa.training.module import HSALitModule
from lit_hsa.training.parallel import parallelize
from tests.helpers import ROOT, VARIANTS, VOCAB, scalars, tiny


def test_activation_checkpointing_is_exact():
    model = HSATransformer(tiny())
    wrapped = copy.deepcopy(model)
    parallelize(wrapped, activation_checkpointing=True, compile=False)
    x = torch.randint(0, VOCAB, (2, 40))
    for m in (model, wrapped):
        m(x).logsumexp(-1).mean().backward()
    torch.testing.assert_close(wrapped(x), model(x))
    for (name, p), q in zip(model.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert wrapped.state_dict().keys() == model.state_dict().keys()  # checkpoints stay interchangeable
    assert len(wrapped.hsa_blocks()) == 1


@pytest.mark.parametrize("variant", [*VARIANTS, "hsa-dense-ffn"])
def test_every_unit_output_flattens_to_its_tensors(variant):
    """FSDP2 re-gathers a unit's weights for backward through a hook on the tensors ``tree_flatten`` finds in the
    unit's output; an output type torch's pytree cannot open (the chunk memory's dataclass, before it was registered)
    hid its tensors, and on torch 2.11 backward read the chunk encoder's freed shards ("setStorage ... storage of
    size 0"). Every unit's output must flatten to tensors only, covering every tensor that requires grad."""
    from torch.utils._pytree import tree_flatten

    cfg = tiny(moe=False) if variant == "hsa-dense-ffn" else tiny(**VARIANTS[variant])
    model = HSATransformer(cfg)
    outputs = {}
    for i, unit in enumerate(transformer_units(model)):
        unit.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, (type(m).__name__, out)))
    model(torch.randint(0, VOCAB, (2, 40)))
    assert len(outputs) == len(transformer_units(model))
    for name, out in outputs.values():
        leaves, _ = tree_flatten(out)
        assert leaves and all(isinstance(t, torch.Tensor) for t in leaves), (name, [type(t) for t in leaves])
        assert all(t.requires_grad for t in leaves), name
    if cfg.attention == "hsa":
        memory_leaves = tree_flatten(outputs[len(outputs) - 1][1])[0]
        assert len(memory_leaves) == 3  # landmarks, k, v


def rank_module(docs, rank: int, world: int, batch_size: int, context_parallel: int = 1) -> TextDataModule:
    """The DataModule as rank ``rank`` of ``world`` (context groups of ``context_parallel``) holds it."""
    cfg = DataConfig(paths=[str(docs)], seq_len=64, batch_size=batch_size, num_workers=0, val_fraction=0.3,
                     shuffle_buffer=1, val_samples=4)
    dm = TextDataModule(cfg, context_parallel=context_parallel)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=0, accumulate_grad_batches=1)
    return dm


def rank_batches(docs, rank: int, world: int, batch_size: int, n: int, context_parallel: int = 1) -> list:
    """The first ``n`` training batches (input_ids) the DataModule gives rank ``rank`` of ``world``."""
    dm = rank_module(docs, rank, world, batch_size, context_parallel)
    it = iter(dm.train_dataloader())
    return [dm.on_before_batch_transfer(next(it), 0)["input_ids"] for _ in range(n)]


def test_each_rank_reads_its_own_documents(distinct_docs):
    """Rank r of 2 at batch 1 gets row r of what one process gets at batch 2 over the same documents: the ranks'
    batches differ and together are the single process's, step by step."""
    single = rank_batches(distinct_docs, 0, 1, 2, 4)
    ranks = [rank_batches(distinct_docs, r, 2, 1, 4) for r in range(2)]
    for s in range(4):
        assert not torch.equal(ranks[0][s], ranks[1][s]), s
        for r in range(2):
            assert torch.equal(ranks[r][s][0], single[s][r]), (s, r)


def test_a_context_group_reads_one_data_parallel_share(distinct_docs):
    """trainer.context_parallel=2 on 4 ranks: ranks 0 and 1 (a context group) get the batches rank 0 of 2 data-
    parallel ranks gets, ranks 2 and 3 those of rank 1 (training and validation alike); the two groups differ."""
    plain = [rank_batches(distinct_docs, r, 2, 1, 3) for r in range(2)]
    for rank in range(4):
        grouped = rank_batches(distinct_docs, rank, 4, 1, 3, context_parallel=2)
        assert all(torch.equal(a, b) for a, b in zip(grouped, plain[rank // 2], strict=True)), rank
    assert not torch.equal(plain[0][0], plain[1][0])
    val = [[b["input_ids"] for b in rank_module(distinct_docs, r, 4, 1, context_parallel=2).val_dataloader()]
           for r in range(4)]
    assert len(val[0]) == 2 and not torch.equal(val[0][0], val[2][0])
    for first, second in ((0, 1), (2, 3)):
        assert all(torch.equal(a, b) for a, b in zip(val[first], val[second], strict=True))
    # without context parallelism: 2 ranks split the 4 validation samples, each sample on exactly one rank
    whole = [b["input_ids"] for b in rank_module(distinct_docs, 0, 1, 1).val_dataloader()]
    split = [[b["input_ids"] for b in rank_module(distinct_docs, r, 2, 1).val_dataloader()] for r in range(2)]
    assert len(whole) == 4 and [len(s) for s in split] == [2, 2]
    assert sorted(x.sum().item() for x in whole) == sorted(x.sum().item() for s in split for x in s)
    assert not any(torch.equal(a, b) for a in split[0] for b in split[1])


def fit_cli(root, name, docs, *extra):
    args = [sys.executable, "main.py", "fit", "--config", "configs/tiny.yaml", f"trainer.root_dir={root}",
            f"trainer.run_name={name}", f"data.paths=[{docs}]", "data.batch_size=1", "data.seq_len=64",
            "data.val_samples=2", "data.val_fraction=0.3", "data.num_workers=0", "data.shuffle_buffer=1",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=2", *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted((root / name).glob("version_*"))[-1]


def consolidated(folder, out) -> dict:
    """The weights and buffers of a sharded (FSDP) checkpoint folder, through ``main.py consolidate``."""
    proc = subprocess.run([sys.executable, "main.py", "consolidate", "--ckpt", str(folder), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    module = HSALitModule.load_from_checkpoint(out, map_location="cpu")  # strict: every weight and buffer present
    return module.state_dict()


@pytest.mark.slow
def test_fsdp_two_processes_match_single_process_and_resume(tmp_path, distinct_docs):
    """2 ranks × batch 1 over different documents, 2 steps, then resumed from the sharded checkpoint for 2 more,
    end with the weights and MoE expert biases of 1 process × batch 2 over the same documents after 4 steps: each
    rank read its own shard (and resumed it), gradients were averaged and expert loads summed over the ranks."""
    single = fit_cli(tmp_path, "single", distinct_docs, "trainer.max_steps=4", "data.batch_size=2")
    fsdp = ["trainer.strategy=fsdp", "trainer.devices=2"]
    first = fit_cli(tmp_path, "fsdp", distinct_docs, "trainer.max_steps=2", *fsdp)
    sharded = first / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2  # one shard per rank
    resumed = fit_cli(tmp_path, "resumed", distinct_docs, "trainer.max_steps=4", f"ckpt_path={sharded}", *fsdp)
    losses = {**scalars(first, "train/loss"), **scalars(resumed, "train/loss")}
    assert sorted(losses) == [0, 1, 2, 3]

    reference = torch.load(single / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert reference["global_step"] == 4
    expected = reference["state_dict"]
    weights = consolidated(resumed / "checkpoints" / "last.ckpt", tmp_path / "four.ckpt")
    assert weights.keys() == expected.keys()
    biases = [k for k in expected if k.endswith("expert_bias")]
    assert biases and all(expected[k].abs().sum() > 0 for k in biases)  # trained balancing state came back
    for k in biases:
        torch.testing.assert_close(weights[k], expected[k], rtol=0, atol=1e-6, msg=k)
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5, msg=k)


def balance_step(rank: int, world: int, init_file: str, inputs: torch.Tensor, out: str) -> None:
    """One rank: a training forward over its own rows of ``inputs`` (the MoE layers count their expert load), then
    the balancing update; saves the load it counted and the expert biases it ends with."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = HSALitModule(tiny(), OptimConfig())
        module.train()
        module.model(inputs[rank])
        moes = module.model.moe_layers()
        loads = [m.load_accum.clone() for m in moes]
        module._update_moe_balance()
        torch.save({"load": loads, "bias": [m.expert_bias.clone() for m in moes]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_moe_expert_load_is_summed_over_ranks(tmp_path):
    """Two gloo ranks, different tokens each: after the balancing update both hold the same expert biases, those
    the update gives for the sum of the two ranks' loads (not for either rank's own)."""
    inputs = torch.stack([torch.randint(0, VOCAB // 2, (1, 48)), torch.randint(VOCAB // 2, VOCAB, (1, 48))])
    # fork: the ranks start in a second instead of importing Lightning again each
    mp.start_processes(balance_step, args=(2, str(tmp_path / "init"), inputs, str(tmp_path)), nprocs=2,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    moes = HSALitModule(tiny(), OptimConfig()).model.moe_layers()
    assert moes and len(ranks[0]["bias"]) == len(moes)
    local_differs = False
    for i, moe in enumerate(moes):
        loads = [rank["load"][i] for rank in ranks]
        alone = [copy.deepcopy(moe) for _ in loads]
        for m, load in zip(alone, loads):
            m.update_bias(load)
        moe.update_bias(loads[0] + loads[1])
        for r in range(2):
            assert torch.equal(ranks[r]["bias"][i], moe.expert_bias), (i, r)
            local_differs |= not torch.equal(alone[r].expert_bias, moe.expert_bias)
    assert local_differs  # the ranks' own loads alone would have moved the biases elsewhere: the test can tell


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True])
def test_compiled_checkpointed_blocks_match_eager_without_hitting_the_recompile_limit(moe):
    """trainer.compile with activation checkpointing: same loss and gradients as eager, at two lengths, and no unit
    falls back to eager because dynamo ran out of recompiles (all checkpoint wrappers share one forward). The
    aot_eager backend captures the same graphs as inductor without generating C++ (seconds instead of minutes).
    MoE in fp32: torch's shape function refuses fp32 grouped GEMMs, so tracing them failed; the loop is traced."""
    dynamo = pytest.importorskip("torch._dynamo")
    model = HSATransformer(tiny(moe=moe))
    compiled = copy.deepcopy(model)
    parallelize(compiled, activation_checkpointing=True, compile=True, compile_backend="aot_eager")
    # A unit may compile for a few shapes and argument lists; a low limit makes sharing one forward among every
    # kind of unit (what compiling the checkpoint wrappers did) fail here instead of silently running eager.
    limit = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    patch = {limit: 4}
    if hasattr(dynamo.config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    with dynamo.config.patch(**patch):
        for T in (64, 96):
            x = torch.randint(0, VOCAB, (1, T + 1), generator=torch.Generator().manual_seed(T))
            losses = [m(x[:, :-1], labels=x[:, 1:]) for m in (model, compiled)]
            for loss in losses:
                loss.backward()
            torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
            for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
                torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
                p.grad = q.grad = None


def sharded_start(rank: int, world: int, init_file: str, cfg, init_from: str | None, out: str) -> None:
    """One rank: ``HSALitModule(meta_init=True)`` sharded over ``world`` gloo ranks and materialised as ``fit``
    does it (``configure_model``), optionally from ``init_from``; rank 0 saves the full weights it ends with."""
    from torch.distributed.device_mesh import init_device_mesh

    from lit_hsa.checkpoint_io import checkpoint_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = HSALitModule(cfg, OptimConfig(), meta_init=True)
        assert all(t.is_meta for t in module.model.state_dict().values())
        if init_from is not None:  # as load_start_weights does: the checked, mapped weights
            module.init_state = checkpoint_state(init_from, module, mmap=True)
        module._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        module.configure_model()
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                for k, v in module.state_dict().items()}
        buffers = {k: v.clone() for k, v in module.named_buffers()}  # non-persistent ones too (RoPE, MoE loads)
        if rank == 0:
            torch.save({"state": full, "buffers": buffers}, f"{out}/sharded.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["hsa", "hsa-standard-stick-swa", "full"])
def test_meta_build_sharded_then_materialised_equals_the_eager_build(tmp_path, variant):
    """FSDP runs build the model on the meta device and draw its weights after sharding, each rank its own rows:
    over 2 gloo ranks the weights and buffers equal an eager build's from the same seed, bit for bit (untied head,
    odd row counts that split unevenly, RoPE scaling and a scalar parameter included); with ``init_from`` they equal
    the checkpoint's."""
    cfg = tiny(**VARIANTS[variant], tie_embeddings=False, vocab_size=67, retrieval_dim=12,
               rope_scaling={"rope_type": "linear", "factor": 2.0})
    torch.manual_seed(0)
    eager = HSALitModule(cfg, OptimConfig())
    args = (2, str(tmp_path / "init"), cfg, None, str(tmp_path))
    mp.start_processes(sharded_start, args=args, nprocs=2, start_method="fork")
    got = torch.load(tmp_path / "sharded.pt", weights_only=True)
    assert got["state"].keys() == eager.state_dict().keys()
    for k, v in eager.state_dict().items():
        assert torch.equal(got["state"][k], v), k
    for k, v in eager.named_buffers():
        assert torch.equal(got["buffers"][k], v), k

    trained = {k: torch.randn_like(v) for k, v in eager.state_dict().items()}  # stands for a trained checkpoint
    torch.save({"state_dict": trained}, tmp_path / "start.ckpt")
    (tmp_path / "init").unlink()
    args = (2, str(tmp_path / "init"), cfg, str(tmp_path / "start.ckpt"), str(tmp_path))
    mp.start_processes(sharded_start, args=args, nprocs=2, start_method="fork")
    got = torch.load(tmp_path / "sharded.pt", weights_only=True)["state"]
    for k, v in trained.items():
        assert torch.equal(got[k], v), k


def test_meta_build_of_the_flagship_holds_no_weights(tmp_path):
    """Building moe-8b-a1b (7.7B parameters, 31 GB in fp32) for FSDP takes almost no host memory before sharding:
    peak resident memory grows by less than 1 GB over the interpreter's after the imports (an eager build: 31 GB)."""
    code = (
        "import resource, torch\n"
        "from lit_hsa.config import ModelConfig, OptimConfig\n"
        "from lit_hsa.training.module import HSALitModule\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "module = HSALitModule(ModelConfig.from_name('moe-8b-a1b'), OptimConfig(), meta_init=True)\n"
        "total = module.model.num_parameters()[0]\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(total, grown * 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    total, grown = map(int, proc.stdout.split())
    assert total > 7e9
    assert grown < 1 << 30, grown


def test_checkpoints_with_a_scalar_pos_decay_still_load(tmp_path):
    """pos_decay became [1] (FSDP2 refuses 0-d parameters); files that hold it as a scalar load through every
    reader: the checked start weights (init_from) and Lightning's own resume (the module's load_state_dict)."""
    from lit_hsa.checkpoint_io import checkpoint_state

    module = HSALitModule(tiny(pos_decay=True), OptimConfig())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    keys = [k for k in state if k.endswith("pos_decay")]
    assert keys and all(state[k].shape == (1,) for k in keys)
    for k in keys:
        state[k] = torch.tensor(0.25)
    torch.save({"state_dict": state}, tmp_path / "old.ckpt")
    module.load_state_dict(checkpoint_state(str(tmp_path / "old.ckpt"), module))
    fresh = HSALitModule(tiny(pos_decay=True), OptimConfig())
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    for m in (module, fresh):
        assert all(float(m.state_dict()[k]) == 0.25 for k in keys)
