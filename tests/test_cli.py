"""What a user sees: `main.py fit` end to end on tiny settings, resume, validate, and one-line config errors."""
import json
import math
import re
import subprocess
import sys

import pytest

from lit_hsa.cli import main
from tests.helpers import FAST, ROOT, fit, scalars


def test_fit_leaves_events_checkpoint_and_config(tmp_path):
    run = fit(tmp_path, "e2e", "trainer.max_steps=4", "trainer.val_check_interval=2")
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("step*-val*.ckpt"))) == 1  # the best by val/loss
    assert "hsa_topk: 4" in (run / "config.yaml").read_text()
    losses = scalars(run, "train/loss")
    # before the first update the model predicts close to uniformly over its (padded) vocabulary: loss ≈ ln V (the
    # init's small logits add ~0.03 nats); a loss averaged wrongly (summed, or over padding) is far from it
    vocab = int(re.search(r"vocab_size: (\d+)", (run / "config.yaml").read_text()).group(1))
    assert sorted(losses) == [0, 1, 2, 3] and abs(losses[0] - math.log(vocab)) < 0.1, (losses[0], vocab)
    for tag in ("val/loss", "val/ppl", "train/grad_norm", "moe/max_violation", "lr-AdamW/pg1"):
        assert scalars(run, tag), tag


def test_resume_gives_the_same_losses(tmp_path):
    # Constant LR: a cosine schedule depends on max_steps, which differs between the interrupted and full runs.
    common = ["trainer.val_check_interval=100", "data.num_workers=2", "trainer.checkpoint_every_n_steps=3",
              "optim.schedule=constant"]
    straight = fit(tmp_path, "straight", "trainer.max_steps=7", *common)
    first = fit(tmp_path, "first", "trainer.max_steps=3", *common)
    resumed = fit(tmp_path, "resumed", "trainer.max_steps=7", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
                  *common)
    expected, got = scalars(straight, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(got) == [s for s in sorted(expected) if s >= 3]  # resumed run logs steps 3..6 only
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step


def test_validate_from_checkpoint(tmp_path):
    run = fit(tmp_path, "v", "trainer.max_steps=2")
    args = ["validate", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *FAST]
    assert main(args) == 0


@pytest.mark.parametrize(
    "override, needle",
    [("model.no_such_key=1", "no_such_key"), ("data.sources=[{kind: files}]", "data.sources[0].paths"),
     ("data.paths=[missing.txt]", "missing.txt"), ("data.tokenizer=missing/tokenizer.json", "missing/tokenizer.json")],
)
@pytest.mark.slow
def test_bad_config_exits_nonzero_with_one_line(override, needle):
    proc = subprocess.run([sys.executable, "main.py", "fit", "--config", "configs/tiny.yaml", override],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_malformed_record_mid_training_stops_with_file_and_line(tmp_path, capsys):
    import json

    lines = [json.dumps({"text": "hello world " * 40}) for _ in range(120)]
    lines[90] = '{"text": oops'
    (tmp_path / "mid.jsonl").write_text("\n".join(lines) + "\n")
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}",
            f"data.paths=[{tmp_path / 'mid.jsonl'}]", "data.num_workers=1", "trainer.max_steps=40", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {tmp_path / 'mid.jsonl'}:91: malformed JSON (Expecting value)"


def test_generate_from_checkpoint(tmp_path, capsys):
    run = fit(tmp_path, "gen", "trainer.max_steps=2")
    capsys.readouterr()
    args = ["generate", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--prompt", "def main(", "--max-new-tokens",
            "16", "--segment-size", "4", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip("\n")  # some text came out
    assert main(["generate", "--ckpt", str(tmp_path / "none.ckpt"), "--prompt", "x"]) == 2
    capsys.readouterr()
    assert main([*args, "--compile"]) == 2
    expected = "error: --compile speeds up CUDA-graph decoding: it needs a CUDA --device, got 'cpu'"
    assert capsys.readouterr().err.strip() == expected


KILL_SCRIPT = """
import os, signal, sys
import lightning as L
sys.path.insert(0, {root!r})
from lit_hsa.training.run import build_run
from lit_hsa.config import load_config

class KillAt(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:  # mid-epoch, two steps after the last checkpoint
            os.kill(os.getpid(), signal.SIGKILL)

cfg = load_config({config!r}, {overrides!r})
module, datamodule, trainer = build_run(cfg)
trainer.callbacks.append(KillAt())
trainer.fit(module, datamodule=datamodule)
"""


@pytest.mark.slow
def test_kill_9_then_resume_from_last_matches_uninterrupted_run(tmp_path):
    common = ["trainer.val_check_interval=100", "data.num_workers=2", "trainer.checkpoint_every_n_steps=3",
              "optim.schedule=constant", "trainer.max_steps=8"]
    straight = fit(tmp_path, "straight", *common)
    overrides = [f"trainer.root_dir={tmp_path}", "trainer.run_name=killed", *FAST, *common]
    script = KILL_SCRIPT.format(root=str(ROOT), config=str(ROOT / "configs/tiny.yaml"), overrides=overrides)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, no clean shutdown
    last = sorted((tmp_path / "killed").glob("version_*"))[-1] / "checkpoints" / "last.ckpt"
    resumed = fit(tmp_path, "resumed", *common, f"ckpt_path={last}")
    expected, got = scalars(straight, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(got) == [3, 4, 5, 6, 7]  # the checkpoint of step 3 was the last complete one
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step


def test_help_lists_every_subcommand_and_each_has_its_own(capsys):
    """``main.py --help`` lists the subcommands (argparse subcommands, not a hand dispatch); ``main.py <command>
    --help`` shows that command's usage, description and options; an unknown command is a usage error (exit 2)."""
    import pytest

    from lit_hsa.cli import COMMANDS

    def help_text(argv):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    listing = help_text(["--help"])
    assert all(f" {name} " in listing for name in COMMANDS)
    flags = {"fit": "--config", "validate": "--config", "eval": "--lengths", "generate": "--prompt-file",
             "export": "--native", "convert": "--to", "experiment": "--eval-only", "merge": "--base",
             "consolidate": "--overwrite"}
    assert set(flags) == set(COMMANDS)
    for name, command in COMMANDS.items():
        text = help_text([name, "--help"])
        assert text.startswith(f"usage: main.py {name} ") and " ".join(command.description.split()) in text
        assert flags[name] in text
    with pytest.raises(SystemExit) as done:
        main(["trian"])
    assert done.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def test_behaviour_fingerprint_compare_names_what_differs(tmp_path):
    """benchmarks/behaviour_fingerprint.py --compare: equal fingerprints are 'bit-identical' (exit 0); any differing
    value is named by variant and key (exit 1)."""
    before = {"hsa-dense": {"logits": "ab", "generated": [1, 2]}, "swa-moe": {"logits": "cd", "generated": [3]}}
    after = {"hsa-dense": {"logits": "ab", "generated": [1, 2]}, "swa-moe": {"logits": "cd", "generated": [4]}}
    paths = []
    for name, data in (("before", before), ("after", after), ("same", before)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))

    def compare(a, b):
        return subprocess.run([sys.executable, "benchmarks/behaviour_fingerprint.py", "--compare", str(a), str(b)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    same = compare(paths[0], paths[2])
    assert same.returncode == 0 and same.stdout.strip() == "bit-identical"
    different = compare(paths[0], paths[1])
    assert different.returncode == 1 and different.stdout.strip() == "DIFFERENT: swa-moe.generated"
