"""`main.py experiment` phases, seeds, in-domain perplexity, parameters and FLOPs (issue 26), and the shipped
configs/experiments/paper_recipe.yaml: its models' parameter counts and an end-to-end run at toy size."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_modules.tokenizers import build_tokenizer
from lit_hsa.checkpoint_io import load_checkpoint_file, load_net
from lit_hsa.cli import main
from lit_hsa.config import ConfigError, load_config, padded_vocab
from lit_hsa.eval.run import held_out_tokens
from lit_hsa.experiment import load_experiment, run_experiment, summarize, train_model
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.flops import training_flops_per_token
from tests.helpers import ROOT, saved_plots

RECIPE = "configs/experiments/paper_recipe.yaml"
SEQ = 128
# Two tiny models, two seeds, a self-copy warm-up (3 steps) and a main phase (2 steps) at a learning rate too small
# to move any fp32 weight: the main phase must end exactly where the warm-up ended.
TOY = {
    "name": "toy",
    "train": {
        "model": {"name": "tiny", "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "hsa_heads": 2,
                  "retrieval_dim": 32, "chunk_size": 16, "swa_window": 16, "hsa_topk": 2, "ffn_hidden": 64,
                  "moe": False},
        "data": {"seq_len": SEQ, "batch_size": 2, "num_workers": 0, "val_samples": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "trainer": {"precision": "32-true", "accelerator": "cpu", "log_every_n_steps": 1, "val_check_interval": 100,
                    "limit_val_batches": 1, "checkpoint_every_n_steps": 100, "enable_progress_bar": False},
    },
    "models": {"hsa": ["model.attention=hsa"], "full": ["model.attention=full"]},
    "phases": [{"name": "warmup", "max_steps": 3,
                "overrides": ["data.synthetic_fraction=1.0", "data.synthetic_tasks=[self_copy]"]},
               {"name": "main", "max_steps": 2, "overrides": ["optim.lr=1e-30"]}],
    "seeds": [0, 1],
    "eval": {"tasks": ["niah_single"], "lengths": [], "ppl_windows": 3, "ppl_lengths": [300],
             "reference_model": "full"},
}


def write_experiment(folder: Path, **changes) -> str:
    """TOY (with top-level ``changes``) as a YAML file whose out_dir is ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "experiment.yaml"
    OmegaConf.save(OmegaConf.create({**TOY, "out_dir": str(folder / "out"), **changes}), path)
    return str(path)


def end_state(out: Path, run: str) -> dict:
    """The fp32 weights a phase run ended with (``<runs>/<run>/end.pt``)."""
    return load_checkpoint_file(out / "runs" / run / "end.pt")["state_dict"]


