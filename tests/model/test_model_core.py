"""The model core stands on its own: ``lit_hsa.model`` (and the Hugging Face wrapper exported with it) imports
nothing of the data layer, the trainer or OmegaConf; its ``ModelConfig`` is frozen, and what schedules change while
a model runs (top-k, SWA window) is the model's runtime state: a model switched to a top-k or window computes
exactly what a model built with that value computes, and its config is unchanged."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from lit_hsa.model.transformer import HSATransformer
from tests.helpers import ROOT, VOCAB, tiny

FORBIDDEN = ("data_modules", "omegaconf", "lightning", "pytorch_lightning", "pyarrow",
             "lit_hsa.config", "lit_hsa.training", "lit_hsa.eval", "lit_hsa.experiment")
CORE = ["lit_hsa.model.config", "lit_hsa.model.transformer", "lit_hsa.model.lora", "lit_hsa.model.init",
        "lit_hsa.inference.decode", "lit_hsa.inference.static_decode", "lit_hsa.inference.generate"]


def loaded_after_import(modules: list[str]) -> list[str]:
    """Top-level names of what importing ``modules`` in a fresh interpreter loads (from the repository root)."""
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def offenders(loaded: list[str]) -> list[str]:
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_model_core_imports_without_data_layer_trainer_or_omegaconf():
    loaded = loaded_after_import(CORE)
    assert "lit_hsa.model.transformer" in loaded  # the check below looks at a real import
    assert offenders(loaded) == []


def test_exported_hugging_face_wrapper_needs_only_the_model_core():
    pytest.importorskip("transformers")
    loaded = loaded_after_import(["lit_hsa.interop.modeling_lit_hsa"])
    assert offenders(loaded) == []


def test_the_check_sees_a_forbidden_import():
    """The guard itself: importing the training package loads what the core must not."""
    assert {"lightning", "omegaconf", "data_modules"} <= {m.split(".")[0] for m in
                                                         offenders(loaded_after_import(["lit_hsa.training.module"]))}


def test_model_config_is_frozen():
    cfg = tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hsa_topk = 1
    assert dataclasses.replace(cfg, hsa_topk=1).hsa_topk == 1 and cfg.hsa_topk == 2


def _logits(model, ids, doc_ids=None):
    with torch.no_grad():
        return model(ids, doc_ids)


@pytest.mark.parametrize("sub_layer", [False, True], ids=["plain", "hsa-swa-sub-layer"])
def test_runtime_topk_and_window_equal_a_model_built_with_them(sub_layer):
    """set_hsa_topk / set_swa_window give the logits of a model built with those values and the same weights,
    leave ``model.cfg`` as built, and ``running_config`` reports them. The HSA blocks' own SWA sub-layer keeps its
    build-time window (it is built explicitly in the comparison model)."""
    extra = dict(hsa_layer_swa=True, hsa_swa_window=8) if sub_layer else {}
    cfg = tiny(n_groups=2, hsa_topk=3, swa_window=8, **extra)
    torch.manual_seed(0)
    model = HSATransformer(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 96))
    doc_ids = torch.cat([torch.zeros(2, 50, dtype=torch.long), torch.ones(2, 46, dtype=torch.long)], dim=1)
    before = dataclasses.asdict(cfg)

    for topk, window in [(1, 8), (5, 8), (3, 4), (2, 16)]:
        model.set_hsa_topk(topk)
        model.set_swa_window(window)
        built = HSATransformer(dataclasses.replace(cfg, hsa_topk=topk, swa_window=window)).eval()
        built.load_state_dict(model.state_dict())
        for docs in (None, doc_ids):
            torch.testing.assert_close(_logits(model, ids, docs), _logits(built, ids, docs), rtol=0, atol=0)
        assert (model.hsa_topk, model.swa_window) == (topk, window)
        running = model.running_config()
        assert (running.hsa_topk, running.swa_window) == (topk, window)
        assert dataclasses.asdict(model.cfg) == before
        assert model.cfg is cfg

    # and the values matter: top-k 1 against 5 changes the logits (the sequence has 12 chunks)
    model.set_swa_window(8)
    model.set_hsa_topk(1)
    one = _logits(model, ids)
    model.set_hsa_topk(5)
    assert not torch.equal(one, _logits(model, ids))


def test_runtime_values_are_checked():
    model = HSATransformer(tiny())
    with pytest.raises(ValueError, match="hsa_topk"):
        model.set_hsa_topk(0)
    with pytest.raises(ValueError, match="swa_window"):
        model.set_swa_window(0)
    with pytest.raises(ValueError, match="full"):
        HSATransformer(tiny(attention="full")).set_swa_window(8)
