"""Issue 21: what a training may claim as its run directory, and what a run must rebuild (items 6, 8, 12).

Each test fails on the code before the fix: an empty ``out_dir`` trained into the current folder
and any non-run folder was written over, a retraining kept the previous training's metrics.json
(and read as done), and a random-weight backbone came out different on every load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fusioner.cli import main
from fusioner.config import load_config
from fusioner.engine.train import train
from fusioner.errors import ConfigError, FusionerError
from fusioner.model import FusionerModel
from fusioner.run import DONE, PENDING, RunDir


def _config(voc_folder, out_dir, tmp_path, **kw):
    base = dict(
        dataset="folder", data_path=str(voc_folder), unseen_classes=["cow", "sheep"], preset="tiny",
        image_size=64, batch_size=4, max_steps=2, checkpoint_every=2, warmup_steps=1, num_negatives=2,
        lr=2e-3, out_dir=str(out_dir), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    return load_config(None, **{**base, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 6. an empty or non-run out_dir ---------------------------------------------------------------------
def test_an_empty_out_dir_is_refused_and_the_current_folder_untouched(
    voc_folder, tmp_path, monkeypatch, capsys
):
    home = tmp_path / "project"
    home.mkdir()
    (home / "config.yaml").write_text("# my commented config\nlr: 0.1\n")
    (home / "losses.jsonl").write_text('{"mine": 1}\n')
    monkeypatch.chdir(home)
    before = _files(home)
    config = home / "config.yaml"
    assert main(["train", "--config", str(config), f"data_path={voc_folder}", "out_dir="]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fusioner train: error: config key 'out_dir' is empty")
    assert _files(home) == before


def test_a_folder_that_is_not_a_run_is_refused(voc_folder, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("# notes\n")
    (folder / "losses.jsonl").write_text("mine\n")
    before = _files(folder)
    with pytest.raises(ConfigError, match=r"'out_dir': .*mine is not empty and is not a run directory"):
        train(_config(voc_folder, folder, tmp_path))
    with pytest.raises(ConfigError, match="not a run directory"):
        train(_config(voc_folder, folder, tmp_path), resume=True)
    assert _files(folder) == before  # no run.lock, no marker, nothing rewritten


def test_new_and_empty_folders_are_claimed_and_marked(voc_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RunDir.for_training(empty).is_run()
    result = train(_config(voc_folder, empty, tmp_path))
    assert (empty / ".fusioner-run").is_file() and result.steps == 2
    # A run made before the marker (config.yaml + train_state.json) is still a run.
    (empty / ".fusioner-run").unlink()
    assert RunDir(empty).is_run()


# -- 8. stale metrics do not survive a retraining --------------------------------------------------------
def test_retraining_a_finished_run_without_checkpoints_is_refused(voc_folder, tmp_path):
    out = tmp_path / "run"
    train(_config(voc_folder, out, tmp_path))
    run = RunDir(out)
    (out / "metrics.json").write_text(json.dumps({"one_way": {"miou": 0.5, "fbiou": 0.6}}))
    shutil.rmtree(run.checkpoints)
    assert run.state == DONE
    before = _files(out)
    with pytest.raises(FusionerError, match=r"holds an earlier training's results .*metrics\.json"):
        train(_config(voc_folder, out, tmp_path, lr=1e-2))
    assert _files(out) == before


def test_retraining_under_the_same_config_drops_the_old_figures(voc_folder, tmp_path):
    out = tmp_path / "run"
    config = _config(voc_folder, out, tmp_path)
    train(config)
    run = RunDir(out)
    (out / "metrics.json").write_text(json.dumps({"one_way": {"miou": 0.5, "fbiou": 0.6}}))
    (out / "evals").mkdir()
    (out / "evals" / "x.json").write_text("{}")
    shutil.rmtree(run.checkpoints)
    # What train does before its first step: the figures of the replaced model go.
    run.start_over(config_checked=True, write=True)
    assert not run.metrics.exists() and not run.evals.exists() and not run.train_state.exists()
    assert run.state == PENDING
    train(config, resume=True)  # retrains from scratch, as --resume without a checkpoint does
    assert run.is_trained() and not run.has_metrics()


# -- 12. random-weight backbones are rebuilt from the run's seed -----------------------------------------
@pytest.fixture(scope="module")
def random_run(voc_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("random")
    result = train(_config(voc_folder, tmp / "run", tmp, vision_weights="random", seed=3))
    return tmp / "run", {k: v.clone() for k, v in result.model.vision.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_random_backbone_is_the_same_on_every_load(random_run):
    run, trained = random_run
    torch.manual_seed(123)  # whatever state the caller left the generator in
    first = FusionerModel.from_pretrained(run).vision.state_dict()
    torch.manual_seed(456)
    second = FusionerModel.from_pretrained(run).vision.state_dict()
    assert _same(first, second) and _same(first, trained)
    record = json.loads((run / "model" / "config.json").read_text())
    assert record["backbone_seed"] == 3


def test_eval_of_a_random_run_gives_the_same_figures_twice(random_run, capsys):
    run, _ = random_run
    assert main(["eval", "--model", str(run)]) == 0
    first = json.loads((run / "metrics.json").read_text())
    assert main(["eval", "--model", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text()) == first


def test_a_random_backbone_without_a_seed_is_refused(random_run, tmp_path):
    run, _ = random_run
    copy = Path(shutil.copytree(run / "model", tmp_path / "model"))
    record = json.loads((copy / "config.json").read_text())
    del record["backbone_seed"]
    (copy / "config.json").write_text(json.dumps(record))
    with pytest.raises(FusionerError, match=r"vision backbone has random weights but no 'backbone_seed'"):
        FusionerModel.from_pretrained(copy)