def copies_itself(row: torch.Tensor) -> bool:
    """Whether a window is x ‖ x: at some shift most tokens repeat (real text never does at 90%)."""
    n = len(row)
    return max(float((row[:-d] == row[d:]).float().mean()) for d in range(n // 4, 3 * n // 4)) > 0.9


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The TOY experiment trained and evaluated once (8 tiny fits, ~15 s on 2 cores, shared by the tests below); the
    input_ids of every training batch, by run folder."""
    from lit_hsa.training.module import HSALitModule

    batches: dict[str, list[torch.Tensor]] = {}
    real_step = HSALitModule.training_step

    def recording_step(self, batch, batch_idx):
        batches.setdefault(self.trainer.logger.name, []).append(batch["input_ids"].clone())
        return real_step(self, batch, batch_idx)

    folder = tmp_path_factory.mktemp("toy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HSALitModule, "training_step", recording_step)
        summary = run_experiment(write_experiment(folder), [])
    return folder / "out", summary, batches


def test_the_main_phase_starts_from_the_warmups_weights(toy_run):
    out, _, _ = toy_run
    for run in ("hsa-s0", "full-s1"):
        warmup, main_end = end_state(out, f"{run}-warmup"), end_state(out, f"{run}-main")
        assert warmup.keys() == main_end.keys()
        for k in warmup:  # 2 steps at lr 1e-30 move no fp32 weight: a main phase from a fresh init would differ
            assert torch.equal(warmup[k], main_end[k]), k
        record = json.loads((out / f"{run}.json").read_text())["train"]
        assert [(p["name"], p["steps"], p["tokens"]) for p in record["phases"]] == [
            ("warmup", 3, 3 * 2 * SEQ), ("main", 2, 2 * 2 * SEQ)]
        assert record["steps"] == 5 and record["tokens"] == 5 * 2 * SEQ
        assert record["seconds"] == pytest.approx(sum(p["seconds"] for p in record["phases"]), abs=0.11)
        assert record["phases"][1]["final_metrics"]["lr-AdamW/pg1"] == pytest.approx(1e-30)  # the phase's own LR
    saved = load_checkpoint_file(out / "hsa-s0.weights.pt")["state_dict"]  # what --eval-only reads: the main's end
    for k, v in end_state(out, "hsa-s0-main").items():
        assert torch.equal(saved[k], v.to(torch.bfloat16)), k


def test_the_warmups_data_overrides_apply_to_the_warmup_only(toy_run):
    _, _, batches = toy_run
    assert set(batches) == {f"{m}-s{s}-{p}" for m in ("hsa", "full") for s in (0, 1) for p in ("warmup", "main")}
    for run, seen in batches.items():
        rows = [row for batch in seen for row in batch]
        assert len(seen) == (3 if run.endswith("warmup") else 2)
        # warm-up: synthetic_fraction 1 of self_copy, every window x ‖ x; main: the stdlib text as it is
        assert all(copies_itself(r) for r in rows) if run.endswith("warmup") else not any(map(copies_itself, rows))


def test_seeds_make_distinct_runs_and_the_summary_aggregates_them(toy_run):
    out, summary, _ = toy_run
    runs = {r: json.loads((out / f"{r}.json").read_text()) for r in ("hsa-s0", "hsa-s1", "full-s0", "full-s1")}
    assert [runs[r]["seed"] for r in runs] == [0, 1, 0, 1]
    for model in ("hsa", "full"):
        s0, s1 = end_state(out, f"{model}-s0-main"), end_state(out, f"{model}-s1-main")
        assert not torch.equal(s0["model.embed.weight"], s1["model.embed.weight"])  # another init
        config = load_checkpoint_file(out / "runs" / f"{model}-s1-warmup" / "end.pt")["config"]
        assert (config["trainer"]["seed"], config["data"]["seed"]) == (1, 1)
    ppl = {r: runs[r]["perplexity"]["ppl"] for r in runs}
    assert ppl["hsa-s0"] != ppl["hsa-s1"]
    hsa = summary["perplexity"]["hsa"]["ppl"]
    pair = [ppl["hsa-s0"], ppl["hsa-s1"]]
    assert hsa == pytest.approx({"mean": np.mean(pair), "std": abs(pair[0] - pair[1]) / math.sqrt(2),
                                 "min": min(pair), "max": max(pair), "n": 2})
    ratio = summary["perplexity"]["hsa"]["ratio_to_reference"]
    assert ratio == pytest.approx(np.mean(pair) / np.mean([ppl["full-s0"], ppl["full-s1"]]))
    assert summary["models"]["hsa"]["runs"] == ["hsa-s0", "hsa-s1"]
    assert summary["models"]["hsa"]["metrics"]["train_tokens"]["mean"] == 5 * 2 * SEQ
    assert "| hsa | 2 |" in (out / "summary.md").read_text()


def test_held_out_perplexity_is_the_mean_cross_entropy_of_the_windows(toy_run):
    out, _, _ = toy_run
    exp = load_experiment(str(out.parent / "experiment.yaml"))
    cfg = exp.phase_configs("hsa", 0)[-1][1]
    tokens = torch.as_tensor(held_out_tokens(cfg.data, build_tokenizer("byte"), 3 * SEQ + 1).astype(np.int64))
    net = load_net(out / "runs" / "hsa-s0-main" / "end.pt")[0].eval()
    with torch.no_grad():  # window by window, logits and cross-entropy written out
        losses = [F.cross_entropy(net(tokens[i * SEQ : (i + 1) * SEQ][None])[0],
                                  tokens[i * SEQ + 1 : (i + 1) * SEQ + 1],
                                  reduction="sum") for i in range(3)]
    expected = float(sum(losses)) / (3 * SEQ)
    hsa, full = (json.loads((out / f"{r}.json").read_text()) for r in ("hsa-s0", "full-s1"))
    assert hsa["perplexity"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert hsa["perplexity"]["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert hsa["perplexity"]["tokens_crc32"] == full["perplexity"]["tokens_crc32"]  # the same windows
    rows = hsa["perplexity_by_position"]["300"]
    assert (rows[0]["from"], rows[-1]["to"]) == (0, 300)  # 300 predictions: the length itself


def test_parameters_and_flops_are_recorded(toy_run):
    out, summary, _ = toy_run
    hsa = json.loads((out / "hsa-s0.json").read_text())
    net = load_net(out / "runs" / "hsa-s0-main" / "end.pt")[0]
    assert hsa["parameters"] == dict(zip(("total", "active"), net.num_parameters()))
    flops = [p["flops"] for p in hsa["train"]["phases"]]
    per_token = training_flops_per_token(net.cfg, net.num_parameters()[1], SEQ)
    assert flops == pytest.approx([3 * 2 * SEQ * per_token, 2 * 2 * SEQ * per_token])
    assert hsa["train"]["flops_per_token"] == pytest.approx(per_token)
    totals = [json.loads((out / f"hsa-s{s}.json").read_text())["train"]["flops"] for s in (0, 1)]
    assert totals[0] == pytest.approx(sum(flops))
    spread = summary["models"]["hsa"]["metrics"]["train_flops"]
    assert (spread["min"], spread["max"], spread["n"]) == (min(totals), max(totals), 2)


def test_training_flops_follow_the_schedules_batch_by_batch(tmp_path):
    """The FLOPs a run records are the module's count, batch by batch: top-k and window schedules change them at
    their optimizer step (with gradient accumulation, both micro-batches of a step count at its top-k); a resume
    goes on counting from the checkpoint."""
    cfg = load_config(base=TOY["train"], overrides=[
        f"trainer.root_dir={tmp_path}", "trainer.run_name=flops", "trainer.max_steps=4",
        "trainer.accumulate_grad_batches=2", "trainer.topk_schedule=[[0,2],[2,1]]",
        "trainer.swa_window_schedule=[[3,8]]"])
    cfg.validate()
    net, info = train_model(cfg)
    active = net.num_parameters()[1]
    f = {(k, w): training_flops_per_token(replace(net.cfg, hsa_topk=k, swa_window=w), active, SEQ)
         for k, w in ((2, 16), (1, 16), (1, 8))}
    assert len(set(f.values())) == 3
    per_step = 2 * 2 * SEQ  # accumulation × batch × tokens
    assert info["tokens"] == 4 * per_step
    assert info["flops"] == pytest.approx(per_step * (2 * f[2, 16] + f[1, 16] + f[1, 8]), rel=1e-12)
    # a resume from the last checkpoint (step 4) goes on counting: two more steps at top-1, window 8
    cfg.ckpt_path, cfg.trainer.max_steps = str(tmp_path / "flops/version_0/checkpoints/last.ckpt"), 6
    resumed = train_model(cfg)[1]
    assert resumed["tokens"] == 6 * per_step
    assert resumed["flops"] == pytest.approx(info["flops"] + 2 * per_step * f[1, 8], rel=1e-12)


def fake_run(model: str, seed: int, ppl: float, accuracy: list[float], crc: int = 7) -> dict:
    """A ``<run>.json`` with known numbers: one retrieval row per accuracy (depths of one length)."""
    rows = [{"task": "niah_single", "length": 4096, "depth": d / 4, "accuracy": a, "samples": 1}
            for d, a in enumerate(accuracy)]
    return {"experiment": "x", "model": model, "run": f"{model}-s{seed}", "seed": seed, "overrides": [],
            "train_seq_len": 1024, "parameters": {"total": 100, "active": 100}, "device": "cpu", "date": "2026-12-05",
            "train": {"steps": 10, "tokens": 1000 * (seed + 1), "seconds": 1.0, "flops": 5e9, "flops_per_token": 5e6,
                      "final_metrics": {}},
            "eval_seconds": 2.0, "retrieval": rows,
            "perplexity": {"windows": 4, "window_length": 1024, "tokens": 4096, "tokens_crc32": crc,
                           "loss": math.log(ppl), "ppl": ppl},
            "perplexity_by_position": {"128": [{"from": 0, "to": 64, "loss": ppl / 10, "ppl": 1.0},
                                               {"from": 64, "to": 128, "loss": ppl / 20, "ppl": 1.0}]}}


def test_summary_mean_and_spread_on_known_numbers(tmp_path):
    for seed, (ppl, acc) in enumerate([(10.0, [1, 1]), (12.0, [0, 1]), (14.0, [0, 0])]):
        (tmp_path / f"a-s{seed}.json").write_text(json.dumps(fake_run("a", seed, ppl, acc)))
        (tmp_path / f"ref-s{seed}.json").write_text(json.dumps(fake_run("ref", seed, 10.0, [1, 1])))
    (tmp_path / "other.json").write_text(json.dumps(fake_run("other", 0, 11.0, [1, 1], crc=8)))
    with saved_plots() as plots:
        summary = summarize(tmp_path, "ref")
    p = summary["perplexity"]
    assert p["a"]["ppl"] == pytest.approx({"mean": 12.0, "std": 2.0, "min": 10.0, "max": 14.0, "n": 3})
    assert p["a"]["ratio_to_reference"] == pytest.approx(1.2)
    assert p["a"]["ratio_by_seed"] == pytest.approx({"mean": 1.2, "std": 0.2, "min": 1.0, "max": 1.4, "n": 3})
    assert p["other"]["ratio_to_reference"] is None  # other held-out windows: no ratio
    assert summary["accuracy"]["niah_single"]["a"] == {"4096": 0.5}  # runs at 1.0, 0.5 and 0.0
    assert summary["accuracy_spread"]["niah_single"]["a"]["4096"] == pytest.approx(
        {"mean": 0.5, "std": 0.5, "min": 0.0, "max": 1.0, "n": 3})
    assert summary["models"]["a"]["metrics"]["train_tokens"] == pytest.approx(
        {"mean": 2000.0, "std": 1000.0, "min": 1000.0, "max": 3000.0, "n": 3})
    assert summary["perplexity_by_position"]["a"]["128"][0]["loss"]["mean"] == pytest.approx(1.2)
    md = (tmp_path / "summary.md").read_text()
    assert "| a | 3 | 0.00M (0.00M) | 2,000 (1,000–3,000) |" in md
    assert "12.000 (10.000–14.000) | 1.2000 (1.0000–1.4000 by seed) |" in md
    assert "| niah_single | a | 0.50 (0.00–1.00) |" in md
    assert (tmp_path / "loss_vs_position.png").is_file() and (tmp_path / "accuracy_vs_length.png").is_file()
    # the plots show the summary's numbers: loss by position (mean over seeds) and accuracy by length, per model
    for model, per in summary["perplexity_by_position"].items():
        rows = per[max(per, key=int)]
        assert ([b["to"] for b in rows], [b["loss"]["mean"] for b in rows]) in plots["loss_vs_position.png"][""]
    for task, per_model in summary["accuracy"].items():
        lines = plots["accuracy_vs_length.png"][task]
        assert len(lines) == len(per_model)
        for acc in per_model.values():
            assert (sorted(map(float, acc)), [acc[n] for n in sorted(acc, key=int)]) in lines


def recipe_counts() -> dict[str, int]:
    exp = load_experiment(RECIPE)
    counts = {}
    for model in exp.models:
        cfg = exp.phase_configs(model, 0)[-1][1]
        vocab = padded_vocab(build_tokenizer(cfg.data.tokenizer, cfg.data.eos_token).vocab_size)
        with torch.device("meta"):
            counts[model] = HSATransformer(replace(cfg.model, vocab_size=vocab)).num_parameters()[0]
    return counts


def test_paper_recipe_models_have_equal_parameter_counts():
    counts = recipe_counts()
    assert set(counts) == {"hsa", "full", "swa"}
    assert 20e6 <= counts["hsa"] <= 40e6  # one H200, ~50M tokens in ~5 minutes
    for model, n in counts.items():
        assert abs(n - counts["hsa"]) <= 0.01 * counts["hsa"], (model, n, counts["hsa"])
    exp = load_experiment(RECIPE)
    cfgs = {m: exp.phase_configs(m, 0) for m in exp.models}
    assert [name for name, _ in cfgs["hsa"]] == ["warmup", "main"] and exp.seeds == [0, 1]
    assert {c.model.attention for c in (cfgs[m][-1][1] for m in cfgs)} == {"hsa", "full", "swa"}
    warmup, main_phase = cfgs["hsa"][0][1], cfgs["hsa"][1][1]
    assert warmup.data.synthetic_tasks == ["self_copy"] and warmup.data.synthetic_fraction >= 0.5
    assert main_phase.data.synthetic_fraction == 0.01
    assert set(main_phase.data.synthetic_tasks) == {"niah_single", "niah_multiquery", "vt"}
    chunks = main_phase.data.seq_len // main_phase.model.chunk_size
    assert warmup.trainer.topk_schedule == [[0, chunks]] and main_phase.trainer.topk_schedule[0] == [0, chunks]
    assert main_phase.trainer.topk_schedule[-1][1] < chunks  # sparse at the end
    assert {c.data.seq_len for m in cfgs for _, c in cfgs[m]} == {4096}
    assert [n // 4096 for n in exp.lengths("hsa")] == [1, 16, 64, 256] and max(exp.lengths("full")) == 65536
    assert max(exp.ppl_lengths("hsa")) == 64 * 4096 and exp.eval.reference_model == "full"


# The shipped recipe at toy size: tiny widths and context, 2 steps per phase, one seed, short eval lengths.
RECIPE_TOY = ["train.model.d_model=64", "train.model.n_heads=2", "train.model.n_kv_heads=1", "train.model.head_dim=32",
              "train.model.hsa_heads=2", "train.model.retrieval_dim=64", "train.model.ffn_hidden=128",
              "train.model.chunk_size=32", "train.model.swa_window=64", "train.data.seq_len=256",
              "train.data.batch_size=2", "train.data.num_workers=0", "train.data.val_samples=2",
              "train.trainer.precision=32-true", "train.trainer.accelerator=cpu", "train.trainer.eval_every_n_steps=0",
              "train.trainer.limit_val_batches=1", "phases.0.max_steps=2", "phases.1.max_steps=2",
              "eval.lengths=[512]", "eval.depths=[0.5]", "eval.samples=1", "eval.ppl_windows=2",
              "eval.ppl_lengths=[512,1024]", "eval.max_length.full=512"]


@pytest.mark.slow
def test_paper_recipe_runs_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "recipe"
    assert main(["experiment", "--config", RECIPE, "--seeds", "0", f"out_dir={out}", *RECIPE_TOY]) == 0
    summary = json.loads((out / "length_generalization.json").read_text())
    assert set(summary["models"]) == {"hsa", "full", "swa"} and summary["reference_model"] == "full"
    assert {m: s["runs"] for m, s in summary["models"].items()} == {m: [f"{m}-s0"] for m in ("hsa", "full", "swa")}
    assert summary["perplexity"]["full"]["ratio_to_reference"] == 1.0
    ppl = {m: json.loads((out / f"{m}-s0.json").read_text())["perplexity"]["ppl"] for m in ("hsa", "full", "swa")}
    for m in ("hsa", "swa"):  # one seed: the ratio of the runs' own held-out perplexities
        assert summary["perplexity"][m]["ratio_to_reference"] == pytest.approx(ppl[m] / ppl["full"], rel=1e-12)
    assert set(summary["accuracy"]) == {"niah_single", "niah_multiquery", "vt"}
    run = json.loads((out / "hsa-s0.json").read_text())  # the phases and data as run, in the run's own record
    assert [(p["name"], p["max_steps"]) for p in run["phases"]] == [("warmup", 2), ("main", 2)]
    assert "data.synthetic_fraction=0.01" in run["phases"][1]["overrides"]
    assert run["data_config"]["synthetic_fraction"] == 0.01 and run["data_config"]["seq_len"] == 256
    assert set(summary["perplexity_by_position"]["hsa"]) == {"512", "1024"}
    assert set(summary["perplexity_by_position"]["full"]) == {"512"}  # capped by eval.max_length
    hsa = json.loads((out / "hsa-s0.json").read_text())
    assert [(p["name"], p["steps"]) for p in hsa["train"]["phases"]] == [("warmup", 2), ("main", 2)]
    assert hsa["train_seq_len"] == 256 and hsa["model_config"]["vocab_size"] == 8192  # the BPE tokenizer
    assert hsa["model_config"]["hsa_topk"] == 64  # the main phase's dense stretch (its step 200 is not reached)
    assert (out / "loss_vs_position.png").stat().st_size > 0 and (out / "accuracy_vs_length.png").stat().st_size > 0
    assert "ppl / full" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_resume_reuses_finished_phases_and_continues_a_cut_one(tmp_path, capsys):
    path, out = write_experiment(tmp_path), tmp_path / "out"

    def run_hsa(*extra: str) -> int:
        """One run (no seeds) of the hsa model; how many phases it reused."""
        capsys.readouterr()
        run_experiment(path, ["seeds=null", "eval.ppl_lengths=[]", "train.trainer.checkpoint_every_n_steps=1", *extra],
                       models=["hsa"])
        return capsys.readouterr().out.count("already trained")

    assert run_hsa() == 0
    first, end = json.loads((out / "hsa.json").read_text()), end_state(out, "hsa-main")
    assert run_hsa("resume=true") == 2  # both phases reused: nothing trains
    assert json.loads((out / "hsa.json").read_text())["train"] == first["train"]
    (out / "runs" / "hsa-main" / "end.pt").unlink()  # a main phase cut after its last checkpoint (step 2)
    assert run_hsa("resume=true") == 1
    assert not (out / "runs" / "hsa-main" / "version_1").exists()  # continued in its own version folder
    for k, v in end_state(out, "hsa-main").items():
        assert torch.equal(v, end[k]), k
    assert run_hsa("resume=true", "phases.1.overrides=[optim.lr=2e-3]") == 1  # another main phase: trained again
    assert (out / "runs" / "hsa-main" / "version_1").exists()
    assert not torch.equal(end_state(out, "hsa-main")["model.embed.weight"], end["model.embed.weight"])


def test_a_topk_schedule_leaves_a_full_attention_model_as_it_is(tmp_path):
    """The phases' top-k schedules reach the full baseline too: they must change nothing it computes."""
    states = []
    for name, extra in (("plain", []), ("scheduled", ["trainer.topk_schedule=[[0,64],[1,2]]"])):
        path = write_experiment(tmp_path / name, phases=[], seeds=None,
                                models={"full": ["model.attention=full", "trainer.max_steps=2", *extra]},
                                eval={"lengths": []})
        run_experiment(path, [])
        states.append(end_state(tmp_path / name / "out", "full"))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@pytest.mark.parametrize("override,message", [
    ("phases.1.max_steps=0", "phases[1] 'main': max_steps must be >= 1, got 0"),
    ("seeds=[]", "seeds is empty: list at least one seed"),
    ("seeds=[0,0]", "seeds must be distinct integers >= 0"),
    ("eval.reference_model=fulll", "eval.reference_model: 'fulll' is not one of hsa, full (did you mean 'full'?)"),
    ("phases.0.steps=3", "unknown experiment key 'phases[0].steps'"),
    ("phases.1.name=warmup", "phases: two phases are named 'warmup'"),
    ("phases.1.name=''", "phases[1].name must be a word"),
    ("models.hsa=[model.attention=hsa,warmpu:optim.lr=1]", "models.hsa: 'warmpu:optim.lr=1' names no phase"),
    ("phases.0.overrides=[trainer.topk_schedul=1]",
     "model 'hsa', phase 'warmup': unknown config key 'trainer.topk_schedul'"),
    ("phases.1.overrides=[model.d_model=48]", "model 'hsa', phase 'main': its model.* keys change parameter shapes"),
    ("phases.1.overrides=[data.tokenizer=configs/tokenizers/stdlib-bpe-8k.json]",
     "model 'hsa', phase 'main': data.tokenizer 'configs/tokenizers/stdlib-bpe-8k.json' differs"),
    ("eval.ppl_windows=-1", "eval.ppl_windows must be >= 0"),
])
def test_bad_experiment_input_is_one_config_error(tmp_path, override, message):
    path = write_experiment(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_experiment(path, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_window_schedule_on_a_full_attention_phase_is_refused(tmp_path):
    phases = [TOY["phases"][0], {"name": "main", "max_steps": 2, "overrides": ["trainer.swa_window_schedule=[[0,8]]"]}]
    with pytest.raises(ConfigError, match="model 'full', phase 'main': trainer.swa_window_schedule needs a sliding "
                                          "window, model.attention is 'full'"):
        load_experiment(write_experiment(tmp_path, phases=phases))


def test_an_unknown_phase_key_in_the_file_names_the_phase(tmp_path):
    phases = [TOY["phases"][0], {"name": "main", "steps": 2}]
    with pytest.raises(ConfigError, match=r"^phases\[1\]: unknown phase key 'steps' \(keys: name, max_steps, "
                                          r"overrides\)$"):
        load_experiment(write_experiment(tmp_path, phases=phases))


@pytest.mark.parametrize("args,message", [
    (["--seeds", "7"], "error: --seeds: '7' is not one of 0, 1"),
    (["--seeds", "0", "seeds=null"], "error: --seeds: the experiment has no seeds list"),
    # 4000 windows × 128 > the ~440K held-out tokens: refused before anything trains
    (["--models", "hsa", "--seeds", "0", "eval.ppl_windows=4000"], "held-out tokens, the held-out split has"),
])
def test_bad_experiment_commands_are_one_line(tmp_path, capsys, args, message):
    path = write_experiment(tmp_path)
    assert main(["experiment", "--config", path, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out" / "runs").exists()


def test_seeds_option_must_be_integers(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--config", write_experiment(tmp_path), "--seeds", "0,a"])
    assert "'0,a' is not a comma-separated list of integers" in capsys.readouterr().err


def test_summary_reports_each_hsa_blocks_chunk_selection(tmp_path):
    """The summary's chunk-selection table, from the paper recipe's first H100 runs (committed results): per HSA
    block the mean over seeds of each run's last retrieval statistics, beside ln(top-k), the entropy of uniform
    fusion weights; models without HSA blocks have no rows."""
    import math

    from lit_hsa.eval.experiment_report import summarize

    results = ROOT / "benchmarks/results"
    runs = ("hsa-s0", "hsa-s1", "full-s0")
    for run in runs:
        (tmp_path / f"{run}.json").write_text((results / f"paper_recipe_{run}_h100_2026-12-08.json").read_text())
    finals = [json.loads((tmp_path / f"{r}.json").read_text())["train"]["final_metrics"] for r in runs[:2]]
    summary = summarize(tmp_path, "full")
    assert set(summary["selection"]) == {"hsa"} and set(summary["selection"]["hsa"]) == {"0", "1"}
    for block in ("0", "1"):
        got = summary["selection"]["hsa"][block]
        for stat in ("fusion_entropy", "far_share", "distance_mean", "empty_share"):
            values = [f[f"retrieval/block{block}_{stat}"] for f in finals]
            assert got[stat]["mean"] == pytest.approx(sum(values) / 2) and got[stat]["n"] == 2, (block, stat)
        assert got["topk"] == 8
    row = next(line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| hsa | 0 |"))
    assert f"| {math.log(8):.2f} |" in row
