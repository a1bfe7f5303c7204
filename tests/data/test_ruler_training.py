"""Training windows in RULER's format (data.synthetic_format: ruler, issue 37 item 4): a window is a RULER sample as
`main.py eval --suite ruler` builds it (data_modules/ruler_tasks.py), its answer as RULER scores it, EOS, then the
window's own text; the loss mask covers the answer and the EOS; the data pipeline mixes them in as it does ours."""
from __future__ import annotations

import numpy as np
import pytest

from data_modules.ruler_tasks import RulerSampler, RulerTrainingTasks
from data_modules.sources import DataError
from data_modules.text import TextDataModule
from data_modules.tokenizers import ByteTokenizer
from lit_hsa.config import ConfigError, DataConfig
from lit_hsa.eval.ruler_suite import string_match_all
from lit_hsa.model.loss import IGNORE_INDEX

TOK = ByteTokenizer()


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_a_training_window_is_the_ruler_sample_then_its_answer(task):
    window = np.arange(2049, dtype=np.int32) % 200 + 30  # "the window's own text"
    sample = RulerTrainingTasks(TOK, 7).sample(task, window, 5)
    ruler = RulerSampler(TOK, 7).sample(task, 2049, 5)  # the sample the eval suite builds: same seed, index, length
    prompt = TOK.encode(ruler.input + ruler.answer_prefix)
    answer = TOK.encode(" " + ", ".join(ruler.outputs))
    n = len(prompt) + len(answer) + 1
    assert len(sample.tokens) == 2049 and sample.prompt_len == len(prompt)
    assert sample.tokens[:len(prompt)].tolist() == prompt.tolist()
    assert sample.tokens[len(prompt):n - 1].tolist() == answer.tolist() and sample.tokens[n - 1] == TOK.eos_id
    assert sample.tokens[n:].tolist() == window[:2049 - n].tolist()  # then the window's text to the end
    assert sample.answer_mask.nonzero()[0].tolist() == list(range(len(prompt), n))
    assert string_match_all([TOK.decode(sample.tokens[len(prompt):n - 1])], [ruler.outputs]) == 100.0
    assert sample.answers == ruler.outputs and sample.task == task


def test_the_pipeline_mixes_ruler_windows_in(tmp_path):
    """synthetic_fraction 0.5 of niah_single_1 at 2048 tokens: about half the windows hold RULER's needle sentence and
    question; with answer_only_loss their loss is on the 7-digit number (and EOS), which the context holds."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i} of some ordinary text about nothing in particular.\n" for i in range(4000)))
    cfg = DataConfig(paths=[str(corpus)], seq_len=2048, num_workers=0, synthetic_fraction=0.5,
                     synthetic_format="ruler", synthetic_tasks=["niah_single_1"], answer_only_loss=True)
    samples = [s for _, s in zip(range(20), iter(TextDataModule(cfg).train_dataset()))]
    tasks = [s for s in samples if "One of the special magic numbers for" in TOK.decode(s["input_ids"])]
    assert 5 <= len(tasks) <= 15
    for s in tasks:
        target = s["labels"] != IGNORE_INDEX
        answer = TOK.decode(s["labels"][target][:-1])  # the last learned token is EOS
        assert s["labels"][target][-1] == TOK.eos_id and answer.strip().isdigit() and len(answer.strip()) == 7
        assert answer.strip() in TOK.decode(s["input_ids"][: target.nonzero()[0, 0]])


def test_ruler_format_names_ruler_tasks_and_fits_the_length():
    with pytest.raises(ConfigError, match="data.synthetic_tasks: 'niah_single' is not one of niah_single_1"):
        DataConfig(synthetic_format="ruler", synthetic_tasks=["niah_single"]).validate()
    with pytest.raises(ConfigError, match="data.synthetic_format"):
        DataConfig(synthetic_format="babel").validate()
    cfg = DataConfig(seq_len=1024, num_workers=0, synthetic_fraction=0.1, synthetic_format="ruler",
                     synthetic_tasks=["niah_single_1", "vt"])
    with pytest.raises(DataError, match="data.synthetic_tasks: length 1025 is too short for RULER task 'vt'"):
        TextDataModule(cfg)
