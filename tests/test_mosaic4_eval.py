"""`fusioner eval --dataset mosaic4`: 1-way per tile name and 4-way (the four names in one pass)."""

from __future__ import annotations

import json

from test_mosaic4 import VOC, synthetic_tree, voc_tree

from fusioner.cli import main
from fusioner.config import load_config
from fusioner.engine.train import train
from mosaic4.cli import main as mosaic4_main


def test_eval_on_a_generated_mosaic4_set(voc_folder, tmp_path):
    tree = voc_tree(tmp_path / "fss") if VOC.is_dir() else synthetic_tree(tmp_path / "fss")
    out = tmp_path / "mosaic4"
    assert (
        mosaic4_main(
            ["generate", "--fss-root", str(tree), "--out", str(out), "--num", "6", "--tile-size", "64"]
        )
        == 0
    )

    config = load_config(
        None,
        dataset="folder",
        data_path=str(voc_folder),
        unseen_classes=["cow", "sheep"],
        preset="tiny",
        image_size=64,
        batch_size=2,
        max_steps=2,
        out_dir=str(tmp_path / "run"),
    )
    train(config)
    metrics_path = tmp_path / "mosaic_metrics.json"
    args = ["eval", "--model", str(tmp_path / "run"), "--dataset", "mosaic4", "--data.path", str(out)]
    assert main([*args, "--out", str(metrics_path), "image_size=128"]) == 0
    metrics = json.loads(metrics_path.read_text())

    assert metrics["config"]["unseen_classes"] == ["cow", "sheep"]  # the run's config, overridden where asked
    assert metrics["config"]["dataset"] == "mosaic4"
    assert "gzss" not in metrics
    from fusioner.data.mosaic import Mosaic4

    dataset = Mosaic4(out)
    assert set(metrics["one_way"]["per_class"]) == set(dataset.vocabulary)  # every tile name, queried alone
    assert set(metrics["n_way"]["per_class"]) >= set(dataset.vocabulary)
    assert 0.0 <= metrics["n_way"]["miou"] <= 1.0
    assert 0.0 <= metrics["one_way"]["fbiou"] <= 1.0
