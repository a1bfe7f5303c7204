"""The lm-evaluation-harness model ``lit_hsa`` (``lit_hsa/eval/lm_eval_adapter.py``) against independent
computations with the plain forward (no cache, no segments): loglikelihood with its left truncation, rolling windows,
greedy generation up to stop strings, and two local tasks run end to end by ``lm_eval.simple_evaluate`` and by
``python -m lit_hsa.eval.lm_eval_adapter``, offline.

The tiny model writes printable ASCII only (its other output rows are zeroed), so every answer decodes byte for byte
and a stop string can be picked from what it answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("lm_eval")  # the eval extra (the test extra installs it too)
from lm_eval.api.instance import Instance  # noqa: E402

from data_modules.tokenizers import ByteTokenizer  # noqa: E402
from lit_hsa.checkpoint_io import save_weights  # noqa: E402
from lit_hsa.eval import lm_eval_adapter as adapter  # noqa: E402
from lit_hsa.model.transformer import HSATransformer  # noqa: E402
from tests.helpers import ROOT, tiny  # noqa: E402

TOK = ByteTokenizer()
MAX_LENGTH = 48  # six chunks of 8 (the chunk memory is used), shorter than the long contexts below
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
LONG_CONTEXT = "Once upon a time a fox walked along the river bank, looking for a bridge across to the woods."


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def net() -> HSATransformer:
    torch.manual_seed(0)
    model = HSATransformer(tiny(vocab_size=320, init_std=0.2)).eval()  # std 0.2: varied answers, not one token
    with torch.no_grad():
        printable = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
        printable[32:127] = True
        model.head_weight()[~printable] = 0  # logit 0 there, below the best printable byte's
    return model


@pytest.fixture(scope="module")
def ckpt(net, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lm_eval") / "tiny.ckpt"
    save_weights(path, net.state_dict(), {"model": asdict(net.cfg), "tokenizer": "byte", "eos_token": None})
    return str(path)


@pytest.fixture(scope="module")
def lm(ckpt) -> adapter.LitHSALM:
    return adapter.LitHSALM(ckpt=ckpt, device="cpu", max_length=MAX_LENGTH)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def token_logprobs(net, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward over ids[:-1] → (log p(ids[j+1] | ids[:j+1]) for each j, the argmax token at each j)."""
    logprobs = net(torch.tensor([ids[:-1]]))[0].float().log_softmax(dim=-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], logprobs.argmax(dim=-1)


def expected_loglikelihood(net, context: str, continuation: str) -> tuple[float, bool]:
    """The harness's definition: the continuation's tokens scored after at most MAX_LENGTH input tokens (the
    context cut from the left; an empty context is the EOS token)."""
    ctx = TOK.encode(context).tolist() or [TOK.eos_id]
    cont = TOK.encode(continuation).tolist()
    logprobs, argmax = token_logprobs(net, (ctx + cont)[-(MAX_LENGTH + 1) :])
    return float(logprobs[-len(cont) :].sum()), argmax[-len(cont) :].tolist() == cont


@torch.no_grad()
def greedy_text(net, prompt: str, n: int, room: int) -> str:
    """n tokens of greedy decoding after the last ``room`` tokens of prompt, one full forward per token."""
    ids = TOK.encode(prompt).tolist()[-room:]
    new = []
    for _ in range(n):
        new.append(int(net(torch.tensor([ids + new]))[0, -1].argmax()))
    return TOK.decode(new)


# ------------------------------------------------------------------------------------------------ loglikelihood


