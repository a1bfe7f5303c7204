"""Context parallelism (``lit_hsa.training.context_parallel``) is exact: 2 and 4 gloo processes, each holding a
contiguous slice of the same sequences, give the single-process loss and gradients of the whole sequences, and after
three SGD steps (with MoE balancing updates) the same weights and expert biases. fp32; tolerance: relative error
(‖got − want‖ / ‖want‖) ≤ 1e-5 per loss and per parameter's gradient, 1e-5 absolute on weights after the steps.
SGD rather than AdamW: Adam's g / √v turns a rounding-level difference in a near-zero gradient element into a step
of ±lr (measured: one element of a 4×32×32 expert weight off by 1.2e-5 after 3 steps at lr 1e-3).

Then the whole ``main.py fit`` (DDP or FSDP2 over gloo processes, trainer.context_parallel=2, AdamW as configured):
the logged losses, gradient norms and validation losses, the final weights and the token and FLOP counters equal
those of the run without context parallelism on the same data, through a resume."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_hsa.cli import main
from lit_hsa.model.loss import IGNORE_INDEX
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.context_parallel import (
    ContextGroup,
    check_shard_length,
    context_parallel_loss,
    reduce_gradients,
)
from lit_hsa.training.parallel import parallelize
from tests.helpers import ROOT, VOCAB, rel_err, scalars, tiny
from tests.training.test_parallel import consolidated, fit_cli

T, STEPS, TOLERANCE = 64, 3, 1e-5

# name → model overrides and options: documents (document masking), checkpointed (activation checkpointing),
# weighted (per-target loss weights). tiny: chunks of 8, window 8, top-k 2.
CASES = {
    "hsa-dense-ffn": dict(model=dict(moe=False)),
    "hsa-moe": dict(model=dict(), weighted=True),
    # the HSA blocks' own SWA sub-layer (window 4) too; documents cut inside and across slices
    "hsa-moe-documents": dict(model=dict(hsa_layer_swa=True, hsa_swa_window=4), documents=True),
    # the collectives run again when backward recomputes a block
    "hsa-checkpointed-documents": dict(model=dict(moe=False, pos_decay=True), documents=True, checkpointed=True),
    # window 24: at 4 ranks (slices of 16) a query reaches two slices back
    "swa-documents": dict(model=dict(attention="swa", swa_window=24), documents=True),
    "full-documents": dict(model=dict(attention="full", moe=False), documents=True, weighted=True),
}


def make_batch(case: str) -> dict:
    """Two rows of T tokens + their next tokens; row 1's first 20 positions are no target (a prompt), so the slices
    hold different numbers of targets. Documents (chunk-aligned, as the packer makes them for HSA): row 0 cut at 8
    and 40 (the document [8, 40) crosses the 2-rank boundary at 32 and spans three 4-rank slices), row 1 at 32 and
    48 (a cut on a slice boundary). Loss weights: 1, 2 or 3 by position."""
    x = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:].clone()}
    batch["labels"][1, :20] = IGNORE_INDEX
    pos = torch.arange(T)
    if CASES[case].get("documents"):
        batch["doc_ids"] = torch.stack([(pos >= 8).long() + (pos >= 40).long(),
                                        (pos >= 32).long() + (pos >= 48).long()])
    if CASES[case].get("weighted"):
        batch["loss_weight"] = (1.0 + pos % 3).expand(2, T)
    return batch


def build(case: str) -> HSATransformer:
    torch.manual_seed(0)
    model = HSATransformer(tiny(**CASES[case]["model"]))
    if CASES[case].get("checkpointed"):
        parallelize(model, activation_checkpointing=True, compile=False)
    return model.train()


def train(case: str, loss_fn, reduce=lambda model: None) -> dict:
    """STEPS SGD steps (momentum) of ``case`` with ``loss_fn(model, batch)`` → the first step's loss and gradients,
    every step's loss, the final weights and MoE biases. ``reduce(model)``: after backward (context parallel: sum
    the gradients and the expert loads over the group)."""
    model = build(case)
    batch = make_batch(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)  # large: the losses fall clearly
    losses, grads = [], None
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        reduce(model)
        losses.append(loss.detach())
        if grads is None:
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        for moe in model.moe_layers():
            moe.update_bias(moe.load_accum.clone())
            moe.load_accum.zero_()
    return {"losses": torch.stack(losses), "grads": grads,
            "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
            "biases": [m.expert_bias.clone() for m in model.moe_layers()],
            "chunks_from_earlier_slices": earlier_chunks_read(model)}


def earlier_chunks_read(model: HSATransformer) -> int:
    """How many (token, slot) selections of this rank's last forward read chunks held by other ranks (the chunk
    memory gather reached retrieval); 0 on rank 0 or without HSA blocks."""
    if not dist.is_initialized() or not model.hsa_blocks():
        return 0
    group = ContextGroup.of()
    first_chunk = group.rank * T // group.size // model.cfg.chunk_size
    return sum(int(((i >= 0) & (i < first_chunk)).sum()) for _, i in
               (b.last_selection for b in model.hsa_blocks()))


def cp_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank of the context group: every case, trained on its slice; rank results saved."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    # a collective some rank skips fails the test within a minute instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        group = ContextGroup.of()

        def reduce(model):
            reduce_gradients(model.parameters(), group)
            for moe in model.moe_layers():
                dist.all_reduce(moe.load_accum)

        def loss_fn(model, batch):
            share = context_parallel_loss(model, batch, group)
            whole = share.detach().clone()
            dist.all_reduce(whole)
            return share + (whole - share.detach())  # the whole sequences' value, this rank's gradient

        results = {}
        for case in CASES:
            try:
                results[case] = train(case, loss_fn, reduce)
            except Exception as e:  # reported by the case's test; the other cases still run
                results[case] = f"{type(e).__name__}: {e}"
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process() -> dict:
    return {case: train(case, lambda model, batch: model(batch["input_ids"], batch.get("doc_ids"),
                                                          labels=batch["labels"], loss_weight=batch.get("loss_weight")))
            for case in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}-ranks")
def context_parallel(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world, folder = request.param, tmp_path_factory.mktemp(f"cp{request.param}")
    # fork: the ranks start in a second instead of importing Lightning again each
    mp.start_processes(cp_rank, args=(world, str(folder / "init"), str(folder)), nprocs=world, start_method="fork")
    return world, [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_equals_one_process(case, single_process, context_parallel):
    _, ranks = context_parallel
    want = single_process[case]
    for r, results in enumerate(ranks):
        got = results[case]
        assert not isinstance(got, str), f"rank {r} failed: {got}"
        assert rel_err(got["losses"], want["losses"]) <= TOLERANCE, (r, got["losses"], want["losses"])
        assert got["grads"].keys() == want["grads"].keys()
        for name, g in want["grads"].items():
            assert rel_err(got["grads"][name], g) <= TOLERANCE, (r, name, rel_err(got["grads"][name], g))
        for name, w in want["weights"].items():
            torch.testing.assert_close(got["weights"][name], w, rtol=0, atol=TOLERANCE, msg=f"rank {r}: {name}")
        for i, (b, want_b) in enumerate(zip(got["biases"], want["biases"], strict=True)):
            torch.testing.assert_close(b, want_b, rtol=0, atol=TOLERANCE, msg=f"rank {r}: expert bias {i}")
    if CASES[case]["model"].get("attention", "hsa") == "hsa":  # the last slice retrieved chunks other ranks encoded
        assert ranks[-1][case]["chunks_from_earlier_slices"] > 0
    if "moe" in case:
        assert want["biases"] and any(b.abs().sum() > 0 for b in want["biases"])  # balancing moved the biases


def test_documents_cross_slice_boundaries():
    """The document layout the cases run on has the boundaries the docstring of ``make_batch`` promises."""
    doc_ids = make_batch("hsa-moe-documents")["doc_ids"]
    cuts = [set((torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()) for row in doc_ids]
    assert cuts == [{8, 40}, {32, 48}]
    assert doc_ids[0, 31] == doc_ids[0, 32]  # a document spanning the 2-rank boundary


def test_a_slice_must_hold_whole_chunks():
    check_shard_length(64, 2, 8)
    with pytest.raises(ValueError, match=r"sequence length \(60\) must be a multiple of 2 × 8 = 16"):
        check_shard_length(60, 2, 8)
    with pytest.raises(ValueError, match=r"sequence length \(48\) must be a multiple of 4 × 8 = 32"):
        check_shard_length(48, 4, 8)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.context_parallel=0"], "trainer.context_parallel must be >= 1, got 0"),
    (["trainer.context_parallel=2"], "trainer.context_parallel=2 needs trainer.devices as a number of devices"),
    (["trainer.devices=3", "trainer.context_parallel=2"],
     "trainer.context_parallel (2) must divide the number of devices (trainer.devices × trainer.num_nodes = 3)"),
    (["trainer.devices=2", "trainer.context_parallel=2", "data.seq_len=96"],
     "data.seq_len: seq_len 96 must be a multiple of trainer.context_parallel × model.chunk_size = 2 × 32 = 64"),
    (["trainer.devices=2", "trainer.context_parallel=2", "trainer.seq_len_schedule=[[0,32],[5,256]]"],
     "trainer.seq_len_schedule: seq_len 32 must be a multiple of"),
    (["trainer.devices=2", "trainer.context_parallel=2", "model.attention=swa", "data.seq_len=255"],
     "data.seq_len: seq_len 255 must be a multiple of trainer.context_parallel = 2"),
    # each rank's aux loss would balance its slice, not the sequence
    (["trainer.devices=4", "trainer.context_parallel=2", "model.aux_loss_coef=0.01"],
     "trainer.context_parallel=2 does not run the MoE aux loss (model.aux_loss_coef=0.01)"),
])
def test_context_parallel_config_is_refused_in_one_line(overrides, message, capsys):
    assert main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# fit: every 2 steps validation (1 batch) and a checkpoint; tolerance on logged values: relative, on weights: absolute
FIT_TOLERANCE = 1e-5
FIT = ["trainer.val_check_interval=2"]


def final_state(run, out) -> dict:
    """The weights and buffers a fit ended with: its last.ckpt, consolidated when FSDP wrote a sharded folder."""
    last = run / "checkpoints" / "last.ckpt"
    return consolidated(last, out) if last.is_dir() else torch.load(last, weights_only=True)["state_dict"]


def assert_same_runs(got_runs: list, want, tmp_path) -> None:
    """The runs ``got_runs`` (a fit and its resumes) logged what ``want`` logged — train/loss (rank 0's group's
    whole-sequence loss), train/grad_norm (after the data-parallel reduction), val/loss — step by step, and ended
    with its weights; with single-file checkpoints, the same tokens and FLOPs counted."""
    for tag in ("train/loss", "train/grad_norm", "val/loss"):
        expected = scalars(want, tag)
        logged = {step: value for run in got_runs for step, value in scalars(run, tag).items()}
        assert logged.keys() == expected.keys() and len(expected) >= 2, (tag, logged, expected)
        for step, value in expected.items():
            assert abs(logged[step] - value) <= FIT_TOLERANCE * abs(value), (tag, step, logged[step], value)
    expected = final_state(want, tmp_path / "want.ckpt")
    weights = final_state(got_runs[-1], tmp_path / "got.ckpt")
    assert weights.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=FIT_TOLERANCE, msg=k)
    last = [run / "checkpoints" / "last.ckpt" for run in (got_runs[-1], want)]
    if all(path.is_file() for path in last):
        got_ckpt, want_ckpt = (torch.load(path, weights_only=True) for path in last)
        assert got_ckpt["global_step"] == want_ckpt["global_step"] == max(expected_steps(want))
        assert (got_ckpt["tokens_seen"], got_ckpt["flops_seen"]) == (want_ckpt["tokens_seen"], want_ckpt["flops_seen"])


def expected_steps(run) -> list[int]:
    return [step + 1 for step in scalars(run, "train/loss")]


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_fit_with_a_context_group_of_two_equals_one_process_and_resumes(tmp_path, distinct_docs, strategy):
    """``main.py fit`` with trainer.devices=2 trainer.context_parallel=2 (one group: both ranks read the same
    sequences of 64 tokens and each runs its 32, one chunk) for 2 steps, resumed for 2 more, logs and ends as one
    process over the same documents for 4 steps."""
    single = fit_cli(tmp_path, "single", distinct_docs, "trainer.max_steps=4", *FIT)
    cp = ["trainer.devices=2", "trainer.context_parallel=2", f"trainer.strategy={strategy}"]
    first = fit_cli(tmp_path, "cp", distinct_docs, "trainer.max_steps=2", *FIT, *cp)
    resumed = fit_cli(tmp_path, "resumed", distinct_docs, "trainer.max_steps=4",
                      f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", *FIT, *cp)
    assert_same_runs([first, resumed], single, tmp_path)


def test_fit_on_four_ranks_data_two_by_context_two_equals_two_data_parallel_ranks(tmp_path, distinct_docs):
    """4 gloo processes, 2 context groups of 2 ({0, 1}, {2, 3}), each group its own documents (read by data-parallel
    index): the same run as 2 data-parallel processes (DDP) over the same documents, 4 steps."""
    ddp = fit_cli(tmp_path, "ddp", distinct_docs, "trainer.max_steps=4", "trainer.devices=2", *FIT)
    cp = fit_cli(tmp_path, "cp", distinct_docs, "trainer.max_steps=4", "trainer.devices=4",
                 "trainer.context_parallel=2", *FIT)
    assert_same_runs([cp], ddp, tmp_path)
