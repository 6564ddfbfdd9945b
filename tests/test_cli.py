"""The command line: user errors are one line and exit 2; predict writes overlays and label maps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusioner.cli import main
from fusioner.config import load_config
from fusioner.engine.train import train


@pytest.fixture(scope="module")
def run_dir(voc_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    config = load_config(
        None, data_path=str(voc_folder), unseen_classes=["cow"], preset="tiny", image_size=64, batch_size=2,
        max_steps=2, out_dir=str(out),
    )  # fmt: skip
    train(config)
    return out


def test_predict_writes_overlay_label_map_and_legend(run_dir, tmp_path, voc_folder):
    image = sorted((voc_folder / "images").glob("*.jpg"))[0]
    assert (
        main(
            [
                "predict",
                str(image),
                "--model",
                str(run_dir),
                "--classes",
                "cat, dog,grass",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    labels = np.asarray(Image.open(tmp_path / f"{image.stem}_labels.png"))
    with Image.open(image) as original:
        assert labels.shape == (original.height, original.width)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    assert (tmp_path / "classes.txt").read_text().split("\n")[:4] == ["background", "cat", "dog", "grass"]
    with Image.open(tmp_path / f"{image.stem}_overlay.png") as overlay:
        assert overlay.width == labels.shape[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--config", "nope.yaml"], "config file nope.yaml does not exist"),
        (["predict", "x.jpg", "--model", "RUN", "--classes", " , ", "--out", "o"], "--classes is empty"),
        (["predict", "x.jpg", "--model", "RUN", "--classes", "a,a", "--out", "o"], "duplicate names"),
        (
            ["predict", "missing.jpg", "--model", "RUN", "--classes", "cat", "--out", "OUT"],
            "missing.jpg does not exist",
        ),
        (["eval", "--model", "RUN", "--bogus", "1"], "unknown config key 'bogus'"),
        (["eval", "--model", "not a model"], "neither a local folder nor a Hub repo id"),
        # A mistyped run folder whose parent exists is a local path, not a failed Hub fetch.
        (["eval", "--model", "MISTYPED"], "model folder"),
    ],
)
def test_user_errors_are_one_line(argv, message, run_dir, tmp_path, capsys):
    stand_ins = {"RUN": str(run_dir), "OUT": str(tmp_path / "o"), "MISTYPED": str(run_dir) + "-typo"}
    argv = [stand_ins.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cache_command_fills_the_feature_cache_once(voc_folder, tmp_path, capsys):
    import json

    config = tmp_path / "c.yaml"
    config.write_text(
        f"data_path: {voc_folder}\nunseen_classes: [cow]\nimage_size: 64\ncache_dir: {tmp_path / 'cache'}\n"
    )
    assert main(["cache", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "val:" in printed
    (folder,) = (tmp_path / "cache").iterdir()  # train and val images share one key: backbone + data
    index = json.loads((folder / "index.json").read_text())
    assert len(index["items"]) == len(list((voc_folder / "images").iterdir()))
    shards = sorted(p.stat().st_mtime_ns for p in folder.glob("shard-*"))
    assert main(["cache", "--config", str(config)]) == 0
    assert sorted(p.stat().st_mtime_ns for p in folder.glob("shard-*")) == shards
