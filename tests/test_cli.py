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


# -- predict with the demo's controls (issue 22 item 1; issue 21 item 14) ----------------------------
def _calibrated_copy(run_dir, tmp_path, seen_bias: float):
    """A copy of the run whose metrics.json says cat and dog were seen in training, grass not."""
    import json
    import shutil

    run = tmp_path / "calibrated"
    shutil.copytree(run_dir, run)
    per_class = {"background": 0.5, "cat": 0.1, "dog": 0.2, "grass": 0.3}
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "one_way": {"miou": 0.3, "fbiou": 0.6, "per_class": {"grass": 0.3}},
                "gzss": {"miou_seen": 0.1, "miou_unseen": 0.3, "hiou": 0.15, "per_class": per_class},
                "gzss_calibrated": {
                    "miou_seen": 0.1,
                    "miou_unseen": 0.3,
                    "hiou": 0.15,
                    "seen_bias": seen_bias,
                },
            }
        )
    )
    return run


def _predict(argv, capsys):
    try:
        code = main(["predict", *argv])
    except SystemExit as e:  # argparse's own refusals (a value not among the choices)
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_threshold_changes_the_label_map(run_dir, tmp_path, voc_folder, capsys):
    image = sorted((voc_folder / "images").glob("*.jpg"))[0]
    foreground = {}
    for threshold in ("0.05", "0.95"):
        out = tmp_path / threshold
        argv = [str(image), "--model", str(run_dir), "--classes", "cat,dog", "--threshold", threshold]
        assert _predict([*argv, "--out", str(out)], capsys)[0] == 0
        foreground[threshold] = (np.asarray(Image.open(out / f"{image.stem}_labels.png")) > 0).mean()
    # A low bar marks (nearly) every pixel, a high one (nearly) none: the flag is read, not ignored.
    assert foreground["0.05"] > foreground["0.95"]


def test_predict_one_name_mode_writes_one_mask_per_name_equal_to_the_python_api(
    run_dir, tmp_path, voc_folder, capsys
):
    from fusioner.model import FusionerModel

    image = sorted((voc_folder / "images").glob("*.jpg"))[0]
    out = tmp_path / "o"
    argv = [
        str(image),
        "--model",
        str(run_dir),
        "--classes",
        "a,b",
        "--threshold",
        "0.3",
        "--mode",
        "one-name",
    ]
    code, printed, err = _predict([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    masks = [np.asarray(Image.open(out / f"{image.stem}_mask{i}.png")) > 0 for i in (1, 2)]
    assert not (out / f"{image.stem}_labels.png").exists()
    assert str(out / f"{image.stem}_mask2.png") in printed
    model = FusionerModel.from_pretrained(run_dir).eval()
    expected = model.predict(str(image), "a, b", threshold=0.3, mode="one-name").numpy()
    assert expected.shape == (2, *masks[0].shape)
    np.testing.assert_array_equal(np.stack(masks), expected)
    # Each name alone: the union of the masks is the best-name map's foreground at the same threshold.
    labels = model.predict(str(image), ["a", "b"], threshold=0.3).numpy()
    np.testing.assert_array_equal(expected.any(axis=0), labels > 0)
    assert "loading model" in err  # the slow step says what it does (issue 22 item 7)


def test_predict_seen_bias_defaults_to_the_runs_calibration(run_dir, tmp_path, voc_folder, capsys):
    image = sorted((voc_folder / "images").glob("*.jpg"))[0]
    run = _calibrated_copy(run_dir, tmp_path, seen_bias=100.0)
    argv = [str(image), "--model", str(run), "--classes", "cat,dog,grass", "--threshold", "0.05"]
    assert _predict([*argv, "--out", str(tmp_path / "calibrated-out")], capsys)[0] == 0
    labels = np.asarray(Image.open(tmp_path / "calibrated-out" / f"{image.stem}_labels.png"))
    assert set(np.unique(labels).tolist()) <= {0, 3}  # the huge bias leaves only the unseen name, grass
    assert _predict([*argv, "--seen-bias", "0", "--out", str(tmp_path / "plain")], capsys)[0] == 0
    plain = np.asarray(Image.open(tmp_path / "plain" / f"{image.stem}_labels.png"))
    assert set(np.unique(plain).tolist()) & {1, 2}  # without the bias the seen names win pixels
    # A bias without a calibration to say which names are seen is refused, naming the flag.
    code, _, err = _predict(
        [
            str(image),
            "--model",
            str(run_dir),
            "--classes",
            "cat",
            "--seen-bias",
            "1",
            "--out",
            str(tmp_path / "y"),
        ],
        capsys,
    )
    assert code == 2 and "--seen-bias needs the names the model was trained on" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--treshold", "0.3"], "unknown option(s): --treshold"),
        (["--mode", "best"], "invalid choice: 'best'"),
        (["--threshold", "1.5"], "threshold must be between 0 and 1"),
        (["--refine", "crf"], "refinement must be one of none, spectral"),
        (["stray"], "unexpected arguments: stray"),
    ],
)
def test_predict_refuses_unknown_options_and_bad_values_by_name(
    extra, message, run_dir, tmp_path, voc_folder, capsys
):
    image = sorted((voc_folder / "images").glob("*.jpg"))[0]
    argv = [str(image), "--model", str(run_dir), "--classes", "cat", "--out", str(tmp_path / "o"), *extra]
    code, _, err = _predict(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_class_name_with_a_line_break_is_refused(run_dir, tmp_path, voc_folder, capsys):
    image = sorted((voc_folder / "images").glob("*.jpg"))[0]
    argv = [
        str(image),
        "--model",
        str(run_dir),
        "--classes",
        "person,sky\nperson",
        "--out",
        str(tmp_path / "o"),
    ]
    code, _, err = _predict(argv, capsys)
    assert code == 2 and "holds a line break" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    from fusioner.errors import FusionerError
    from fusioner.predict import check_names

    with pytest.raises(FusionerError, match="line break"):
        check_names(["person", "sky\u2028tree"])  # the Python path too, any line separator


def test_the_command_lines_choices_are_the_librarys():
    from fusioner import cli, decide, inference

    assert cli.RULES == tuple(decide.RULES) and cli.MODES == tuple(inference.MODES)


def test_version_flag_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusioner {version('fusioner')}"


def test_progress_bars_in_a_log_become_a_few_plain_lines():
    """Issue 22 item 7: a bar redrawn 2,000 times leaves a handful of lines, no carriage returns."""
    import io
    import time

    from tqdm import tqdm

    from fusioner.progress import PlainLines

    log = io.StringIO()
    stream = PlainLines(log, every=0.05)
    print("a plain line", file=stream)
    for _ in tqdm(range(2000), file=stream, mininterval=0, desc="caching"):
        time.sleep(0.0001)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "a plain line"
    assert 2 <= len(lines) < 40, lines  # periodic, not one per redraw
    assert "2000/2000" in lines[-1]  # the final state is there


def test_predict_over_several_images_says_how_far_it_is(run_dir, tmp_path, voc_folder, capsys):
    images = sorted((voc_folder / "images").glob("*.jpg"))[:3]
    code, _, err = _predict(
        [*map(str, images), "--model", str(run_dir), "--classes", "cat", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 0
    assert "predict 3/3" in err and "\r" not in err  # capsys is no terminal: plain lines
