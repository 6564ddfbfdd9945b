"""Open-vocabulary benchmark readers and their converters, on tiny fixtures in the official formats.

Each ``write_*`` helper writes what the dataset's authors publish (ADE's index pickle and
``*_seg.png``, Pascal Context's ``trainval_merged.json`` and ``.mat`` files, COCO-Stuff's
stuffthingmaps, Cityscapes' labelIds, SBD's ``cls/*.mat``); the converters of
``fusioner.data.ov.prepare`` turn them into the layouts the readers read. ``make_ov_root`` builds
all eight datasets under one ``data_root`` for the suite tests.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import box, make_coco, rle

from fusioner.config import load_config
from fusioner.data import BUILDERS, build_split
from fusioner.data.ov import OV_DATASETS, read_names
from fusioner.data.ov.cityscapes import TRAIN_IDS
from fusioner.data.ov.cocostuff import COCOSTUFF_IDS
from fusioner.data.ov.context import PC59_IDS
from fusioner.data.ov.prepare import (
    prepare_ade150,
    prepare_ade847,
    prepare_coco20i,
    prepare_cocostuff,
    prepare_pascal_context,
    prepare_sbd,
    read_ade_index,
)
from fusioner.data.pascal5i import PascalVOC
from fusioner.data.splits import COCO_CLASSES, VOC_CLASSES
from fusioner.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOC = SHARED / "voc2012-samples" / "VOC2012"
needs_voc = pytest.mark.skipif(not VOC.is_dir(), reason=f"VOC samples not found at {VOC}")
H, W = 24, 32


def jpg(path: Path, seed: int, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def png(path: Path, array: np.ndarray, format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format)


def quadrants(values: list[int], dtype=np.uint8) -> np.ndarray:
    """``H x W`` label map: the four quadrants hold ``values`` (top-left, top-right, bottom-left, ...)."""
    out = np.empty((H, W), dtype=dtype)
    out[: H // 2, : W // 2], out[: H // 2, W // 2 :] = values[0], values[1]
    out[H // 2 :, : W // 2], out[H // 2 :, W // 2 :] = values[2], values[3]
    return out


# -- official-format writers -----------------------------------------------------------------------
def write_ade150(parent: Path) -> Path:
    """ADEChallengeData2016 with the official annotations (0 = other, 1..150)."""
    root = parent / "ADEChallengeData2016"
    for i, values in enumerate([[0, 1, 150, 13], [2, 2, 3, 0]]):
        jpg(root / "images" / "validation" / f"ADE_val_{i:08d}.jpg", i)
        png(root / "annotations" / "validation" / f"ADE_val_{i:08d}.png", quadrants(values))
    return root


ADE_EXTRA = ["person, individual, someone", "zebra crossing"]  # object names outside the 847


def ade_objectnames() -> list[str]:
    """A stand-in for the index's ``objectnames``: the 847 names in another order, plus others."""
    names = list(read_names("ade847"))
    return ADE_EXTRA[:1] + names[::-1] + ADE_EXTRA[1:]


