"""The quickstart in its short setting: every report field, numbers in range, PNGs that open."""

from __future__ import annotations

import json
import logging
import math

from PIL import Image

from fusioner.cli import main


def test_fast_quickstart_writes_a_complete_report(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["quickstart", "--fast", "--out", str(tmp_path)]) == 0
    assert "--resume" not in caplog.text  # a first run warns of no resume the user never asked for
    printed = capsys.readouterr().out
    assert "1-way mIoU on unseen names" in printed and str(tmp_path / "report.md") in printed

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {
        "seed",
        "data",
        "fusioner",
        "baseline",
        "baseline_unseen_miou",
        "timings_s",
        "config",
        "files",
    }
    figures = {
        "one_way_unseen_miou",
        "one_way_unseen_fbiou",
        "gzss_seen_miou",
        "gzss_unseen_miou",
        "gzss_hiou",
    }
    # The baseline is scored on the 1-way question only, the one it answers.
    assert set(report["fusioner"]) == figures
    assert set(report["baseline"]) == {"one_way_unseen_miou", "one_way_unseen_fbiou"}
    for side in ("fusioner", "baseline"):
        for value in report[side].values():
            assert math.isnan(value) or 0.0 <= value <= 1.0
    assert report["baseline_unseen_miou"] == report["baseline"]["one_way_unseen_miou"]
    data = report["data"]
    assert data["seen_names"] > 900 and data["unseen_names"] > 200 and data["train_scenes"] > 0
    assert report["config"]["vision"] == "efficientnet_lite0" and report["config"]["text"] == "minilm_l6"
    assert all(v >= 0 for v in report["timings_s"].values())
    assert report["timings_s"]["total"] >= report["timings_s"]["data"]

    for key in ("loss_curve", "predictions"):
        with Image.open(tmp_path / report["files"][key]) as image:
            image.load()
            assert image.width > 100 and image.height > 100
    markdown = (tmp_path / "report.md").read_text()
    assert "baseline (shuffled names)" in markdown and report["files"]["predictions"] in markdown
    assert "Expect it near zero here" in markdown  # the GZSS figures say why they are small
    budget = f"epochs: {report['config']['epochs']}, batch size: {report['config']['batch_size']}"
    assert budget in markdown  # the report says what it ran

    # Run again: data and features are reused, finished runs are reloaded rather than retrained.
    shards = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("shard-*"))
    assert main(["quickstart", "--fast", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("shard-*")) == shards
    assert again["fusioner"] == report["fusioner"] and again["baseline"] == report["baseline"]
