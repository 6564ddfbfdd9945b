"""Parity with the reference code (benchmarks/parity.py on ../shared's fixture) and HSNet's episodes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "data" / "reference-parity"
VOC = ROOT.parent / "shared" / "data" / "voc2012-samples" / "VOC2012"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"parity fixture not found at {FIXTURE}")
needs_voc = pytest.mark.skipif(not VOC.is_dir(), reason=f"VOC samples not found at {VOC}")


def parity(fixture: Path, out: Path) -> subprocess.CompletedProcess:
    script = ROOT / "benchmarks" / "parity.py"
    cmd = [sys.executable, str(script), "--fixture", str(fixture), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


@needs_fixture
def test_parity_script_matches_the_reference_fixture(tmp_path):
    out = tmp_path / "parity.json"
    result = parity(FIXTURE, out)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert list(figures) == [
        "head", "one_way", "one_way_missing_class", "gzss_zegclip_voc", "gzss_background_as_class"
    ]  # fmt: skip
    assert set(figures["head"]) == {"logits", "logits_odd", "logits3"}
    assert all(0 <= d <= 1e-4 for d in figures["head"].values())
    spec = json.loads((FIXTURE / "metrics.json").read_text())
    expected = {
        "one_way": spec["one_way"]["expected"],
        "one_way_missing_class": spec["one_way"]["missing_class_case"]["hsnet"],
        "gzss_zegclip_voc": spec["gzss"]["zegclip_voc_protocol"],
        "gzss_background_as_class": spec["gzss"]["background_as_class"],
    }
    for key, want in expected.items():
        assert figures[key] == {k: pytest.approx(want[k], abs=1e-6) for k in figures[key]}, key
    # The two protocols are different figures, and HSNet's missing class lowers the mean.
    assert figures["gzss_zegclip_voc"]["hiou"] > figures["gzss_background_as_class"]["hiou"] + 0.05
    assert figures["one_way_missing_class"]["miou"] < figures["one_way"]["miou"]
    # Run again: the script replaces its own earlier output, but never a file it did not write.
    assert parity(FIXTURE, out).returncode == 0
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}\n')
    refused = parity(FIXTURE, foreign)
    assert refused.returncode == 2 and "is not an earlier output of parity.py" in refused.stderr
    assert foreign.read_text() == '{"mine": 1}\n'


@needs_fixture
def test_parity_script_fails_outside_tolerance(tmp_path):
    fixture = tmp_path / "fixture"
    shutil.copytree(FIXTURE, fixture)
    for path in fixture.iterdir():
        path.chmod(0o644)
    # 20 foreground pixels of episode 0 predicted background (one moves mIoU by about 5e-7, under
    # the 1e-6 tolerance): the 1-way figures leave it, the GZSS maps are untouched.
    with np.load(fixture / "metrics.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    target, pred = arrays["target_000"], arrays["pred_000"].copy()
    ys, xs = np.argwhere((target == 1) & (pred == 1))[:20].T
    pred[ys, xs] = 0
    arrays["pred_000"] = pred
    np.savez(fixture / "metrics.npz", **arrays)
    result = parity(fixture, tmp_path / "out.json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "OUTSIDE TOLERANCE one_way.miou" in result.stdout
    assert "gzss" not in result.stdout.split("OUTSIDE TOLERANCE", 1)[1]  # only what changed fails
    (fixture / "metrics.json").write_text("{}")
    broken = parity(fixture, tmp_path / "out2.json")
    assert (
        broken.returncode == 2
        and "metrics.json: key 'one_way.missing_class_case.dropped_class'" in broken.stderr
    )


def _voc_root(tmp_path: Path, val_list: str) -> tuple[Path, Path]:
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").symlink_to(VOC / "JPEGImages")
    (root / "SegmentationClass").symlink_to(VOC / "SegmentationClass")
    names = sorted(p.stem for p in (VOC / "JPEGImages").glob("*.jpg"))
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    lists = tmp_path / "splits"
    for fold in range(4):
        for part in ("trn", "val"):
            (lists / part).mkdir(parents=True, exist_ok=True)
            (lists / part / f"fold{fold}.txt").write_text(
                val_list if (part, fold) == ("val", 0) else "sample_0008__13\n"
            )
    return root, lists


@needs_voc
@pytest.mark.parametrize(
    ("val_list", "episodes"),
    [
        # sample_0120 holds bicycle (2) and bottle (5), both fold-0 classes: listed once, scored once.
        (
            "sample_0120__05\nsample_0000__01\n",
            {"aeroplane": 1, "bicycle": 0, "bird": 0, "boat": 0, "bottle": 1},
        ),
        # Listed twice (one line per class), it is two episodes.
        (
            "sample_0120__05\nsample_0120__02\n",
            {"aeroplane": 0, "bicycle": 1, "bird": 0, "boat": 0, "bottle": 1},
        ),
    ],
)
def test_one_way_scores_exactly_the_split_lists_pairs(tmp_path, val_list, episodes):
    from fusioner.config import load_config
    from fusioner.data.pascal5i import pascal5i_split
    from fusioner.engine.evaluate import EvalSettings, evaluate
    from fusioner.model import FusionerModel

    root, lists = _voc_root(tmp_path, val_list)
    split = pascal5i_split(root, 0, split_dir=lists)
    assert split.gzss_protocol == "zegclip_voc"
    torch.manual_seed(0)
    config = load_config(None, dataset="pascal5i", data_path=str(root), preset="tiny", image_size=64)
    model = FusionerModel.from_config(config).eval()
    kw = dict(seen=split.seen, unseen=split.unseen, settings=EvalSettings(64, threshold=0.97), progress=False)
    metrics = evaluate(model, split.val, gzss_protocol=split.gzss_protocol, **kw)
    one_way = metrics["one_way"]
    assert one_way["episodes"] == episodes
    # HSNet: a fold class without an episode stays in the mean at IoU 0.
    assert all(one_way["per_class"][n] == 0.0 for n, k in episodes.items() if k == 0)
    assert one_way["miou"] == pytest.approx(sum(one_way["per_class"].values()) / 5)
    # GZSS scores each image once whatever the list says, under both protocols, ZegCLIP's first.
    gzss = metrics["gzss"]
    assert gzss["protocol"] == "zegclip_voc" and set(gzss["protocols"]) == {
        "zegclip_voc",
        "background_as_class",
    }
    headline = {k: v for k, v in gzss.items() if k != "protocols"}
    # json.dumps: NaN (absent names, and the ignored background) compares equal to NaN.
    assert json.dumps(headline, sort_keys=True) == json.dumps(
        gzss["protocols"]["zegclip_voc"], sort_keys=True
    )
