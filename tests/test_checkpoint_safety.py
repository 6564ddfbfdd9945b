"""A checkpoint folder is untrusted input on resume: nothing in it may run code, and another run's
checkpoints are refused (issue 21, items 1, 11 and 15)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fusioner.config import load_config
from fusioner.engine.train import train
from fusioner.errors import ConfigError, FusionerError
from fusioner.run import CHECKPOINT_STATE, RunDir


class _Payload:
    """Unpickling this object writes ``marker``: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _config(voc_folder, root: Path, **kw):
    base = dict(
        dataset="folder",
        data_path=str(voc_folder),
        unseen_classes=["cow", "sheep"],
        preset="tiny",
        image_size=64,
        batch_size=4,
        epochs=20,
        lr=2e-3,
        warmup_steps=2,
        num_negatives=2,
        max_steps=4,
        checkpoint_every=2,
        spectral_weight=0.1,  # an objective with state of its own: accelerate's custom-state path
        out_dir=str(root / "run"),
        cache_dir=str(root / "cache"),
    )
    return load_config(None, **{**base, **kw})


@pytest.fixture(scope="module")
def stopped_run(voc_folder, tmp_path_factory) -> Path:
    """A run whose last checkpoint is step 2 of 4 (the final one removed), to resume from."""
    root = tmp_path_factory.mktemp("stopped")
    config = _config(voc_folder, root)
    train(config)
    run = RunDir(config.out_dir)
    shutil.rmtree(run.checkpoint(4))
    shutil.rmtree(run.model)
    run.train_state.unlink()
    return root


def _copy(root: Path, to: Path) -> Path:
    shutil.copytree(root / "run", to / "run")
    return to


def test_a_checkpoint_stores_the_objective_as_safetensors_not_a_pickle(stopped_run):
    ckpt = RunDir(stopped_run / "run").checkpoint(2)
    assert (ckpt / "objective.safetensors").is_file()
    assert not list(ckpt.glob("custom_checkpoint_*"))


def _files(stopped_run: Path) -> list[str]:
    ckpt = RunDir(stopped_run / "run").checkpoint(2)
    written = sorted(p.name for p in ckpt.iterdir() if p.is_file() and p.name != CHECKPOINT_STATE)
    # Files accelerate reads when present or registered, whether or not this run wrote them.
    return [*written, "custom_checkpoint_0.pkl", "sampler.bin", "scaler.pt"]


def test_a_payload_planted_in_any_checkpoint_file_never_runs_on_resume(voc_folder, stopped_run, tmp_path):
    # One file at a time, the others intact: a load that refuses one file early must not hide a
    # later file that would have run.
    for name in _files(stopped_run):
        root = _copy(stopped_run, tmp_path / name)
        ckpt = RunDir(root / "run").checkpoint(2)
        marker = tmp_path / f"{name}.ran"
        torch.save({"state": _Payload(marker)}, ckpt / name)
        state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
        state["files"][name] = (ckpt / name).stat().st_size  # sizes agree: only the content is hostile
        (ckpt / CHECKPOINT_STATE).write_text(json.dumps(state))
        try:
            train(_config(voc_folder, root), resume=True)
        except FusionerError as e:
            assert "no intact checkpoint" in str(e) and name in str(e)
        assert not marker.exists(), f"a payload in {name} ran on resume"


def test_resume_completes_and_restores_the_objective(voc_folder, stopped_run, tmp_path):
    root = _copy(stopped_run, tmp_path)
    result = train(_config(voc_folder, root), resume=True)
    assert result.steps == 4 and len(result.losses) == 2  # steps 3 and 4 only


def test_another_runs_checkpoints_are_refused_even_without_config_yaml(voc_folder, stopped_run, tmp_path):
    root = _copy(stopped_run, tmp_path)
    RunDir(root / "run").config.unlink()
    with pytest.raises(ConfigError, match=r"another config \(seed: 0 -> 7"):
        train(_config(voc_folder, root, seed=7), resume=True)


def test_losses_up_to_a_checkpoint_are_on_disk_when_it_is_written(voc_folder, tmp_path, monkeypatch):
    from fusioner.engine import checkpoint

    seen: dict[int, int] = {}
    save = checkpoint.save_checkpoint

    def spy(accelerator, run, step, config, objective):
        seen[step] = len(run.losses.read_text().splitlines())  # what a kill right after would keep
        return save(accelerator, run, step, config, objective)

    monkeypatch.setattr(checkpoint, "save_checkpoint", spy)
    train(_config(voc_folder, tmp_path, log_every=100, spectral_weight=0.0))
    assert seen == {2: 2, 4: 4}
