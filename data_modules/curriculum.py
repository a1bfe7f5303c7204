"""Context-length curriculum: the stages of ``trainer.seq_len_schedule`` at constant tokens per step."""
from __future__ import annotations

from .sources import DataError


def seq_len_stages(schedule: list[list[int]], seq_len: int, batch_size: int) -> list[tuple[int, int, int]]:
    """``trainer.seq_len_schedule`` → ``[(first_step, seq_len, batch_size), ...]`` sorted by step, the first at step 0
    (``data.seq_len`` until the schedule's first entry). Tokens per step stay ``batch_size × seq_len`` of the data
    config, so a stage's batch size is that divided by its seq_len, which must divide it exactly."""
    tokens = seq_len * batch_size
    lengths = {0: seq_len}
    for step, length in schedule:  # a later entry for the same step wins
        lengths[step] = length
    stages = []
    for step, length in sorted(lengths.items()):
        if tokens % length:
            raise DataError(f"trainer.seq_len_schedule: seq_len {length} must divide the tokens per step "
                              f"(data.batch_size × data.seq_len = {tokens}) so the batch size stays whole")
        stages.append((step, length, tokens // length))
    return stages
