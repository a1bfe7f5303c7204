
import pytest

from lit_hsa.cli import main
from lit_hsa.config import ConfigError, load_config
from tests.helpers import FAST, ROOT, fit, scalars

STAGES = ["warmup", "pretrain", "midtrain", "anneal", "sft"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_configs_load(stage, tmp_path, monkeypatch):
    if stage == "sft":  # its data path is the user's; validation of the config itself must pass
        monkeypatch.chdir(tmp_path)
    cfg = load_config(str(ROOT / "configs" / "stages" / f"{stage}.yaml"))
    assert cfg.data.seq_len % cfg.model.chunk_size == 0 and cfg.model.name == "small"


def test_stages_change_context_window_and_topk():
    cfgs = {s: load_config(str(ROOT / "configs" / "stages" / f"{s}.yaml")) for s in STAGES}
    assert cfgs["warmup"].model.hsa_topk * 64 >= cfgs["warmup"].data.seq_len  # dense HSA warm-up
    assert cfgs["pretrain"].model.hsa_topk * 64 < cfgs["pretrain"].data.seq_len  # sparse
    assert cfgs["midtrain"].data.seq_len > cfgs["pretrain"].data.seq_len
    assert cfgs["sft"].data.resolved_sources()[0].format == "chat" and cfgs["sft"].optim.schedule == "cosine"


def test_init_from_chains_stages_and_rejects_incompatible_models(tmp_path, capsys):
    first = fit(tmp_path, "stage1", "trainer.max_steps=2", "model.hsa_topk=8")
    ckpt = first / "checkpoints" / "last.ckpt"
    second = fit(tmp_path, "stage2", "trainer.max_steps=2", "model.hsa_topk=2", "model.swa_window=32",
                 f"init_from={ckpt}")
    losses = scalars(second, "train/loss")
    assert sorted(losses) == [0, 1]  # a new run: steps start at 0 (new optimizer and schedule)
    assert losses[0] < 5.5  # but from trained weights (random init starts at ln(320) ≈ 5.77)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}", *FAST,
            "model.d_model=96", f"init_from={ckpt}"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit this model config" in err and "model.embed.weight (320, 128) vs (320, 96)" in err
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, [f"init_from={ckpt}", f"ckpt_path={ckpt}"])
