"""One weights format (``checkpoint_io.save_weights``), written by every tool and read by one loader; files written
before it (``tests/fixtures/checkpoints_da1192d``: an experiment's phase end and trained weights, a ``fit``
checkpoint, a converted model, all written by the code at commit da1192d) still load, to the logits they gave
then."""

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lit_hsa.checkpoint_io import full_checkpoint, load_checkpoint_file, load_model, load_net, save_weights
from lit_hsa.config import ConfigError, ModelConfig
from lit_hsa.experiment import completed_phase, load_trained
from lit_hsa.model.transformer import HSATransformer

OLD = Path(__file__).parent / "fixtures" / "checkpoints_da1192d"
EXPECTED = torch.load(OLD / "expected_logits.pt", weights_only=True)


def logits(net: HSATransformer) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(EXPECTED["input_ids"])


@pytest.mark.parametrize(
    "name", ["experiment-phase-end.pt", "experiment.weights.pt", "fit-last.ckpt", "hf-converted.ckpt"]
)
def test_files_written_before_the_one_format_load_to_the_same_logits(name):
    net, records = load_net(OLD / name)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    torch.testing.assert_close(logits(net), EXPECTED[name], rtol=0, atol=1e-5)
    model, tokenizer = load_model(str(OLD / name), "cpu")  # what generate / eval read
    assert isinstance(records["hyper_parameters"]["model"], dict) and tokenizer.vocab_size <= model.cfg.vocab_size


def test_the_experiments_old_records_read_as_before():
    net, train = load_trained(OLD / "experiment.weights.pt")
    assert train["steps"] == 5 and [p["name"] for p in train["phases"]] == ["warmup", "main"]
    identity = load_checkpoint_file(OLD / "experiment-phase-end.pt")["config"]
    assert completed_phase(OLD / "experiment-phase-end.pt", identity)["name"] == "main"
    assert completed_phase(OLD / "experiment-phase-end.pt", {**identity, "seed": -1}) is None


def test_save_weights_writes_what_every_loader_reads(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**load_checkpoint_file(OLD / "hf-converted.ckpt")["hyper_parameters"]["model"])
    net = HSATransformer(cfg)
    state = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    out = tmp_path / "sub" / "w.pt"
    save_weights(out, state, {"model": asdict(cfg), "tokenizer": "byte", "eos_token": None}, train={"steps": 3})
    raw = torch.load(out, weights_only=True)
    assert set(raw["state_dict"]) == {f"model.{k}" for k in state} and raw["train"] == {"steps": 3}
    assert raw["hyper_parameters"]["model"] == asdict(cfg) and "pytorch-lightning_version" in raw
    _, loaded, _ = full_checkpoint(out)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())  # the dtypes saved, bit for bit
    reloaded, _ = load_net(out)
    expected = HSATransformer(cfg)
    expected.load_state_dict({k: v.float() for k, v in state.items()})
    torch.testing.assert_close(logits(reloaded), logits(expected), rtol=0, atol=0)
    assert not list(out.parent.glob(".*"))  # written atomically: no temporary left beside it
    with pytest.raises(TypeError, match="hparams"):
        save_weights(tmp_path / "x.pt", state, {"tokenizer": "byte"})


def test_a_file_of_another_model_is_one_clear_error(tmp_path):
    checkpoint = load_checkpoint_file(OLD / "hf-converted.ckpt")
    checkpoint["hyper_parameters"]["model"]["d_model"] *= 2
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="does not hold this model's weights"):
        load_net(tmp_path / "other.ckpt")
