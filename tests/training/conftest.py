"""Fixtures shared by the multi-process training tests."""
import random

import pytest


@pytest.fixture(scope="module")
def distinct_docs(tmp_path_factory):
    """24 different documents of 63 bytes, all starting with "#": with EOS each is one window of seq_len 64 (byte
    tokenizer), and a window's last label (the next document's first byte) is "#" whichever document comes next.
    Training record g of the split belongs to rank g % 2, so with shuffle_buffer=1 rank r's sample s is training
    document 2s + r, and one process at batch 2 has exactly the two ranks' samples s as the rows of its batch s."""
    d = tmp_path_factory.mktemp("distinct")
    for i in range(24):
        rng = random.Random(i)  # each document its own mix of bytes, so each rank routes its tokens differently
        alphabet = "".join(rng.sample("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:()", 12))
        (d / f"d{i:02d}.txt").write_text("#" + "".join(rng.choice(alphabet) for _ in range(62)))
    return d
