from dataclasses import asdict

import pytest
import torch
from omegaconf import OmegaConf

from lit_hsa.config import PRESETS, ConfigError, ModelConfig, load_config
from lit_hsa.model.transformer import HSATransformer


def meta_param_counts(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = HSATransformer(ModelConfig.from_name(name, vocab_size=ModelConfig.from_name(name).vocab_size or 320))
    return model.num_parameters()


def test_dense_05b_size():
    total, active = meta_param_counts("dense-0.5b")
    assert 0.45e9 <= total <= 0.6e9 and active == total


def test_moe_8b_a1b_size():
    total, active = meta_param_counts("moe-8b-a1b")
    assert 7e9 <= total <= 9e9
    assert 0.8e9 <= active <= 1.3e9


def test_one_gpu_moe_size():
    total, active = meta_param_counts("moe-1b-a0.2b")
    assert 0.9e9 <= total <= 1.2e9 and 0.17e9 <= active <= 0.25e9


def test_small_and_tiny_sizes():
    assert 100e6 <= meta_param_counts("small")[0] <= 150e6
    assert meta_param_counts("tiny")[0] < 5e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    ModelConfig.from_name(name).validate()


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: small\n  hsa_topk: 16\ntrainer:\n  max_steps: 5\n")
    cfg = load_config(str(path), ["trainer.max_steps=7", "model.fusion=stick_breaking"])
    assert cfg.model.d_model == PRESETS["small"].d_model  # preset chosen by the file
    assert cfg.model.hsa_topk == 16 and cfg.model.fusion == "stick_breaking" and cfg.trainer.max_steps == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.no_such_key=1"], "unknown config key 'model.no_such_key'"),
        (["model.swa_windw=3"], "did you mean 'model.swa_window'"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["model.attention=hsb"], "model.attention"),
        (["model.n_heads=3"], "model.n_heads"),
        (["data.seq_len=100"], "data.seq_len (100) must be a multiple of model.chunk_size"),
        (["model.name=huge"], "unknown preset 'huge'"),
        (["ckpt_path=missing.ckpt"], "ckpt_path 'missing.ckpt' does not exist"),
        (["trainer.max_steps"], "dotted.key=value"),
        (["data.document_masking=true"], "needs data.align_docs_to_chunks=true"),
        (["data.sources.0.wieght=2"], "unknown config key 'data.sources[0].wieght' (did you mean"),
        (["data.sources.0.weight=heavy"], "data.sources[0].weight"),
        (["data.sources.3.weight=2"], "override 'data.sources.3.weight': data.sources has 1 item(s), indices 0..0"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_read_only_schema_still_takes_files_and_overrides(tmp_path):
    """OmegaConf 2.3 makes every node of a frozen dataclass (``ModelConfig``) read-only, containers and values, and
    then refuses to merge a file's ``model.name`` onto it (``main.py fit --config configs/tiny.yaml`` failed there):
    a schema flagged read-only throughout, as 2.3 builds it, still takes the files' values and the overrides."""
    from omegaconf import DictConfig, OmegaConf

    from lit_hsa.config import Config, merge_onto

    def read_only(node):
        OmegaConf.set_readonly(node, True)
        if isinstance(node, DictConfig):
            for key in node.keys():
                read_only(node._get_node(key))

    schema = OmegaConf.structured(Config(model=ModelConfig.from_name("tiny")))
    read_only(schema)
    cfg = merge_onto(schema, OmegaConf.create({"model": {"name": "tiny", "swa_window": 64}}),
                     overrides=["model.hsa_topk=3", "trainer.max_steps=2"], unknown_key=str)
    assert (cfg.model.name, cfg.model.swa_window, cfg.model.hsa_topk, cfg.trainer.max_steps) == ("tiny", 64, 3, 2)


def test_overrides_address_list_items_by_index(tmp_path):
    """``data.sources.1.weight=3`` changes that one item of a list the files gave; the others keep their keys."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - {kind: stdlib, weight: 1.0}\n    - {kind: files, paths: [a.txt]}\n")
    cfg = load_config(str(path), ["data.sources.1.weight=3", "data.sources.0.min_chars=5"])
    first, second = cfg.data.sources
    assert (first.kind, first.weight, first.min_chars) == ("stdlib", 1.0, 5)
    assert (second.kind, second.paths, second.weight, second.min_chars) == ("files", ["a.txt"], 3.0, 0)


def test_several_config_files_merge_in_order(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model:\n  name: small\n  swa_window: 256\ntrainer:\n  max_steps: 5\n  run_name: a\n")
    second.write_text("trainer:\n  run_name: b\n")
    cfg = load_config([str(first), str(second)], ["trainer.max_steps=7"])
    assert (cfg.model.name, cfg.model.d_model, cfg.model.swa_window) == ("small", 640, 256)  # preset from file 1
    assert (cfg.trainer.run_name, cfg.trainer.max_steps) == ("b", 7)


def test_a_model_name_that_is_no_preset_needs_the_shape_keys(tmp_path):
    model = {**asdict(ModelConfig.from_name("small")), "name": "qwen3-hsa", "d_model": 320}
    complete = tmp_path / "converted.yaml"
    OmegaConf.save(OmegaConf.create({"model": model}), complete)
    cfg = load_config(str(complete))
    assert (cfg.model.name, cfg.model.d_model, cfg.model.n_heads) == ("qwen3-hsa", 320, 10)
    del model["qk_norm"]  # a key outside the shape: its default
    OmegaConf.save(OmegaConf.create({"model": model}), complete)
    assert load_config(str(complete)).model.qk_norm is ModelConfig().qk_norm
    del model["n_heads"]
    partial = tmp_path / "partial.yaml"
    OmegaConf.save(OmegaConf.create({"model": model}), partial)
    with pytest.raises(ConfigError, match="unknown preset 'qwen3-hsa'"):
        load_config(str(partial))
