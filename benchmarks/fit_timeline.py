"""Where the time of a `main.py fit` run goes: the same command, with a callback printing the wall-clock time (GPU
synchronised) of each phase — build, setup, the sanity validation, every training batch, validation, checkpoint
saves, teardown. Run it with ``TORCH_LOGS=dynamo`` to see what torch.compile compiles and for how long.

    TORCH_LOGS=dynamo python benchmarks/fit_timeline.py fit --config configs/stages/pretrain.yaml [key=value ...]
"""
import sys
import time

import lightning as L
import torch

T0 = time.time()


def stamp(what):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"[t={time.time() - T0:7.1f}s] {what}", flush=True)


class Timing(L.Callback):
    def setup(self, trainer, pl_module, stage): stamp("setup")
    def on_fit_start(self, trainer, pl_module): stamp("fit start")
    def on_train_start(self, trainer, pl_module): stamp("train start")
    def on_train_batch_start(self, trainer, pl_module, batch,
                             i): stamp(f"batch {i} start {tuple(batch['input_ids'].shape)}")
    def on_train_batch_end(self, trainer, pl_module, out, batch, i): stamp(f"batch {i} end")
    def on_validation_start(self, trainer, pl_module): stamp("validation start")
    def on_validation_batch_end(self, trainer, pl_module, out, batch, i, dl=0): stamp(f"val batch {i} end")
    def on_validation_end(self, trainer, pl_module): stamp("validation end")
    def on_save_checkpoint(self, trainer, pl_module, ckpt): stamp("save checkpoint (hook)")
    def on_train_end(self, trainer, pl_module): stamp("train end")
    def teardown(self, trainer, pl_module, stage): stamp("teardown")


sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import lit_hsa.training.run as run  # noqa: E402

build = run.build_run


def build_run(cfg, command="fit"):
    stamp("build_run")
    module, dm, trainer = build(cfg, command)
    trainer.callbacks.append(Timing())
    stamp("built")
    return module, dm, trainer


run.build_run = build_run
from lit_hsa.cli import main  # noqa: E402

stamp("imported")
rc = main(sys.argv[1:])
stamp(f"exit {rc}")
sys.exit(rc)
