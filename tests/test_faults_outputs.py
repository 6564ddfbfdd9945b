"""Issue 21: commands that wrote over files they did not write (items 3, 4, 5, 7, 13).

Each test fails on the code before the fix: eval wrote any ``--out`` and replaced a run's
metrics.json under other settings, ``mosaic4 generate --overwrite`` replaced its own source, the
quickstart deleted a user's ``data/images/train_N.png``, and a Space re-export kept the previous
model's metrics.json.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fusioner.cli import main
from fusioner.config import load_config
from fusioner.engine.train import train
from fusioner.run import RunDir


def _cli(argv, capsys) -> tuple[int, str, str]:
    """Exit code, the last line of stderr, stdout."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    return code, lines[-1] if lines else "", captured.out


@pytest.fixture(scope="module")
def evaluated_run(voc_folder, tmp_path_factory) -> Path:
    """A 4-step run evaluated under its own config: it holds its own metrics.json."""
    tmp = tmp_path_factory.mktemp("evaluated")
    config = load_config(
        None,
        dataset="folder", data_path=str(voc_folder), unseen_classes=["cow", "sheep"], preset="tiny",
        image_size=64, batch_size=4, max_steps=4, checkpoint_every=2, warmup_steps=2, num_negatives=2,
        lr=2e-3, out_dir=str(tmp / "run"), cache_dir=str(tmp / "cache"),
    )  # fmt: skip
    train(config)
    assert main(["eval", "--model", str(tmp / "run")]) == 0
    return tmp / "run"


def _copy(run: Path, to: Path) -> Path:
    copy = Path(shutil.copytree(run, to))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "out_dir": str(copy)}, sort_keys=False))
    return copy


# -- 4. an evaluation under other settings never replaces the run's metrics.json -----------------------
def test_eval_under_other_settings_leaves_the_runs_metrics_byte_identical(evaluated_run, tmp_path, capsys):
    run = _copy(evaluated_run, tmp_path / "run")
    own = (run / "metrics.json").read_bytes()
    code, _, out = _cli(["eval", "--model", str(run), "unseen_classes=cow,horse"], capsys)
    assert code == 0
    assert (run / "metrics.json").read_bytes() == own  # figures and calibration untouched
    (written,) = (run / "evals").glob("*.json")
    assert f"wrote {written}" in out
    assert re.fullmatch(r"[0-9a-f]{8}\.json", written.name)  # a list value is only hashed, not spelled
    other = json.loads(written.read_text())
    assert other["config"]["unseen_classes"] == ["cow", "horse"]
    assert RunDir(run).read_metrics().data["config"]["unseen_classes"] == ["cow", "sheep"]
    # The same settings again land on the same file; the run's own config writes metrics.json.
    assert _cli(["eval", "--model", str(run), "unseen_classes=cow,horse"], capsys)[0] == 0
    assert list((run / "evals").glob("*.json")) == [written]
    code, _, out = _cli(["eval", "--model", str(run), "eval_batch_size=2"], capsys)  # a runtime key
    assert code == 0 and f"wrote {run / 'metrics.json'}" in out


def test_eval_slug_names_the_dataset_and_short_values():
    from fusioner.eval_output import settings_slug

    slug = settings_slug({"dataset": "mosaic4", "data_path": "/x/y"})
    assert slug.startswith("mosaic4-") and len(slug) == len("mosaic4-") + 8
    assert settings_slug({"refine": "spectral"}).startswith("refine-spectral-")
    assert settings_slug({"refine": "spectral"}) != settings_slug({"refine": "none"})


# -- 3. eval --out refuses a file it did not write -----------------------------------------------------
def test_eval_out_refuses_a_file_it_did_not_write(evaluated_run, tmp_path, capsys):
    other = _copy(evaluated_run, tmp_path / "other")
    config_json = other / "model" / "config.json"
    before = config_json.read_bytes()
    code, err, _ = _cli(["eval", "--model", str(evaluated_run), "--out", str(config_json)], capsys)
    assert code == 2
    did_not = "exists and fusioner eval did not write it; choose another --out"
    assert err == f"fusioner eval: error: {config_json} {did_not}"
    assert config_json.read_bytes() == before

    # A new file is written; eval's own file is rewritten on the next call.
    target = tmp_path / "figures.json"
    assert _cli(["eval", "--model", str(evaluated_run), "--out", str(target)], capsys)[0] == 0
    assert json.loads(target.read_text())["written_by"] == "fusioner eval"
    assert _cli(["eval", "--model", str(evaluated_run), "--out", str(target)], capsys)[0] == 0


