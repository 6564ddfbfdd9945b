import re

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


def test_an_empty_list_override_clears_the_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("unseen_classes: [cow, horse]\n")
    assert load_config(path, ["unseen_classes="]).unseen_classes == []


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("temperature=0", "'temperature': expected greater than 0, got 0.0"),
        ("lr=nan", "'lr': expected a finite number (float32 range), got nan"),
        ("lr=1e39", "'lr': expected a finite number (float32 range), got 1e+39"),
        ("lr=-1e-3", "'lr': expected greater than 0"),
        ("threshold=1", "'threshold': expected between 0 and 1 (exclusive), got 1.0"),
        ("batch_size=-2", "'batch_size': expected at least 1, got -2"),
        ("image_size=0", "'image_size': expected at least 1, got 0"),
        ("epochs=-1", "'epochs': expected at least 1, got -1"),
        ("eval_batch_size=0", "'eval_batch_size': expected at least 1"),
        ("dice_weight=-0.5", "'dice_weight': expected 0 or more, got -0.5"),
        ("num_negatives=-1", "'num_negatives': expected 0 or more"),
        ("fold=-1", "'fold': expected 0 or more"),
    ],
)
def test_numeric_keys_out_of_range_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_numeric_edges_that_runs_use_are_accepted():
    edges = ["num_negatives=0", "dice_weight=0", "max_steps=0", "threshold=0.01", "lr=1e-6"]
    config = load_config(None, edges)
    assert (config.num_negatives, config.dice_weight, config.threshold) == (0, 0.0, 0.01)


# -- relative paths (issue 22 item 5) ----------------------------------------------------------------
def test_relative_paths_in_a_config_file_start_at_its_folder_and_overrides_at_the_current_one(
    tmp_path, monkeypatch
):
    from pathlib import Path

    from fusioner.cli import main

    folder = tmp_path / "project" / "configs" / "folder"
    folder.mkdir(parents=True)
    data = tmp_path / "project" / "data" / "mine"
    data.mkdir(parents=True)
    (folder / "c.yaml").write_text("data_path: ../../data/mine\nvision_weights: random\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(folder / "c.yaml")
    assert Path(config.data_path) == data  # from the file's folder, whatever the current one
    assert config.vision_weights == "random"  # a registry word, not a file: kept as written
    # A command-line override is relative to the current folder.
    (elsewhere / "other").mkdir()
    assert Path(load_config(folder / "c.yaml", ["data_path=other"]).data_path) == elsewhere / "other"
    # Missing: the message says which base was used, and the command refuses before training.
    (folder / "bad.yaml").write_text("data_path: ../shared/data/ccp\n")
    with pytest.raises(ConfigError, match=r"relative to the config file's folder .*configs/folder"):
        load_config(folder / "bad.yaml", check_paths=True)
    with pytest.raises(ConfigError, match=r"nope does not exist relative to the current folder .*elsewhere"):
        load_config(folder / "c.yaml", ["data_path=nope"], check_paths=True)
    assert main(["train", "--config", str(folder / "bad.yaml")]) == 2
    # The file's placeholder replaced on the command line is never checked.
    assert Path(load_config(folder / "bad.yaml", ["data_path=other"], check_paths=True).data_path).is_dir()


def test_the_shipped_ccp_config_finds_its_data_from_any_folder(tmp_path, monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shared = root.parent / "shared" / "data" / "ccp"
    if not shared.is_dir():
        pytest.skip(f"the shared CCP photos are not at {shared}")
    monkeypatch.chdir(tmp_path)
    config = load_config(root / "configs" / "folder" / "ccp.yaml", check_paths=True)
    assert Path(config.data_path) == shared.resolve()
