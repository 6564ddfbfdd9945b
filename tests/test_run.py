"""RunDir: a run's state follows from the files it holds; Metrics reads and formats metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fusioner.errors import DataError, FusionerError
from fusioner.metrics_file import pct
from fusioner.run import DONE, FAILED, PARTIAL, PENDING, TRAINED, Metrics, RunDir

METRICS = {
    "one_way": {"miou": 0.41234, "fbiou": 0.6},
    "gzss": {"miou_seen": 0.25, "miou_unseen": 0.15, "hiou": 0.1875},
}


def test_state_follows_the_files(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert run.state == PENDING and run.latest_checkpoint() is None
    run.checkpoint(3).mkdir(parents=True)
    (run.checkpoints / "step-00000007.tmp").mkdir()  # being written: not a checkpoint yet
    assert run.state == PARTIAL and run.latest_checkpoint() == run.checkpoint(3)
    run.model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (run.model / name).write_text("{}")
    run.write_train_state(2, 3)
    assert run.state == PARTIAL  # a model without a finished train_state.json is not trusted
    run.write_train_state(3, 3)
    assert run.state == TRAINED and run.read_train_state().finished
    run.error.write_text("Traceback (most recent call last):\n  ...\nValueError: boom\n\n")
    assert run.state == FAILED and run.last_error() == "ValueError: boom"
    run.metrics.write_text(json.dumps(METRICS))
    assert run.state == DONE


def test_a_broken_metrics_file_is_not_done_and_reads_as_a_clear_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.metrics.write_text("{not json")
    assert run.state == PENDING
    with pytest.raises(DataError, match=r"cannot read metrics file .*metrics.json"):
        run.read_metrics()
    run.metrics.write_text(json.dumps({"gzss": {}}))
    with pytest.raises(DataError, match=r"metrics.json: key 'one_way' is missing"):
        run.read_metrics()
    with pytest.raises(DataError, match="metrics file .*nowhere.json does not exist"):
        Metrics.read(tmp_path / "nowhere.json")


def test_metrics_headline_and_line() -> None:
    metrics = Metrics(METRICS)
    assert metrics.headline() == {
        "miou": 0.41234,
        "fbiou": 0.6,
        "gzss_miou_seen": 0.25,
        "gzss_miou_unseen": 0.15,
        "gzss_hiou": 0.1875,
    }
    assert metrics.line() == (
        "1-way mIoU 0.4123  FB-IoU 0.6000  |  GZSS seen 0.2500 unseen 0.1500 hIoU 0.1875"
    )
    n_way = Metrics({"one_way": METRICS["one_way"], "n_way": {"miou": 0.5}})
    assert n_way.headline() == {"miou": 0.41234, "fbiou": 0.6}
    assert n_way.line().endswith("n-way (each image's own names in one pass) mIoU 0.5000")
    assert [pct(v) for v in (0.41234, math.nan, None)] == ["41.2", "n/a", "n/a"]


def test_require_finished_model_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FusionerError, match="does not exist"):
        RunDir(tmp_path / "absent").require_finished_model()
    with pytest.raises(FusionerError, match=r"holds no finished model: .*config.json, .*model.safetensors"):
        RunDir(tmp_path).require_finished_model()
