"""The sweep report's side-by-side table of designs (issue 12), on known numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fusioner.sweep.expand import load_sweep
from fusioner.sweep.report import write_report


def _done(sweep_dir: Path, name: str, miou: float, cal_hiou: float) -> None:
    (sweep_dir / name).mkdir(parents=True)
    gz = {"miou_seen": 0.2, "miou_unseen": 0.1, "hiou": 0.05}
    metrics = {
        "one_way": {"miou": miou, "fbiou": 0.6, "per_class": {}},
        "gzss": gz,
        "gzss_calibrated": {"miou_seen": 0.3, "miou_unseen": 0.2, "hiou": cal_hiou, "seen_bias": 1.0},
    }
    (sweep_dir / name / "metrics.json").write_text(json.dumps(metrics))


def test_report_puts_calibrated_gzss_and_the_shuffled_baseline_beside_each_design(tmp_path):
    runs, figures = [], {"fusioner": (0.37, 0.058), "zegclip": (0.30, 0.040)}
    for method, (miou, hiou) in figures.items():
        for shuffled in ("False", "True"):
            name = f"e-m-folder-f0-method_{method}-shuffle_names_{shuffled}"
            labels = {"vision": "e", "text": "m", "dataset": "folder", "fold": "0", "method": method,
                      "shuffle_names": shuffled}  # fmt: skip
            runs.append({"name": name, "labels": labels})
            _done(
                tmp_path,
                name,
                miou / 10 if shuffled == "True" else miou,
                hiou / 10 if shuffled == "True" else hiou,
            )
    (tmp_path / "sweep.json").write_text(json.dumps({"source": "x.yaml", "overrides": [], "runs": runs}))
    write_report(tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "## Designs side by side" in table
    assert "| e | m | folder | fusioner | 37.0 | 60.0 | 30.0 | 20.0 | 5.8 | 3.7 | 0.6 |" in table
    assert "| e | m | folder | zegclip | 30.0 | 60.0 | 30.0 | 20.0 | 4.0 | 3.0 | 0.4 |" in table
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(round(float(r["gzss_cal_hiou"]), 6) for r in rows) == [0.004, 0.0058, 0.04, 0.058]


def test_the_methods_sweep_expands_to_each_design_and_its_shuffled_baseline():
    sweep = load_sweep(Path(__file__).parents[1] / "configs" / "sweeps" / "methods.yaml", [])
    designs = {(r.config.method, r.config.refine, r.config.pseudo_labels, r.config.zegformer_grouping,
                r.config.spectral_weight) for r in sweep.runs}  # fmt: skip
    assert ("zegclip", "none", "none", "queries", 0.0) in designs
    assert ("fusioner", "spectral", "none", "queries", 0.0) in designs
    assert ("fusioner", "none", "kmeans", "queries", 0.0) in designs
    assert ("fusioner", "none", "clip-zss", "queries", 0.0) in designs  # CLIP-ZSS with its teacher
    assert ("zegformer", "none", "none", "spectral", 0.0) in designs
    assert ("fusioner", "spectral", "none", "queries", 1.0) in designs  # SAZS: the training term too
    assert len(sweep.runs) == 2 * len(designs)
    assert {r.config.shuffle_names for r in sweep.runs} == {False, True}
