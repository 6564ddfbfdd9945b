import pytest

from fusioner.config import Config, load_config
from fusioner.errors import ConfigError


def test_yaml_then_overrides_then_kwargs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vision: dino_vits16\nepochs: 3\nunseen_classes: [cow, horse]\n")
    config = load_config(path, ["epochs=5", "data.path=/data/voc", "lr=3e-4"], seed=7)
    assert config.vision == "dino_vits16"
    assert config.epochs == 5
    assert config.data_path == "/data/voc"  # dotted spelling is the same key
    assert config.lr == pytest.approx(3e-4)
    assert config.unseen_classes == ["cow", "horse"]
    assert config.seed == 7


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vison: dino_vits16\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'vison' \(did you mean 'vision'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="command line: unknown config key 'epoch'"):
        load_config(None, ["epoch=3"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="'epochs': expected an integer"):
        load_config(None, ["epochs=2.5"])
    with pytest.raises(ConfigError, match="'batch_size': expected int"):
        load_config(None, ["batch_size=many"])
    with pytest.raises(ConfigError, match="'decoder'"):
        Config(decoder="fancy")
    with pytest.raises(ConfigError, match="override 'epochs': expected key=value"):
        load_config(None, ["epochs"])


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_presets_fill_only_what_is_not_given():
    small = Config(preset="small")
    assert (small.dim, small.depth) == (256, 4)
    custom = Config(preset="small", depth=2)
    assert (custom.dim, custom.depth) == (256, 2)
    with pytest.raises(ConfigError, match="not divisible"):
        Config(dim=100, heads=8)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    assert len(configs) >= 7
    for path in configs:
        if path.parent.name != "sweeps":
            load_config(path)
