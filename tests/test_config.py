import pytest

from remedis.config import ConfigError, RunConfig

ROOT_CONFIGS = ["configs/quickstart.yaml"]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ROOT_CONFIGS)
def test_shipped_configs_load(name):
    from conftest import ROOT

    cfg = RunConfig.from_yaml(ROOT / name)
    assert cfg.pretrain.simclr.temperature > 0


def test_unknown_key_is_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain\.simclr\.epoch'.*did you mean 'pretrain\.simclr\.epochs'"):
        RunConfig.from_yaml(write(tmp_path, "pretrain:\n  simclr:\n    epoch: 3\n"))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'sed'"):
        RunConfig.from_yaml(write(tmp_path, "sed: 1\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"adapt\.epochs: expected an integer"):
        RunConfig.from_yaml(write(tmp_path, "adapt:\n  epochs: ten\n"))


def test_serve_model_must_be_adapted(tmp_path):
    with pytest.raises(ConfigError, match="serve.model"):
        RunConfig.from_yaml(write(tmp_path, "serve:\n  model: remedis@0.5\n"))


def test_values_are_read(tmp_path):
    cfg = RunConfig.from_yaml(write(tmp_path, "seed: 3\nadapt:\n  fractions: [0.25, 1]\nserve:\n  model: remedis@0.25\n"))
    assert cfg.seed == 3 and cfg.adapt.fractions == [0.25, 1.0]
