import pytest

from remedis.config import ConfigError, RunConfig

ROOT_CONFIGS = ["configs/quickstart.yaml", "configs/smoke.yaml", "configs/breast_ultrasound.yaml", "configs/chest_xray.yaml",
                "configs/dermoscopy.yaml"]


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


def test_overrides_are_applied_and_checked(tmp_path):
    path = write(tmp_path, "data:\n  image_size: 64\n")
    cfg = RunConfig.from_yaml(path, ["data.image_size=128", "adapt.fractions=[0.5, 1.0]", "serve.model=remedis@0.5",
                                     "data.site_split_fractions={site-A: [0.8, 0.1, 0.1]}"])
    assert cfg.data.image_size == 128 and cfg.adapt.fractions == [0.5, 1.0]
    assert cfg.data.site_split_fractions == {"site-A": [0.8, 0.1, 0.1]}
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.imagesize'.*data\.image_size"):
        RunConfig.from_yaml(path, ["data.imagesize=128"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        RunConfig.from_yaml(path, ["data.image_size"])
    with pytest.raises(ConfigError, match="data.image_size is not a section"):
        RunConfig.from_yaml(path, ["data.image_size.x=1"])


def test_site_split_fractions_must_sum_to_one(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.site_split_fractions\.BUS-BRA"):
        RunConfig.from_yaml(write(tmp_path, "data:\n  site_split_fractions: {BUS-BRA: [0.8, 0.1]}\n"))


def test_site_split_override_moves_only_that_site():
    from remedis.config import DataConfig
    from remedis.data.manifest import Manifest, Record
    from remedis.stages import prepare_records

    records = [Record(image=f"{s}/{i}.png", label="ab"[i % 2], site=s, patient_id=f"p{i}") for s in ("A", "B") for i in range(200)]
    default = prepare_records(Manifest(records), DataConfig(), seed=0).records
    override = prepare_records(Manifest(records), DataConfig(site_split_fractions={"A": [0.8, 0.1, 0.1]}), seed=0).records
    assert [r.image for r in override] == [r.image for r in records]  # order kept

    def share(recs, site):
        return sum(r.split == "train" for r in recs if r.site == site) / 200

    assert share(default, "A") == pytest.approx(0.6) and share(override, "A") == pytest.approx(0.8)
    assert [r.split for r in default if r.site == "B"] == [r.split for r in override if r.site == "B"]


def test_training_loggers(tmp_path):
    from remedis.training import make_logger

    assert make_logger("csv", tmp_path / "a").__class__.__name__ == "CSVLogger"
    assert make_logger("tensorboard", tmp_path / "b").__class__.__name__ == "TensorBoardLogger"
    with pytest.raises(ConfigError, match="runtime.logger"):
        RunConfig.from_yaml(write(tmp_path, "runtime: {logger: wandb}\n"))