def seg_png(classes: np.ndarray) -> np.ndarray:
    """ADE ``*_seg.png`` pixels for 1-based object classes: R = class // 256 * 10, G = class % 256."""
    seg = np.zeros((*classes.shape, 3), dtype=np.uint8)
    seg[..., 0] = (classes // 256) * 10
    seg[..., 1] = classes % 256
    seg[..., 2] = 7  # instance ids live in B; the class ignores them
    return seg


def write_ade847(parent: Path) -> Path:
    """ADE20K_2021_17_01: index_ade20k.pkl (numpy arrays inside), images/ADE/<split>/<scene>/*_seg.png."""
    root = parent / "ADE20K_2021_17_01"
    objectnames = ade_objectnames()
    cls = {name: i + 1 for i, name in enumerate(objectnames)}  # 1-based, as in *_seg.png
    files, folders = [], []
    layouts = {
        "ADE_val_00000001": [cls["wall"], cls["pier"], cls[ADE_EXTRA[0]], 0],
        "ADE_val_00000002": [
            cls["adding machine, totalizer, totaliser"],
            cls["sky"],
            cls["wall"],
            cls["sky"],
        ],
        "ADE_train_00000001": [cls["wall"]] * 4,
    }
    for stem, values in layouts.items():
        split = "validation" if "_val_" in stem else "training"
        folder = f"ADE20K_2021_17_01/images/ADE/{split}/cultural/church"
        jpg(parent / folder / f"{stem}.jpg", len(files))
        png(parent / folder / f"{stem}_seg.png", seg_png(quadrants(values, np.int64)))
        files.append(f"{stem}.jpg")
        folders.append(folder)
    index = {
        "filename": files,
        "folder": folders,
        "objectnames": objectnames,
        "objectPresence": np.zeros((len(objectnames), len(files)), dtype=np.uint8),
    }
    (root / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    return root


PC_IDS = ["2010_000001", "2010_000002"]


def write_pascal_context(parent: Path) -> Path:
    """VOC2010 + trainval_merged.json (RLE segments, labels.txt ids) + trainval/<id>.mat + the val list."""
    from scipy.io import savemat

    root = parent / "VOCdevkit" / "VOC2010"
    images, segments = [], []
    for i, stem in enumerate(PC_IDS):
        jpg(root / "JPEGImages" / f"{stem}.jpg", 10 + i)
        images.append({"image_id": i, "file_name": f"{stem}.jpg", "height": H, "width": W, "phase": "val"})
    jpg(root / "JPEGImages" / "2010_000099.jpg", 99)
    images.append({"image_id": 99, "file_name": "2010_000099.jpg", "height": H, "width": W, "phase": "train"})
    # image 0: aeroplane (id 2) top-left, accordion (id 1, not one of the 59) top-right, wood (458) bottom.
    for image_id, cat, mask in [
        (0, 2, box(H, W, 0, H // 2, 0, W // 2)),
        (0, 1, box(H, W, 0, H // 2, W // 2, W)),
        (0, 458, box(H, W, H // 2, H, 0, W)),
        (1, 397, box(H, W, 0, H, 0, W)),  # table: "dining table" in the 59
        (99, 2, box(H, W, 0, H, 0, W)),
    ]:
        segments.append({"image_id": image_id, "category_id": cat, "segmentation": rle(mask)})
    (root / "trainval_merged.json").write_text(json.dumps({"images": images, "annos_segmentation": segments}))
    for i, stem in enumerate(PC_IDS):
        label_map = quadrants([1, 459, 2, 397] if i == 0 else [300, 300, 300, 300], np.uint16)
        (root / "trainval").mkdir(parents=True, exist_ok=True)
        savemat(root / "trainval" / f"{stem}.mat", {"LabelMap": label_map})
    (root / "pascalcontext_val.txt").write_text("\n".join(PC_IDS) + "\n")
    return root


def write_cocostuff(parent: Path) -> Path:
    """coco/val2017 + the official stuffthingmaps (COCO id - 1, 255 = unlabeled)."""
    root = parent / "coco"
    for i, values in enumerate([[0, 91, 11, 255], [181, 0, 0, 0]]):
        jpg(root / "val2017" / f"{i:012d}.jpg", 20 + i)
        png(root / "stuffthingmaps" / "val2017" / f"{i:012d}.png", quadrants(values))
    return root


def write_cityscapes(parent: Path) -> Path:
    root = parent / "cityscapes"
    for i, (city, values) in enumerate([("frankfurt", [7, 33, 6, 0]), ("lindau", [26, 26, 24, 11])]):
        stem = f"{city}_000000_0000{i}9"
        png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", quadrants(values))
        jpg(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", 30 + i)
    return root


def copy_voc(parent: Path, ids: list[str] | None = None) -> Path:
    """The real VOC samples in VOCdevkit/VOC2012 (a subset when ``ids`` is given)."""
    root = parent / "VOCdevkit" / "VOC2012"
    ids = ids or VOC.joinpath("ImageSets/Segmentation/val.txt").read_text().split()
    for sub, suffix in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for id in ids:
            shutil.copy(VOC / sub / f"{id}{suffix}", root / sub / f"{id}{suffix}")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def make_ov_root(parent: Path, voc_ids: list[str] | None = None) -> Path:
    """All eight OV datasets, written in the official formats and prepared, under ``parent``."""
    prepare_ade150(write_ade150(parent))
    prepare_ade847(write_ade847(parent))
    prepare_pascal_context(write_pascal_context(parent))
    prepare_cocostuff(write_cocostuff(parent))
    write_cityscapes(parent)
    copy_voc(parent, voc_ids)
    return parent


# -- name lists ------------------------------------------------------------------------------------
PUBLISHED_LENGTHS = {
    "ade847": 847, "pc459": 459, "ade150": 150, "pc59": 59, "voc20": 20, "voc21": 21, "cocostuff171": 171,
    "cityscapes": 19,
}  # fmt: skip


def test_every_dataset_has_its_published_number_of_names():
    assert set(OV_DATASETS) == set(PUBLISHED_LENGTHS)
    for name in OV_DATASETS:
        names = read_names(name)
        assert len(names) == PUBLISHED_LENGTHS[name] == len(set(names)), name
        assert all(n == n.strip() and n for n in names)
        assert name in BUILDERS  # a `dataset:` name too


def test_name_lists_agree_with_each_other():
    pc459, pc59 = read_names("pc459"), read_names("pc59")
    respelled = {"pottedplant": "potted plant", "table": "dining table", "tvmonitor": "tv monitor"}
    assert [respelled.get(pc459[i - 1], pc459[i - 1]) for i in PC59_IDS] == list(pc59)
    assert read_names("cocostuff171")[:80] == COCO_CLASSES and len(COCOSTUFF_IDS) == 171
    assert read_names("voc20") == VOC_CLASSES and read_names("voc21") == ("background", *VOC_CLASSES)
    ade150, ade847 = read_names("ade150"), read_names("ade847")
    assert ade150[:3] == ("wall", "building", "sky") and ade847[:2] == ("wall", "building, edifice")
    assert read_names("cityscapes")[TRAIN_IDS[26]] == "car"


def test_name_lists_are_package_data():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"fusioner.data.ov" = ["names/*.txt"]' in pyproject


# -- readers on prepared fixtures ------------------------------------------------------------------
def test_ade150_shifts_labels_and_ignores_other(tmp_path):
    root = write_ade150(tmp_path)
    assert prepare_ade150(root) == 2
    ds = OV_DATASETS["ade150"].open(root)
    sample = ds[0]
    assert sample["names"] == read_names("ade150") and sample["image"].shape == (3, H, W)
    # official 0 (other) -> ignore; 1 (wall) -> label 1; 150 (flag) -> label 150; 13 (person) -> 13
    assert sample["mask"][0, 0] == 255 and sample["mask"][0, -1] == 1 and sample["mask"][-1, 0] == 150
    assert sample["names"][sample["mask"][-1, -1] - 1] == "person"


def test_ade847_from_the_full_index(tmp_path):
    root = write_ade847(tmp_path)
    assert prepare_ade847(root) == 2  # the training image is not converted
    tif = root / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif"
    with Image.open(tif) as im:
        assert im.mode.startswith("I;16")  # 16-bit: 847 labels do not fit a byte
    ds = OV_DATASETS["ade847"].open(root)
    assert ds.ignore_index == -1 and len(ds) == 2
    names = read_names("ade847")
    mask = ds[0]["mask"]
    assert names[mask[0, 0] - 1] == "wall"
    # "pier" is the 256th name: label 256, which an 8-bit mask could not hold apart from ignore
    assert mask[0, -1] == 256 and names[255] == "pier"
    assert mask[-1, 0] == -1 and mask[-1, -1] == -1  # an ADE object outside the 847, and unlabeled
    assert names[ds[1]["mask"][0, 0] - 1] == "adding machine, totalizer, totaliser"


def test_ade847_caps_the_short_side(tmp_path):
    root = write_ade847(tmp_path)
    prepare_ade847(root, max_short_side=16)
    sample = OV_DATASETS["ade847"].open(root)[0]
    assert sample["image"].shape == (3, 16, 21) and sample["mask"].shape == (16, 21)


def test_ade_index_is_read_without_running_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "index_ade20k.pkl"
    path.write_bytes(pickle.dumps({"filename": [], "folder": [], "objectnames": [Evil()]}))
    with pytest.raises(DataError, match="builtins.print"):
        read_ade_index(path)
    index = {"filename": ["a.jpg"], "folder": ["f"], "objectnames": np.array(["wall"], dtype=object)}
    path.write_bytes(pickle.dumps(index))
    assert list(read_ade_index(path)["objectnames"]) == ["wall"]


def test_pascal_context_59_and_459(tmp_path):
    root = write_pascal_context(tmp_path)
    assert prepare_pascal_context(root) == {"pc59": 2, "pc459": 2}
    pc59 = OV_DATASETS["pc59"].open(root)
    assert [pc59.item_id(i) for i in range(len(pc59))] == PC_IDS  # the train-phase image is not there
    mask = pc59[0]["mask"]
    assert pc59.names[mask[0, 0] - 1] == "aeroplane" and mask[0, -1] == 255  # accordion: one of the other 400
    assert pc59.names[mask[-1, 0] - 1] == "wood"
    assert (pc59[1]["mask"] == pc59.names.index("dining table") + 1).all()
    pc459 = OV_DATASETS["pc459"].open(root)
    assert pc459.ignore_index == -1
    mask = pc459[0]["mask"]
    assert pc459.names[mask[0, 0] - 1] == "accordion" and pc459.names[mask[0, -1] - 1] == "wool"
    assert mask[-1, -1] == 397 and pc459.names[396] == "table"
    assert (pc459[1]["mask"] == 300).all()


def test_cocostuff_maps_ids_to_171_labels(tmp_path):
    root = write_cocostuff(tmp_path)
    assert prepare_cocostuff(root) == 2
    ds = OV_DATASETS["cocostuff171"].open(root)
    mask = ds[0]["mask"]
    # COCO id 1 (person) -> 1; id 92 (banner) -> 81; id 12 (unused) -> ignore; 255 -> ignore
    assert (
        mask[0, 0] == 1
        and ds.names[mask[0, -1] - 1] == "banner"
        and mask[-1, 0] == 255
        and mask[-1, -1] == 255
    )
    assert ds.names[ds[1]["mask"][0, 0] - 1] == "wood" and ds[1]["mask"][0, 0] == 171


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    ds = OV_DATASETS["cityscapes"].open(write_cityscapes(tmp_path))
    assert len(ds) == 2 and ds.item_id(0).startswith("frankfurt")
    mask = ds[0]["mask"]
    assert ds.names[mask[0, 0] - 1] == "road" and ds.names[mask[0, -1] - 1] == "bicycle"
    assert mask[-1, 0] == 255 and mask[-1, -1] == 255  # "ground" is not evaluated; 0 is unlabeled
    assert {ds.names[v - 1] for v in ds[1]["mask"].unique().tolist()} == {"car", "person", "building"}


@needs_voc
def test_voc20_and_voc21_on_the_real_samples(tmp_path):
    root = copy_voc(tmp_path)
    voc20, voc21 = OV_DATASETS["voc20"].open(root), OV_DATASETS["voc21"].open(root)
    assert len(voc20) == len(voc21) == 14
    for i in range(len(voc20)):
        raw = np.array(Image.open(root / "SegmentationClass" / f"{voc20.item_id(i)}.png"))
        raw = torch.from_numpy(raw).long()
        m20, m21 = voc20[i]["mask"], voc21[i]["mask"]
        assert torch.equal(m20, torch.where(raw == 0, 255, raw))  # background ignored
        assert torch.equal(m21, torch.where(raw == 255, 255, raw + 1))  # background is names[0]
        assert (raw == 0).any() and (raw == 255).any()
    assert voc21.names[0] == "background" and voc20.names == VOC_CLASSES


def test_dataset_names_build_evaluation_only_splits(tmp_path):
    root = write_cityscapes(tmp_path)
    split = build_split(load_config(None, dataset="cityscapes", data_path=str(root)))
    assert split.seen == [] and split.unseen == list(read_names("cityscapes")) and len(split.val) == 2
    with pytest.raises(ConfigError, match="evaluation set"):
        len(split.train)


def test_readers_name_the_missing_file(tmp_path):
    root = write_ade150(tmp_path)
    prepare_ade150(root)
    (root / "images" / "validation" / "ADE_val_00000001.jpg").unlink()
    with pytest.raises(DataError, match="ADE_val_00000001.jpg"):
        OV_DATASETS["ade150"].open(root)
    with pytest.raises(DataError, match="label folder .* does not exist"):
        OV_DATASETS["pc59"].open(tmp_path / "nowhere")
    with pytest.raises(DataError, match="annotations/validation"):
        prepare_ade150(tmp_path / "nowhere")


# -- PASCAL-5i / COCO-20i converters ---------------------------------------------------------------
def test_sbd_masks_become_segmentation_class_aug(tmp_path):
    from scipy.io import savemat

    voc = tmp_path / "VOC2012"
    for id in ("2008_000001", "2008_000002", "2008_000003"):
        jpg(voc / "JPEGImages" / f"{id}.jpg", 1)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2008_000003\n")
    png(voc / "SegmentationClass" / "2008_000002.png", quadrants([0, 15, 255, 15]))
    png(voc / "SegmentationClass" / "2008_000003.png", quadrants([0, 7, 7, 7]))
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for id, values in (("2008_000001", [0, 12, 12, 3]), ("2008_000002", [0, 0, 0, 0])):
        gt = {
            "Segmentation": quadrants(values),
            "Boundaries": np.zeros(1),
            "CategoriesPresent": np.array([12]),
        }
        savemat(sbd / "cls" / f"{id}.mat", {"GTcls": gt})
    assert prepare_sbd(sbd, voc) == 3
    aug = voc / "SegmentationClassAug"
    assert np.array_equal(np.asarray(Image.open(aug / "2008_000001.png")), quadrants([0, 12, 12, 3]))
    assert np.array_equal(
        np.asarray(Image.open(aug / "2008_000002.png")), quadrants([0, 15, 255, 15])
    )  # VOC's
    train = PascalVOC(voc, "train")
    assert train.ids == ["2008_000001", "2008_000002"]  # train_aug = every Aug mask not in val.txt
    assert train[0]["mask"][0, -1] == 12


def test_coco20i_masks_are_rendered_ahead(tmp_path):
    root = make_coco(tmp_path, "val", {"COCO_val2014_000000000001": [(1, box(12, 16, 0, 6, 0, 8), 0)]})
    assert prepare_coco20i(root, "val") == 1
    path = root / "fusioner_masks" / "val2014" / "COCO_val2014_000000000001.png"
    assert np.asarray(Image.open(path))[0, 0] == 1


def run_script(name: str, argv: list[str]) -> int:
    """``scripts/<name>.py``'s ``main(argv)``: the thin command over the function tested above."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize(
    "name",
    ["prepare_ade150", "prepare_ade847", "prepare_pascal_context", "prepare_cocostuff", "prepare_coco20i"],
)
def test_prepare_scripts_report_bad_input_in_one_line(name, tmp_path, capsys):
    assert run_script(name, [str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{name}: error: ") and len(err.splitlines()) == 1 and "nowhere" in err


def test_prepare_script_writes_the_layout(tmp_path, capsys):
    root = write_cocostuff(tmp_path)
    assert run_script("prepare_cocostuff", [str(root)]) == 0
    assert "wrote 2 label maps" in capsys.readouterr().out
    assert len(OV_DATASETS["cocostuff171"].open(root)) == 2
