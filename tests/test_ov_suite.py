"""`fusioner eval --suite`: every dataset found under data_root, one table, missing ones named."""

from __future__ import annotations

import json

import pytest
import torch
from test_ov_data import VOC, make_ov_root, read_names

from fusioner import inference
from fusioner.cli import main
from fusioner.config import load_config
from fusioner.data.ov import OV_DATASETS
from fusioner.engine.suite import OV_ORDER, IoUMeter, resize_short_side
from fusioner.inference import argmax_labels, image_logits
from fusioner.model import FusionerModel

needs_voc = pytest.mark.skipif(not VOC.is_dir(), reason=f"VOC samples not found at {VOC}")
VOC_IDS = ["sample_0000", "sample_0120"]  # two of the real samples: aeroplane; bicycle and bottle


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny head over the real offline backbones, saved as a model folder."""
    torch.manual_seed(0)
    config = load_config(None, preset="tiny", image_size=64)
    model = FusionerModel.from_config(config).eval()
    folder = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("mode", ["fixed", "sliding"])
def test_chunked_argmax_matches_the_argmax_of_all_logits(tiny_model, monkeypatch, mode):
    model, _ = tiny_model
    monkeypatch.setattr(inference, "NAMES_PER_PASS", 8)  # 30 names: four chunks, the last one short
    torch.manual_seed(1)
    image, text = torch.rand(3, 50, 90), torch.nn.functional.normalize(torch.randn(30, 384), dim=-1)
    with torch.no_grad():
        full = image_logits(model, image, text, size=64, mode=mode)
    labels = argmax_labels(model, image, text, size=64, mode=mode)
    agree = (labels == full.argmax(0)).float().mean()
    assert labels.shape == (50, 90) and agree > 0.999  # equal up to float ties
    smaller = argmax_labels(model, image, text, size=64, mode=mode, out_size=(25, 45))
    assert smaller.shape == (25, 45) and int(smaller.max()) < 30


def test_iou_meter_follows_the_detectron2_rule():
    meter = IoUMeter(["a", "b", "c"])
    target = torch.tensor([[0, 0, 1, -1]])
    meter.update(torch.tensor([[0, 1, 1, 2]]), target)
    result = meter.compute()
    # a: tp 1, union 2 -> 0.5; b: tp 1, union 2 -> 0.5; c: absent from the ground truth, predicted
    # only on an ignored pixel -> not counted; mIoU over the present classes a, b
    assert result["per_class"] == {"a": 0.5, "b": 0.5, "c": None}
    assert result["miou"] == 0.5 and result["pacc"] == pytest.approx(2 / 3) and result["classes_present"] == 2


def test_resize_short_side_keeps_the_aspect():
    assert resize_short_side(torch.rand(3, 100, 300), 50).shape == (3, 50, 150)
    assert resize_short_side(torch.rand(3, 300, 100), 512).shape == (3, 1536, 512)


@needs_voc
def test_suite_ov_end_to_end(tiny_model, tmp_path, capsys):
    _, folder = tiny_model
    data_root = make_ov_root(tmp_path / "data", VOC_IDS)
    out = tmp_path / "suite"
    argv = ["eval", "--model", str(folder), "--suite", "ov", f"data_root={data_root}", "--short-side", "40"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "suite.json").read_text())
    assert list(record["datasets"]) == list(OV_ORDER) and record["skipped"] == {}
    table = (out / "suite.md").read_text()
    for name in OV_ORDER:
        result = record["datasets"][name]
        assert 0.0 <= result["miou"] <= 1.0 and result["names"] == len(read_names(name))
        assert f"| {OV_DATASETS[name].title} | {result['names']} |" in table
        assert f"{name}: mIoU" in printed
        per_class = json.loads((out / "per_class" / f"{name}.json").read_text())
        assert list(per_class) == list(read_names(name))  # every name, in label order
    assert record["datasets"]["ade847"]["images"] == 2 and record["datasets"]["voc20"]["images"] == 2
    # VOC-20 ignores background, so only the object names of the two images count
    present = {
        n for n, v in json.loads((out / "per_class" / "voc20.json").read_text()).items() if v is not None
    }
    assert present == {"aeroplane", "bicycle", "bottle"}
    assert "Short side 40" in table


@needs_voc
def test_missing_datasets_are_named_and_skipped(tiny_model, tmp_path, capsys):
    from test_ov_data import copy_voc

    _, folder = tiny_model
    copy_voc(tmp_path / "data", VOC_IDS[:1])
    out = tmp_path / "suite"
    argv = ["eval", "--model", str(folder), "--suite", "ov", f"data_root={tmp_path / 'data'}"]
    assert main([*argv, "--short-side", "40", "--out", str(out), "--only", "ade847,voc20"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "suite.json").read_text())
    assert list(record["datasets"]) == ["voc20"] and list(record["skipped"]) == ["ade847"]
    looked_for = tmp_path / "data" / "ADE20K_2021_17_01" / "annotations_detectron2" / "validation"
    assert f"ade847: skipped, not found: {looked_for} does not exist" in printed
    assert "scripts/prepare_ade847.py" in (out / "suite.md").read_text()  # and how to get it


@needs_voc
def test_suite_fewshot_scores_each_fold(tiny_model, tmp_path):
    from test_ov_data import copy_voc

    _, folder = tiny_model
    copy_voc(tmp_path / "data", VOC_IDS)
    out = tmp_path / "suite"
    argv = ["eval", "--model", str(folder), "--suite", "fewshot", f"data_root={tmp_path / 'data'}"]
    assert main([*argv, "--out", str(out)]) == 0
    record = json.loads((out / "suite.json").read_text())
    assert list(record["datasets"]) == [f"pascal5i-f{f}" for f in range(4)]
    assert list(record["skipped"]) == [f"coco20i-f{f}" for f in range(4)]
    # fold 0 (aeroplane, bicycle, bird, boat, bottle): three of them are in the two images
    assert 0.0 <= record["datasets"]["pascal5i-f0"]["miou"] <= 1.0
    assert set(json.loads((out / "per_class" / "pascal5i-f0.json").read_text())) >= {"aeroplane", "bicycle"}
    assert "| PASCAL-5i fold 0 | 2 |" in (out / "suite.md").read_text()


def test_suite_needs_data_root(tiny_model, tmp_path, capsys):
    _, folder = tiny_model
    assert main(["eval", "--model", str(folder), "--suite", "ov", "--out", str(tmp_path / "s")]) == 2
    assert "config key 'data_root' is empty" in capsys.readouterr().err


def test_plain_eval_of_an_ov_dataset_points_to_the_suite(tiny_model, tmp_path, capsys):
    from test_ov_data import write_cityscapes

    _, folder = tiny_model
    root = write_cityscapes(tmp_path)
    argv = ["eval", "--model", str(folder), "--dataset", "cityscapes", "--data.path", str(root)]
    assert main([*argv, "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "n-way over all its 19 names" in err and "--suite ov --only cityscapes" in err
    assert not (tmp_path / "m.json").exists()