def test_eval_out_refuses_another_runs_metrics_for_other_settings(evaluated_run, tmp_path, capsys):
    run = _copy(evaluated_run, tmp_path / "run")
    own = (run / "metrics.json").read_bytes()
    argv = ["eval", "--model", str(run), "--out", str(run), "unseen_classes=cow,horse"]
    code, err, _ = _cli(argv, capsys)
    assert code == 2
    assert f"--out {run / 'metrics.json'} is the metrics.json of run {run}" in err and "unseen_classes" in err
    assert (run / "metrics.json").read_bytes() == own


# -- 13. a Space re-export drops the previous model's metrics.json -------------------------------------
def test_space_reexport_does_not_keep_the_previous_models_metrics(evaluated_run, tmp_path):
    from fusioner.demo.space import export_space

    unevaluated = _copy(evaluated_run, tmp_path / "b")
    (unevaluated / "metrics.json").unlink()
    space = tmp_path / "space"
    export_space(space, str(evaluated_run))
    assert (space / "model" / "metrics.json").read_bytes() == (evaluated_run / "metrics.json").read_bytes()
    export_space(space, str(unevaluated))
    assert not (space / "model" / "metrics.json").exists()  # no calibration of another model
    assert (space / "model" / "config.json").is_file()


# -- 5. mosaic4 generate never replaces its own source -------------------------------------------------
def _fss(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("ant", "bee", "cat", "dog", "eel"):
        (root / folder).mkdir(parents=True)
        for k in (1, 2):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
                root / folder / f"{k}.jpg"
            )
            mask = np.zeros((24, 24), dtype=np.uint8)
            mask[4:16, 4:16] = 255
            Image.fromarray(mask).save(root / folder / f"{k}.png")
    (root / "notes.txt").write_text("my own notes")
    return root


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_mosaic4_out_overlapping_the_source_is_refused_with_overwrite(tmp_path, capsys, where):
    from mosaic4.cli import main as mosaic_main

    source = _fss(tmp_path / "data" / "fss")
    out = {"same": source, "parent": source.parent, "inside": source / "ant"}[where]
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    argv = ["generate", "--fss-root", str(source), "--out", str(out), "--num", "2", "--tile-size", "16"]
    assert mosaic_main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output {out}" in err and f"--fss-root {source}" in err
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


# -- 7. the quickstart deletes nothing it did not write -------------------------------------------------
def test_quickstart_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    (images / "train_3.png").write_bytes(b"a user's own picture")
    code, err, _ = _cli(["quickstart", "--fast", "--out", str(tmp_path)], capsys)
    assert code == 2 and f"--out {tmp_path} is not empty and fusioner quickstart did not write it" in err
    assert (images / "train_3.png").read_bytes() == b"a user's own picture"


def test_scene_generator_clears_only_a_folder_it_marked(tmp_path):
    from fusioner.errors import DataError
    from fusioner.pictograms import generate_scenes

    mine = tmp_path / "images" / "train_00003.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"mine")
    with pytest.raises(DataError, match="not written by the pictogram scene generator"):
        generate_scenes(tmp_path, num_train=2, num_val=1)
    assert mine.read_bytes() == b"mine"


def test_eval_suite_out_refuses_a_folder_it_did_not_write(evaluated_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "suite.md").write_text("my own notes")
    argv = [
        "eval",
        "--model",
        str(evaluated_run),
        "--suite",
        "ov",
        f"data_root={tmp_path}",
        "--out",
        str(out),
    ]
    code, err, _ = _cli(argv, capsys)
    assert code == 2 and f"--out {out} is not empty and fusioner eval --suite did not write it" in err
    assert (out / "suite.md").read_text() == "my own notes"
