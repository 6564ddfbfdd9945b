"""The one inference path: any image size, both attention rules, GZSS calibration, eval splits."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from fusioner.config import load_config
from fusioner.engine.evaluate import EvalSettings, choose_seen_bias, evaluate
from fusioner.errors import FusionerError
from fusioner.inference import labels_from_logits
from fusioner.model import FusionerModel, FusionHead, HeadConfig


def _model(voc_folder, tmp_path, **kw) -> FusionerModel:
    torch.manual_seed(0)
    config = load_config(
        None,
        dataset="folder",
        data_path=str(voc_folder),
        unseen_classes=["cow", "sheep"],
        preset="tiny",
        image_size=64,
        out_dir=str(tmp_path / "run"),
        **kw,
    )
    return FusionerModel.from_config(config).eval()


@pytest.mark.parametrize("attention", ["decoupled", "joint"])
def test_k_names_in_one_batch_give_the_numbers_of_k_one_name_passes(attention):
    torch.manual_seed(0)
    head = FusionHead(
        HeadConfig(vision_dim=24, text_dim=20, dim=32, depth=2, heads=4, fusion_attention=attention)
    ).eval()
    tokens, text = torch.randn(2, 12, 24), torch.randn(2, 5, 20)
    with torch.no_grad():
        together = head(tokens, (3, 4), text, (24, 32))
        alone = torch.cat([head(tokens, (3, 4), text[:, [j]], (24, 32)) for j in range(5)], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_joint_attention_conditions_patches_on_the_name():
    """Joint: patches read the name, so the pixel embeddings differ per name; decoupled: they do not."""
    torch.manual_seed(0)
    tokens, text = torch.randn(1, 9, 24), torch.randn(1, 3, 20)
    for attention, differ in (("joint", True), ("decoupled", False)):
        head = FusionHead(HeadConfig(24, 20, dim=32, depth=1, heads=4, fusion_attention=attention)).eval()
        visual, _ = head.fusion(tokens, text)
        assert visual.shape[1] == (3 if attention == "joint" else 1)
        if differ:
            assert not torch.allclose(visual[:, 0], visual[:, 1])


@pytest.mark.parametrize("size", [(375, 500), (1, 1), (64, 64)])
def test_predict_takes_any_image_size(voc_folder, tmp_path, size):
    model = _model(voc_folder, tmp_path)
    names = ["cat", "dog", "grass"]
    image = torch.rand(3, *size)
    labels = model.predict(image, names)
    assert labels.shape == size and labels.dtype == torch.long
    assert 0 <= labels.min() and labels.max() <= len(names)
    batch = model.predict(image[None].expand(2, -1, -1, -1), names)
    assert batch.shape == (2, *size)
    # A batch may run other conv kernels than one image (float sums in another order), so compare
    # the logits to float tolerance; a pixel whose two best names tie within it may flip its label.
    torch.testing.assert_close(
        model.logits(image[None].expand(2, -1, -1, -1), names)[0],
        model.logits(image, names),
        atol=1e-4,
        rtol=1e-4,
    )
    assert (batch[0] == labels).float().mean() > 0.999
    mixed = model.predict([image, torch.rand(3, 40, 30)], names)
    assert [tuple(m.shape) for m in mixed] == [size, (40, 30)]
    sliding = model.logits(image, names, mode="sliding")
    assert sliding.shape == (3, *size) and torch.isfinite(sliding).all()


def test_predict_refuses_a_wrong_shape(voc_folder, tmp_path):
    with pytest.raises(FusionerError, match="'b 3 h w' or '3 h w'"):
        _model(voc_folder, tmp_path).predict(torch.rand(64, 64), ["cat"])


def test_predict_refuses_pixels_outside_0_1(voc_folder, tmp_path):
    model = _model(voc_folder, tmp_path)
    with pytest.raises(FusionerError, match=r"image 0: values run from 0 to 255; expected \[0, 1\]"):
        model.predict(torch.tensor([0.0, 255.0, 9.0])[:, None, None].expand(3, 32, 32), ["cat"])
    with pytest.raises(FusionerError, match=r"image 1: expected a float tensor in \[0, 1\], got torch.uint8"):
        model.predict([torch.rand(3, 32, 32), torch.zeros(3, 32, 32, dtype=torch.uint8)], ["cat"])


def test_batched_logits_equal_one_image_at_a_time(voc_folder, tmp_path):
    model = _model(voc_folder, tmp_path)
    images = [torch.rand(3, 50, 70), torch.rand(3, 90, 40)]
    with torch.no_grad():
        together = model.logits(images, ["cat", "dog"])
        alone = [model.logits(im, ["cat", "dog"]) for im in images]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_seen_bias_zero_is_the_plain_rule_and_a_large_one_leaves_only_unseen_names():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, 7) * 5
    seen = torch.tensor([True, True, True, True, False, False])
    plain = labels_from_logits(logits, 0.5)
    assert torch.equal(labels_from_logits(logits, 0.5, seen_bias=0.0, seen=seen), plain)
    biased = labels_from_logits(logits, 0.5, seen_bias=1e4, seen=seen)
    foreground = logits[:, 4:].max(1).values >= 0
    assert torch.equal(biased > 0, foreground)  # only unseen names can still pass the threshold
    assert set(biased[biased > 0].unique().tolist()) <= {5, 6}
    with pytest.raises(ValueError, match="seen flags"):
        labels_from_logits(logits, 0.5, seen_bias=1.0)


def test_calibrated_gzss_at_zero_equals_gzss_and_the_bias_curve_matches_evaluate(voc_folder, tmp_path):
    from fusioner.data import build_split

    model = _model(voc_folder, tmp_path)
    split = build_split(
        load_config(None, dataset="folder", data_path=str(voc_folder), unseen_classes=["cow", "sheep"])
    )
    # A high threshold: the untrained head then predicts both background and names.
    settings = EvalSettings(64, threshold=0.97)
    kw = dict(seen=split.seen, unseen=split.unseen, settings=settings, progress=False)
    at_zero = evaluate(model, split.val, seen_bias=0.0, **kw)
    plain = {k: v for k, v in at_zero["gzss_calibrated"].items() if k != "seen_bias"}
    assert json.dumps(plain, sort_keys=True) == json.dumps(at_zero["gzss"], sort_keys=True)
    assert 0 < at_zero["gzss"]["per_class"]["background"] < 1
    assert set(at_zero["one_way_seen"]["per_class"]) == set(split.seen)

    best, curve = choose_seen_bias(model, split.val, **kw)
    assert best in curve and len(curve) > 10
    assert json.dumps(curve[0.0], sort_keys=True) == json.dumps(at_zero["gzss"], sort_keys=True)
    some = sorted(curve)[len(curve) // 4]
    slow = evaluate(model, split.val, seen_bias=some, **kw)["gzss_calibrated"]
    assert json.dumps(curve[some], sort_keys=True) == json.dumps(
        {k: v for k, v in slow.items() if k != "seen_bias"}, sort_keys=True
    )
    assert curve[some] != curve[0.0]  # the bias changed some pixels

    huge = evaluate(model, split.val, seen_bias=1e4, **kw)["gzss_calibrated"]["per_class"]
    assert all(math.isnan(huge[n]) or huge[n] == 0 for n in split.seen)


def test_eval_split_test_reads_the_test_list_and_a_folder_without_one_is_refused(voc_folder, tmp_path):
    from fusioner.data import build_split

    root = tmp_path / "with_test"
    shutil.copytree(voc_folder, root)
    val = (root / "splits" / "val.txt").read_text().split()
    (root / "splits" / "test.txt").write_text("\n".join(val[:2]) + "\n")
    base = dict(dataset="folder", data_path=str(root), unseen_classes=["cow", "sheep"])
    split = build_split(load_config(None, eval_split="test", **base))
    assert [split.test.item_id(i) for i in range(len(split.test))] == val[:2]
    assert split.evaluation_set("test") is split.test
    assert build_split(load_config(None, **base)).test is None  # not opened unless asked for

    (root / "splits" / "test.txt").unlink()
    with pytest.raises(FusionerError, match=r"splits/test\.txt does not exist"):
        build_split(load_config(None, eval_split="test", **base))
    with pytest.raises(FusionerError, match="eval_split"):
        load_config(None, eval_split="train", **base)


def test_a_dataset_without_a_test_split_says_so(voc_folder):
    from fusioner.data import build_split

    split = build_split(
        load_config(None, dataset="folder", data_path=str(voc_folder), unseen_classes=["cow"])
    )
    split.name = "pascal5i"
    with pytest.raises(FusionerError, match="pascal5i has no test split apart from val"):
        split.evaluation_set("test")


def test_a_split_without_unseen_names_reports_1_way_as_undefined_with_a_warning(voc_folder, tmp_path, caplog):
    from fusioner.data import build_split

    model = _model(voc_folder, tmp_path)
    split = build_split(
        load_config(None, dataset="folder", data_path=str(voc_folder), unseen_classes=["cow", "sheep"])
    )
    settings = EvalSettings(64)
    with caplog.at_level("WARNING", logger="fusioner.engine.evaluate"):
        # The cow and sheep images are all in val: train holds no unseen name.
        metrics = evaluate(
            model, split.train, seen=split.seen, unseen=split.unseen, settings=settings, progress=False
        )
    assert math.isnan(metrics["one_way"]["miou"]) and math.isnan(metrics["one_way"]["per_class"]["cow"])
    assert "no image of this split holds an unseen name (cow, sheep)" in caplog.text


# -- the Python API takes what users have (issue 22 item 2) ------------------------------------------
def _photo(voc_folder):
    from PIL import Image

    path = sorted((voc_folder / "images").glob("*.jpg"))[0]
    with Image.open(path) as im:
        return path, im.convert("RGB")


def test_predict_takes_pil_images_arrays_paths_tensors_and_lists_and_names_as_one_string(
    voc_folder, tmp_path
):
    import numpy as np

    model = _model(voc_folder, tmp_path)
    path, pil = _photo(voc_folder)
    array = np.asarray(pil)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    expected = model.predict(tensor, ["cat", "dog"])
    assert expected.shape == (pil.height, pil.width)
    for given in (pil, array, path, str(path)):
        torch.testing.assert_close(model.predict(given, "cat, dog"), expected, rtol=0, atol=0)
    listed = model.predict([pil, array[:40, :30]], ("cat", "dog"))
    assert isinstance(listed, list) and [tuple(x.shape) for x in listed] == [tuple(expected.shape), (40, 30)]
    torch.testing.assert_close(listed[0], expected, rtol=0, atol=0)
    assert model.predict(np.stack([array, array]), "cat,dog").shape == (2, *expected.shape)


@pytest.mark.parametrize(
    ("images", "names", "kwargs", "message"),
    [
        (object(), "cat", {}, "expected a PIL image, an 'h w 3' uint8 array, a file path or a float tensor"),
        ("no/such/photo.jpg", "cat", {}, "image file no/such/photo.jpg does not exist"),
        (None, " , ", {}, "names is empty"),
        (None, "cat, cat", {}, "duplicate names: cat"),
        (None, 123, {}, "expected a list of names or one comma-separated string, got int"),
        (None, "cat", {"threshold": "abc"}, "threshold must be a number, got 'abc'"),
        (None, "cat", {"threshold": 1.5}, "threshold must be between 0 and 1"),
        (None, "cat", {"seen_bias": float("nan"), "seen": ["cat"]}, "seen_bias must be a finite number"),
        (None, "cat", {"seen_bias": 1.0}, "seen_bias needs the names seen in training"),
        (None, "cat", {"mode": "best"}, "mode must be one of best-name, one-name"),
    ],
)
def test_predict_refuses_bad_arguments_with_one_line(voc_folder, tmp_path, images, names, kwargs, message):
    model = _model(voc_folder, tmp_path)
    images = torch.rand(3, 20, 20) if images is None else images
    with pytest.raises(FusionerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.predict(images, names, **kwargs)


def test_predict_threshold_mode_and_seen_bias_are_arguments(voc_folder, tmp_path):
    model = _model(voc_folder, tmp_path)
    image = torch.rand(3, 48, 64)
    names = ["cat", "dog", "grass"]
    logits = model.logits(image, names)
    probability = logits.sigmoid()
    for threshold in (0.2, 0.5, 0.8):
        labels = model.predict(image, "cat, dog, grass", threshold=threshold)
        assert torch.equal(labels > 0, probability.max(0).values >= threshold)
        masks = model.predict(image, names, threshold=threshold, mode="one-name")
        assert masks.dtype == torch.bool and torch.equal(masks, probability >= threshold)
    # seen_bias: subtracted from the seen names' logits before the decision
    biased = model.predict(image, names, threshold=0.5, seen_bias=100.0, seen=["cat", "dog"])
    assert set(biased.unique().tolist()) <= {0, 3}
    assert torch.equal(biased == 3, probability[2] >= 0.5)
    # the pre-existing spelling mode="sliding" still means the inference mode
    assert torch.equal(
        model.predict(image, names, mode="sliding"), model.predict(image, names, inference="sliding")
    )


# -- one image reader (issue 21 items 9, 10) ---------------------------------------------------------
def _png16(path, values):
    """A 16-bit RGB PNG written by hand (Pillow writes no 48-bit PNG)."""
    import struct
    import zlib

    import numpy as np

    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    assert np.asarray is not None


def test_16_bit_pngs_are_scaled_by_their_depth_not_clipped_to_white(tmp_path):
    import numpy as np
    from PIL import Image

    from fusioner.data.base import read_image

    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    grey = read_image(tmp_path / "grey16.png")
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535)
    torch.testing.assert_close(grey[0], expected, atol=1 / 255, rtol=0)  # 8-bit steps
    assert (grey >= 0.999).float().mean() < 0.01  # not white
    colour = np.stack([ramp, 65535 - ramp, ramp // 2], axis=-1)
    _png16(tmp_path / "rgb16.png", colour)
    rgb = read_image(tmp_path / "rgb16.png")
    torch.testing.assert_close(
        rgb, torch.from_numpy(colour.astype(np.float32) / 65535).permute(2, 0, 1), atol=1 / 255, rtol=0
    )


def test_exif_orientation_is_applied_by_predict_and_training_data(voc_folder, tmp_path):
    import numpy as np
    from PIL import Image

    from fusioner.data.base import read_image

    pixels = (np.arange(30 * 20 * 3) % 251).reshape(30, 20, 3).astype(np.uint8)  # 30 high, 20 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": viewers show it 20 high, 30 wide
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=100)
    with Image.open(tmp_path / "phone.jpg") as im:
        upright = np.asarray(ImageOps_exif(im))
    assert upright.shape == (20, 30, 3)
    image = read_image(tmp_path / "phone.jpg")
    assert tuple(image.shape) == (3, 20, 30)
    model = _model(voc_folder, tmp_path)
    assert model.predict(tmp_path / "phone.jpg", "cat").shape == (20, 30)
    with Image.open(tmp_path / "phone.jpg") as im:
        assert model.predict(im, "cat").shape == (20, 30)


def ImageOps_exif(im):
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def test_a_rotated_phone_photo_trains_against_its_mask_upright(tmp_path):
    """Issue 21 item 10, training side: the mask is drawn on the photo as viewers show it (EXIF
    applied); the dataset must hand out the image that way too, pixel-aligned with the mask."""
    import numpy as np
    from PIL import Image

    from fusioner.data.folder import FolderDataset

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\ncat\n")
    stored = np.zeros((30, 20, 3), np.uint8)  # stored 30 high, 20 wide; shown 20 high, 30 wide
    stored[:, :5] = 255  # a white band on the stored left edge: the shown top edge (rotated 90 CW)
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("a", "b", "c", "d", "e"):
        Image.fromarray(stored).save(root / "images" / f"{name}.png", exif=exif.tobytes())
        mask = np.zeros((20, 30), np.uint8)
        mask[:5] = 1  # the cat is the white band, as the user sees it: on top
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    dataset = FolderDataset(root, "train")
    sample = dataset[0]
    assert tuple(sample["image"].shape) == (3, 20, 30)
    white = sample["image"].mean(0) > 0.5
    assert torch.equal(white, sample["mask"] == 1)
