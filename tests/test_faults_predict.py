"""Issue 13, items 3 and 6: predict never loses an output nor replaces a file it did not write;
mosaic4 generate refuses more mosaics than its source holds distinct ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusioner.cli import main
from fusioner.config import load_config
from fusioner.errors import FusionerError
from fusioner.model import FusionerModel
from fusioner.predict import output_names
from mosaic4.cli import main as mosaic4_main
from mosaic4.fss import scan_fss
from mosaic4.generate import MosaicOptions, distinct_mosaics


@pytest.fixture(scope="module")
def model_dir(voc_folder, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = load_config(
        None, dataset="folder", data_path=str(voc_folder), unseen_classes=["cow"], preset="tiny",
        image_size=64, out_dir=str(tmp_path_factory.mktemp("run")),
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("model") / "model"
    FusionerModel.from_config(config).save_pretrained(folder)
    return folder


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A noise image of ``size`` (w, h): the size tells later which input an output came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _predict(model_dir: Path, images: list[Path], out: Path, classes: str = "cat,dog") -> int:
    argv = ["predict", *map(str, images), "--model", str(model_dir), "--classes", classes]
    return main([*argv, "--out", str(out)])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- naming --------------------------------------------------------------------------------------
def test_shared_stems_get_distinct_names_whatever_the_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    images = [a / "photo.jpg", b / "photo.jpg", a / "photo.png", a / "cat.jpg", b / "CAT.png"]
    names = output_names([str(p) for p in images])
    assert names == ["a__photo.jpg", "b__photo.jpg", "photo.png", "cat.jpg", "CAT.png"]
    assert output_names([str(p) for p in reversed(images)]) == names[::-1]
    assert output_names([str(a / "photo.jpg")]) == ["photo"]


def test_the_same_image_twice_is_refused(tmp_path):
    with pytest.raises(FusionerError, match=r"image .*x\.jpg is given twice \(also as x\.jpg\)"):
        output_names(["x.jpg", str(Path("x.jpg").absolute())])


# -- predict end to end --------------------------------------------------------------------------
def test_colliding_stems_all_survive(model_dir, tmp_path, capsys):
    sizes = {"a/photo.jpg": (40, 30), "b/photo.jpg": (36, 44), "a/photo.png": (50, 20)}
    images = [_image(tmp_path / "in" / rel, size, seed) for seed, (rel, size) in enumerate(sizes.items())]
    out = tmp_path / "out"
    assert _predict(model_dir, images, out) == 0
    expected = {"a__photo.jpg": images[0], "b__photo.jpg": images[1], "photo.png": images[2]}
    for name, image in expected.items():
        w, h = sizes[str(image.relative_to(tmp_path / "in"))]
        assert np.asarray(Image.open(out / f"{name}_labels.png")).shape == (h, w)  # its own input's
        with Image.open(out / f"{name}_overlay.png") as picture:
            assert picture.width == w
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["files"] == {
        f"{name}{suffix}": str(image.resolve())
        for name, image in expected.items()
        for suffix in ("_labels.png", "_overlay.png")
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*manifest["files"], "classes.txt", "predictions.json"]
    )
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / f) for f in manifest["files"])


def test_a_foreign_classes_txt_is_refused_and_left_as_it_was(model_dir, voc_folder, tmp_path, capsys):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "classes.txt").write_bytes((voc_folder / "classes.txt").read_bytes())
    before = _snapshot(dataset)
    assert _predict(model_dir, [_image(tmp_path / "x.jpg", (20, 20), 0)], dataset) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fusioner predict: error: {dataset / 'classes.txt'} exists and fusioner predict did not write it; "
        "choose another --out\n"
    )
    assert _snapshot(dataset) == before  # byte-identical, and nothing added


@pytest.mark.parametrize("foreign", ["x_labels.png", "x_overlay.png", "predictions.json"])
def test_any_foreign_output_path_is_refused_before_writing(model_dir, tmp_path, capsys, foreign):
    out = tmp_path / "out"
    out.mkdir()
    (out / foreign).write_bytes(b"not mine")
    assert _predict(model_dir, [_image(tmp_path / "x.jpg", (20, 20), 0)], out) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fusioner predict: error: {out / foreign} exists and fusioner predict did not write it; "
        "choose another --out\n"
    )
    assert _snapshot(out) == {foreign: b"not mine"}


def test_rerunning_into_the_same_out_replaces_its_own_files(model_dir, tmp_path, capsys):
    image, other = _image(tmp_path / "x.jpg", (24, 20), 0), _image(tmp_path / "y.jpg", (20, 24), 1)
    out = tmp_path / "out"
    assert _predict(model_dir, [image], out) == 0
    first = _snapshot(out)
    (out / "x_labels.png").write_bytes(b"damaged")
    assert _predict(model_dir, [image], out) == 0
    assert _snapshot(out) == first  # rewritten, the same bytes again

    # Another image into the same folder adds its files and keeps the first image's.
    assert _predict(model_dir, [other], out) == 0
    assert set(json.loads((out / "predictions.json").read_text())["files"]) == {
        "x_labels.png", "x_overlay.png", "y_labels.png", "y_overlay.png",
    }  # fmt: skip
    assert (out / "x_labels.png").read_bytes() == first["x_labels.png"]

    # Other names would leave x's and y's label maps described by the wrong classes.txt: refused.
    capsys.readouterr()
    kept = _snapshot(out)
    assert _predict(model_dir, [image], out, classes="grass") == 2
    err = capsys.readouterr().err
    assert "holds 1 label maps made with other class names (cat, dog)" in err
    assert str(out / "y_labels.png") in err
    assert _snapshot(out) == kept
    # Rewriting every label map it holds is fine.
    assert _predict(model_dir, [image, other], out, classes="grass") == 0
    assert (out / "classes.txt").read_text() == "background\ngrass\n"


def test_a_user_edited_classes_txt_is_no_longer_predicts_own(model_dir, tmp_path, capsys):
    image, out = _image(tmp_path / "x.jpg", (20, 20), 0), tmp_path / "out"
    assert _predict(model_dir, [image], out) == 0
    (out / "classes.txt").write_text("background\nmy own\n")
    assert _predict(model_dir, [image], out) == 2
    assert f"{out / 'classes.txt'} exists and fusioner predict did not write it" in capsys.readouterr().err
    assert (out / "classes.txt").read_text() == "background\nmy own\n"


# -- mosaic4: no silent repeats ------------------------------------------------------------------
def _fss(root: Path, per_class: dict[str, int]) -> Path:
    for c, (folder, count) in enumerate(per_class.items()):
        for k in range(1, count + 1):
            _image(root / folder / f"{k}.jpg", (16, 16), 10 * c + k)
            mask = np.zeros((16, 16), dtype=np.uint8)
            mask[4:12, 4:12] = 255
            Image.fromarray(mask).save(root / folder / f"{k}.png")
    return root


def test_distinct_mosaics_counts_tile_orders_images_and_query_tiles(tmp_path):
    four = scan_fss(_fss(tmp_path / "four", dict.fromkeys("abcd", 1)))
    assert distinct_mosaics(four, MosaicOptions(num=1)) == 96  # 4! tile orders x 4 query tiles
    assert distinct_mosaics(four, MosaicOptions(num=1, query_tile=2)) == 24
    # 5 classes of 1, 1, 1, 1, 2 images: sets of four classes with their images, ordered, x 4 queries.
    five = scan_fss(_fss(tmp_path / "five", {"a": 1, "b": 1, "c": 1, "d": 1, "e": 2}))
    assert distinct_mosaics(five, MosaicOptions(num=1)) == (1 + 4 * 2) * 24 * 4


def _distinct_rows(out: Path) -> int:
    from fusioner.data.mosaic import load_mosaic4

    data = load_mosaic4(out)
    return len({(tuple(r["sources"]), r["query"]) for r in data.select_columns(["sources", "query"])})


def test_generate_refuses_repeats_unless_asked(tmp_path, capsys):
    root = _fss(tmp_path / "fss", dict.fromkeys("abcd", 1))
    out = tmp_path / "mosaic4"
    argv = ["generate", "--fss-root", str(root), "--out", str(out), "--tile-size", "8"]
    assert mosaic4_main([*argv, "--num", "3000"]) == 2
    assert capsys.readouterr().err == (
        f"mosaic4: error: --num 3000 asks for more mosaics than the 4 classes under {root} make: "
        "they allow 96 distinct mosaics; ask for at most 96, add classes or images, or pass --allow-repeats\n"
    )
    # Fewer than the possible ones can still repeat by chance: refused too, with the count drawn.
    assert mosaic4_main([*argv, "--num", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mosaic4: error: --num 20 with --seed 0 draws ") and "(96 possible)" in err
    assert not out.exists()

    assert mosaic4_main([*argv, "--num", "150", "--allow-repeats"]) == 0
    distinct = _distinct_rows(out)
    assert distinct < 96
    assert capsys.readouterr().out == (
        f"wrote 150 mosaics of 4 classes to {out}; {distinct} distinct, "
        f"the other {150 - distinct} repeat one of them\n"
    )


def test_generate_within_the_distinct_mosaics_says_nothing_more(tmp_path, capsys):
    root = _fss(tmp_path / "fss", dict.fromkeys("abcdef", 2))
    out = tmp_path / "mosaic4"
    argv = ["generate", "--fss-root", str(root), "--out", str(out), "--tile-size", "8", "--num", "6"]
    assert mosaic4_main(argv) == 0
    assert capsys.readouterr().out == f"wrote 6 mosaics of 6 classes to {out}\n"
    assert _distinct_rows(out) == 6
