"""Context parallelism (issue #36): one sequence split across the ranks of a context group.

Rank r of a group of N holds tokens ``[r·n, (r+1)·n)`` (n = T / N, a multiple of the chunk size) of the same
sequences and runs the model's forward on them through a ``ContextShard`` (the model's ``SequenceShard``):

- RoPE at the absolute positions ``r·n + i``; retrieval's visibility and documents from the same positions
  (``Context.q_start``, ``Context.chunk_doc_ids``), the path ``lit_hsa.inference`` takes for a prefill segment;
- attention layers read the keys/values of earlier shards: the last ``W − 1`` positions before the shard for a
  sliding window (the previous rank's tail while ``W − 1 <= n``), every earlier position for full attention, through
  the same blocked attention as a prefill segment against its cache (``sliding_window_blocks``);
- the chunk memory: each rank encodes its own chunks, then landmarks and chunk K/V are gathered, so retrieval on
  every rank sees the whole sequence's chunks (those of later shards are never visible to it);
- every gather's backward sums the ranks' gradients for each piece and hands the owner its own, so the parameter
  gradients summed over the group are the whole sequence's (``reduce_gradients`` without a data-parallel wrapper);
- the loss: labels are the next token of every position already (the data pipeline shifts them on the whole
  sequence), so slicing them with the tokens gives a shard's last token the next shard's first token as its label;
  each rank returns its share ``Σ_shard ce / Σ_group targets`` and the shares add up to the whole sequence's mean.

The collectives are all-gathers with an all-reduce backward (gloo has no reduce-scatter); the halo is gathered from
every rank (N × (W − 1) rows) rather than sent point to point. Both are the simple first form, exact either way.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from lit_hsa.model.attention import AttentionMask, Context, sliding_window_blocks
from lit_hsa.model.hsa import Memory
from lit_hsa.model.loss import target_mass
from lit_hsa.model.transformer import HSATransformer


@dataclass(frozen=True)
class ContextGroup:
    """The ranks that split one sequence: this process is ``rank`` of ``size``; collectives run over ``group``
    (a ``torch.distributed`` process group; None: the default group)."""

    group: object
    rank: int
    size: int

    @classmethod
    def of(cls, group=None) -> "ContextGroup":
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @classmethod
    def consecutive(cls, size: int) -> "ContextGroup":
        """This process's group when the world splits into groups of ``size`` consecutive ranks (ranks {0..N−1},
        {N..2N−1}, ...; the data-parallel index is ``global rank // size``). Every rank creates every group, in the
        same order, as ``torch.distributed.new_group`` requires."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % size:
            raise ValueError(f"context groups of {size} ranks do not divide the world of {world} ranks")
        groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world, size)]
        return cls.of(groups[rank // size])


class _GatherShards(torch.autograd.Function):
    """x [*] of every rank → [N, *]; backward: the gradients every rank holds for piece r, summed, go to rank r."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ContextGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size)]
        dist.all_gather(parts, x.contiguous(), group=group.group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: never the caller's buffer
        dist.all_reduce(grad, group=ctx.group.group)
        return grad[ctx.group.rank], None


def gather_shards(x: torch.Tensor, group: ContextGroup) -> torch.Tensor:
    """x: [B, n, ...] on every rank → [N, B, n, ...] (rank r's at index r); differentiable (see ``_GatherShards``)."""
    return _GatherShards.apply(x, group)


def gather_sequence(x: torch.Tensor, group: ContextGroup) -> torch.Tensor:
    """x: [B, n, ...], this rank's slice of the time axis → [B, N·n, ...], the whole sequence in rank order."""
    return gather_shards(x, group).movedim(0, 1).flatten(1, 2)


def earlier_positions(x: torch.Tensor, group: ContextGroup, window: int | None) -> torch.Tensor:
    """x: [B, n, ...] per rank → the positions of earlier ranks a query of this rank's slice may see: the last
    ``window − 1`` before the slice (fewer at the start of the sequence), or all of them (``window`` None):
    [B, reach, ...]. Every rank sends the same number of rows (its last ``window − 1``, at most n), so the
    collective matches across ranks whatever each one needs."""
    n = x.shape[1]
    sent = n if window is None else min(window - 1, n)
    start = group.rank * n
    reach = start if window is None else min(window - 1, start)
    if sent == 0:  # window 1: a query sees itself only
        return x[:, :0]
    # Rows sent by ranks before this one, in order: contiguous positions, since either a rank sends its whole slice
    # (sent == n) or only the previous rank's tail is reached (reach <= sent).
    past = gather_shards(x[:, n - sent :], group)[: group.rank].movedim(0, 1).flatten(1, 2)
    return past[:, past.shape[1] - reach :]


@dataclass
class ShardMask(AttentionMask):
    """A layer's mask on a context-parallel shard: attention of the shard's queries to its own keys and to those of
    earlier shards its window reaches (causal, within documents)."""

    shard: "ContextShard" = None

    def attend(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, n, Hq, D], k/v: [B, n, Hkv, D] of this shard (RoPE at absolute positions) → [B, n, Hq, D]."""
        n, d = k.shape[1], k.shape[-1]
        kv = torch.cat([k, v], dim=-1)  # one collective for both
        kv = torch.cat([earlier_positions(kv, self.shard.group, self.window), kv], dim=1)
        docs = self.shard.doc_ids
        if docs is not None:
            docs = docs[:, self.shard.start + n - kv.shape[1] : self.shard.start + n]
        k, v = kv.split(d, dim=-1)
        return sliding_window_blocks(q, k, v, self.window, doc_ids=docs)


@dataclass
class ContextShard:
    """This rank's slice of the batch's sequences, as the model asks for it (``SequenceShard``): set per forward by
    ``context`` (the slice's start and the whole sequence's document ids [B, T])."""

    group: ContextGroup
    start: int = 0
    doc_ids: torch.Tensor | None = None

    def context(self, model: HSATransformer, T: int, device, doc_ids: torch.Tensor | None) -> Context:
        """The context of this rank's T tokens: rotary tables at their absolute positions, masks reading earlier
        shards' keys, the documents of every chunk of the sequence."""
        self.start = self.group.rank * T
        self.doc_ids = gather_sequence(doc_ids, self.group) if doc_ids is not None else None
        cos, sin = model.rotary.cos_sin(torch.arange(self.start, self.start + T, device=device))
        masks = {w: ShardMask(w, shard=self) for w in model.windows()}
        S = model.cfg.chunk_size
        chunk_docs = self.doc_ids[:, ::S] if self.doc_ids is not None else None
        return Context(cos, sin, masks, doc_ids, q_start=self.start, chunk_doc_ids=chunk_docs)

    def gather_memory(self, memory: Memory) -> Memory:
        """This rank's chunks (landmarks [B, C, Hr, Dr], K/V [B, C·S, Hkv, D]) → the whole sequence's, in order."""
        return replace(memory, landmarks=gather_sequence(memory.landmarks, self.group),
                       k=gather_sequence(memory.k, self.group), v=gather_sequence(memory.v, self.group))


def check_shard_length(T: int, size: int, chunk_size: int) -> None:
    """Refuse a sequence length that does not split into ``size`` slices of whole chunks (a chunk is encoded by the
    rank that holds it, so none may straddle two)."""
    if T % (size * chunk_size):
        raise ValueError(f"context parallelism over {size} ranks splits a sequence into slices of whole chunks: the "
                         f"sequence length ({T}) must be a multiple of {size} × {chunk_size} = {size * chunk_size}")


def shard_batch(batch: dict, group: ContextGroup, chunk_size: int = 1) -> dict:
    """Every [B, T] tensor of ``batch`` (input_ids, labels, doc_ids, loss_weight) → this rank's [B, T/N] slice;
    labels are sliced, not re-derived from the slice's tokens, so the last position keeps the next slice's first
    token as its label."""
    T = batch["input_ids"].shape[1]
    check_shard_length(T, group.size, chunk_size)
    n = T // group.size
    rows = slice(group.rank * n, (group.rank + 1) * n)
    return {key: value[:, rows] if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == T else value
            for key, value in batch.items()}


def context_parallel_loss(model: HSATransformer, batch: dict, group: ContextGroup) -> torch.Tensor:
    """This rank's share of the mean loss of the batch's whole sequences (batch: [B, T] tensors, the same on every
    rank of the group): its own tokens' summed cross-entropy over the group's target count. The shares sum to the
    single-process loss; so do the parameter gradients once summed over the group."""
    chunk = model.cfg.chunk_size if model.memory is not None else 1
    local = shard_batch(batch, group, chunk)
    loss = model(local["input_ids"], local.get("doc_ids"), labels=local["labels"],
                 loss_weight=local.get("loss_weight"), shard=ContextShard(group))
    mine = target_mass(local["labels"], local.get("loss_weight"))
    total = mine.clone()
    dist.all_reduce(total, group=group.group)
    # loss = Σ ce / max(mine, ε): rescaled, it is Σ ce / total (and 0 where this slice has no targets)
    return loss * (mine / total.clamp_min(1e-6))


def whole_loss(share: torch.Tensor, group: ContextGroup) -> torch.Tensor:
    """The whole sequences' loss from this rank's share (``context_parallel_loss``): the shares summed over the
    group, detached (for logging and the non-finite check; every rank of the group gets the same value)."""
    total = share.detach().clone()
    dist.all_reduce(total, group=group.group)
    return total


def reduce_gradients(parameters, group: ContextGroup) -> None:
    """Sum every parameter gradient over the context group (a run without a data-parallel wrapper doing it)."""
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group.group)