def test_loglikelihood_matches_the_forward_with_left_truncation(net, ckpt):
    answer = greedy_text(net, "The fox", 4, MAX_LENGTH)
    pairs = [("The fox", answer),  # the model's own greedy continuation: is_greedy
             ("The fox", " jumps"), ("", "Hello there"), ("Q: colour of the sky?\nA:", " blue, mostly"),
             (LONG_CONTEXT, " yes"), (LONG_CONTEXT + LONG_CONTEXT, " across the water")]
    assert len(TOK.encode(LONG_CONTEXT)) > MAX_LENGTH  # truncation from the left happens
    want = [expected_loglikelihood(net, c, x) for c, x in pairs]
    assert [g for _, g in want] == [True, False, False, False, False, False]
    for batch_size in (1, 4):  # one request per forward, and right-padded batches of different lengths
        got = adapter.LitHSALM(ckpt=ckpt, device="cpu", max_length=MAX_LENGTH, batch_size=batch_size).loglikelihood(
            [request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
        for (got_lp, got_greedy), (want_lp, want_greedy), pair in zip(got, want, pairs):
            assert got_lp == pytest.approx(want_lp, abs=1e-5), (batch_size, pair)
            assert got_greedy == want_greedy, (batch_size, pair)


def test_loglikelihood_rolling_sums_disjoint_windows(net, lm):
    text = LONG_CONTEXT + " The end."
    ids = TOK.encode(text).tolist()
    assert len(ids) > 2 * MAX_LENGTH  # three windows, the last one partly new
    seq = [TOK.eos_id] + ids
    want = 0.0
    for start in range(0, len(ids), MAX_LENGTH):  # tokens [start, end) predicted once, by an input ending at end-1
        end = min(start + MAX_LENGTH, len(ids))
        logprobs, _ = token_logprobs(net, seq[max(0, end - MAX_LENGTH) : end + 1])
        want += float(logprobs[-(end - start) :].sum())
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", text), request("loglikelihood_rolling", "Hi")],
                                   disable_tqdm=True)
    assert got[0] == pytest.approx(want, abs=1e-4)
    assert got[1] == pytest.approx(float(token_logprobs(net, [TOK.eos_id, *b"Hi"])[0].sum()), abs=1e-5)


# ------------------------------------------------------------------------------------------------ generate_until


def test_generate_until_is_greedy_and_stops_at_the_first_stop_string(net, lm, monkeypatch):
    import lit_hsa.inference.generate as generation

    steps = []  # one-token decoding steps (prefill segments are longer)
    real_step = generation.decode_forward
    monkeypatch.setattr(generation, "decode_forward",
                        lambda model, x, state: (x.shape[1] == 1 and steps.append(1)) or real_step(model, x, state))
    for prompt in ("The fox", LONG_CONTEXT):  # the long one is cut to max_length - max_gen_toks from the left
        full = greedy_text(net, prompt, 20, MAX_LENGTH - 20)
        stop = next(c for i, c in enumerate(full) if i >= 3 and c not in full[:i])  # first seen at position i ≥ 3
        stop_at = full.index(stop)
        assert lm.generate_until([request("generate_until", prompt, {"max_gen_toks": 20})],
                                 disable_tqdm=True) == [full]
        steps.clear()
        answer = lm.generate_until([request("generate_until", prompt, {"until": ["@@@", stop], "max_gen_toks": 20,
                                                                       "do_sample": False})], disable_tqdm=True)
        assert answer == [full[:stop_at]]
        assert len(steps) == stop_at  # one step per token before the one that completed the stop string


@pytest.mark.parametrize("kwargs, message", [
    ({"do_sample": True, "temperature": 0.7}, "decodes greedily"),
    ({"num_beams": 4}, "does not support generation options ['num_beams']"),
    ({"max_gen_toks": MAX_LENGTH}, "leaves no room for the context"),
])
def test_generation_options_it_cannot_honour_are_refused(lm, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        lm.generate_until([request("generate_until", "Hi", kwargs)], disable_tqdm=True)


def test_bfloat16_autocast_scores_near_float32(ckpt, lm):
    requests = [request("loglikelihood", LONG_CONTEXT, " yes"), request("loglikelihood", "The fox", " jumps")]
    bf16 = adapter.LitHSALM(ckpt=ckpt, device="cpu", dtype="bfloat16", max_length=MAX_LENGTH)
    reference = lm.loglikelihood(requests, disable_tqdm=True)
    for got, want in zip(bf16.loglikelihood(requests, disable_tqdm=True), reference):
        assert got[0] == pytest.approx(want[0], rel=0.05) and got[0] != want[0]  # autocast did run in bf16
    with pytest.raises(ValueError, match="dtype: one of auto, float32, bfloat16, float16; got 'fp8'"):
        adapter.LitHSALM(ckpt=ckpt, device="cpu", dtype="fp8")


def test_max_length_defaults_to_the_runs_training_length(net, tmp_path):
    run = tmp_path / "run" / "version_0"
    save_weights(run / "checkpoints" / "last.ckpt", net.state_dict(), {"model": asdict(net.cfg), "tokenizer": "byte"})
    assert adapter.LitHSALM(ckpt=str(run / "checkpoints" / "last.ckpt"), device="cpu").max_length == \
        adapter.DEFAULT_MAX_LENGTH  # no config.yaml beside the run
    (run / "config.yaml").write_text("data:\n  seq_len: 96\ntrainer:\n  seq_len_schedule: [[0, 64], [10, 160]]\n")
    assert adapter.LitHSALM(ckpt=str(run / "checkpoints" / "last.ckpt"), device="cpu").max_length == 160


def test_importing_lit_hsa_does_not_import_lm_eval():
    code = "import sys, lit_hsa.cli; print('lm_eval' in sys.modules)"  # all that main.py imports
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          check=True).stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------ lm_eval runs

MC_DOCS = [{"question": f"Item {i}: the colour of {thing} is", "choices": [" red", " green", " blue"]}
           for i, thing in enumerate(["the sky", "grass", "a tomato", "the sea", "snow", "a leaf"])]
GEN_PROMPTS = [f"Question {i}: name a {thing}.\nAnswer:" for i, thing in enumerate(["fruit", "river", "bird", "tool"])]


@pytest.fixture(scope="module")
def tasks(net, tmp_path_factory):
    """Two local tasks (json data files, no download): multiple choice, and generation with a stop string. The
    generation targets are the model's own greedy answers for half the prompts → (task folder, expected scores)."""
    folder = tmp_path_factory.mktemp("tasks")
    answers = {}
    for i, doc in enumerate(MC_DOCS):
        doc["answer"] = i % 3
        scores = [expected_loglikelihood(net, doc["question"], c)[0] for c in doc["choices"]]
        answers[i] = max(range(3), key=scores.__getitem__)
    acc = sum(answers[i] == doc["answer"] for i, doc in enumerate(MC_DOCS)) / len(MC_DOCS)
    gen_docs = []
    for i, prompt in enumerate(GEN_PROMPTS):
        answer = greedy_text(net, prompt, 6, MAX_LENGTH - 6)  # printable ASCII: no "\n" to stop at
        gen_docs.append({"prompt": prompt, "target": answer if i % 2 == 0 else answer + "?"})
    for name, docs in (("mc", MC_DOCS), ("gen", gen_docs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def header(name: str) -> str:  # the task reads its test split from a local json file
        return (f"task: lit_hsa_local_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {folder / name}.jsonl\ntest_split: test\n")

    (folder / "mc.yaml").write_text(
        header("mc") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        header("gen") + "output_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    assert 0 < acc < 1  # the accuracy depends on every choice's score
    return folder, {"lit_hsa_local_mc": acc, "lit_hsa_local_gen": 0.5}


def scores(results: dict) -> dict[str, float]:
    metric = {"lit_hsa_local_mc": "acc,none", "lit_hsa_local_gen": "exact_match,none"}
    return {task: results[task][key] for task, key in metric.items()}


@pytest.mark.slow
def test_simple_evaluate_runs_local_tasks(ckpt, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder, want = tasks
    out = lm_eval.simple_evaluate(model="lit_hsa", model_args=f"ckpt={ckpt},device=cpu,max_length={MAX_LENGTH}",
                                  tasks=list(want), task_manager=TaskManager(include_path=str(folder)),
                                  batch_size=2)
    assert scores(out["results"]) == pytest.approx(want)


@pytest.mark.slow
def test_the_command_line_runs_local_tasks(ckpt, tasks, tmp_path):
    folder, want = tasks
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lit_hsa.eval.lm_eval_adapter", "--model", "lit_hsa", "--model_args",
                           f"ckpt={ckpt},max_length={MAX_LENGTH}", "--device", "cpu", "--tasks", ",".join(want),
                           "--include_path", str(folder), "--output_path", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.rglob("results_*.json")
    assert scores(json.loads(result.read_text())["results"]) == pytest.approx(want)
