"""Datasets, split rules and list readers, on the real VOC samples / HSNet lists and tiny made-up data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusioner.config import Config
from fusioner.data import BUILDERS, build_split, get_builder, register_dataset
from fusioner.data.coco20i import COCOInstances, coco20i_split
from fusioner.data.folder import FolderDataset
from fusioner.data.pascal5i import PascalVOC, fold_classes, pascal5i_split
from fusioner.data.splits import (
    COCO_CLASSES,
    VOC_CLASSES,
    check_fold,
    coco20i_labels,
    pascal5i_labels,
    read_coco_lists,
    read_pascal_list,
    seeded_val_names,
)
from fusioner.data.transforms import hflip, resize
from fusioner.errors import ConfigError, DataError, UnknownNameError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOC = SHARED / "voc2012-samples" / "VOC2012"
HSNET = SHARED / "hsnet-splits"
needs_voc = pytest.mark.skipif(not VOC.is_dir(), reason=f"VOC samples not found at {VOC}")
needs_hsnet = pytest.mark.skipif(not HSNET.is_dir(), reason=f"HSNet split lists not found at {HSNET}")


def voc_labels(name: str) -> set[int]:
    """Labels >= 1 in a fixture mask, read straight from the PNG (independent of the dataset code)."""
    array = np.asarray(Image.open(VOC / "SegmentationClass" / f"{name}.png"))
    return {int(v) for v in np.unique(array)} - {0, 255}


# ---------------------------------------------------------------------------------------------
# Fold rules and list files.


def test_fold_rules_partition_the_classes():
    pascal = [pascal5i_labels(f) for f in range(4)]
    coco = [coco20i_labels(f) for f in range(4)]
    assert pascal[1] == [6, 7, 8, 9, 10]
    assert coco[2][:3] == [3, 7, 11] and coco[2][-1] == 79
    assert sorted(sum(pascal, [])) == list(range(1, 21))
    assert sorted(sum(coco, [])) == list(range(1, 81))
    assert all(len(c) == 20 for c in coco)
    assert fold_classes(3) == ["potted plant", "sheep", "sofa", "train", "tv monitor"]
    with pytest.raises(ConfigError, match="fold"):
        check_fold(4)


@needs_hsnet
@pytest.mark.parametrize("fold,count", [(0, 346), (1, 451), (2, 725), (3, 346)])
def test_hsnet_pascal_lists(fold, count):
    val = read_pascal_list(HSNET / "pascal" / "val" / f"fold{fold}.txt")
    trn = read_pascal_list(HSNET / "pascal" / "trn" / f"fold{fold}.txt")
    assert len(val) == count
    assert {label for _, label in val} == set(pascal5i_labels(fold))
    # HSNet's trn/foldN holds fold N's own classes; training on fold i reads the other three.
    assert {label for _, label in trn} == set(pascal5i_labels(fold))
    assert all(name.startswith("20") and "__" not in name for name, _ in val)


@needs_hsnet
@pytest.mark.parametrize("fold", range(4))
def test_hsnet_coco_lists(fold):
    val = read_coco_lists(HSNET / "coco" / "val" / f"fold{fold}.json")
    trn = read_coco_lists(HSNET / "coco" / "trn" / f"fold{fold}.json")
    # The interleaved rule is exactly the set of classes HSNet evaluates in this fold ...
    assert {label for _, label in val} == set(coco20i_labels(fold))
    # ... and exactly the classes its training list does not use.
    assert {label for _, label in trn} == set(range(1, 81)) - set(coco20i_labels(fold))
    assert all(path.startswith("val2014/COCO_val2014_") for path, _ in val)
    assert all(path.startswith("train2014/") for path, _ in trn)


def test_list_readers_refuse_bad_lines(tmp_path):
    bad = tmp_path / "fold0.txt"
    bad.write_text("2007_000033__01\n2007_000061__27\n")
    with pytest.raises(DataError, match=r"fold0.txt, line 2"):
        read_pascal_list(bad)
    plain = tmp_path / "plain.txt"
    plain.write_text("a\n\nb\n")
    assert read_pascal_list(plain) == [("a", None), ("b", None)]
    bad_json = tmp_path / "fold0.json"
    bad_json.write_text(json.dumps({"80": ["val2014/x.jpg"]}))
    with pytest.raises(DataError, match="'80'"):
        read_coco_lists(bad_json)
    bad_json.write_text("{not json")
    with pytest.raises(DataError, match="fold0.json"):
        read_coco_lists(bad_json)
    with pytest.raises(DataError, match="does not exist"):
        read_coco_lists(tmp_path / "missing.json")


def test_seeded_val_names_is_fixed_and_stable():
    names = [f"img{i:03d}" for i in range(50)]
    val = seeded_val_names(names)
    assert len(val) == 10 and val == seeded_val_names(list(reversed(names)))
    # Adding images never moves an existing one into or out of val beyond the new quota.
    grown = seeded_val_names(names + ["extra1", "extra2", "extra3", "extra4", "extra5"])
    assert len(grown) == 11 and len(val - grown) <= 1
    assert seeded_val_names(["only"]) == set()


# ---------------------------------------------------------------------------------------------
# PASCAL VOC / PASCAL-5i.


@needs_voc
def test_voc_reader_on_real_samples():
    ds = PascalVOC(VOC, "val")
    assert len(ds) == 14 and ds.vocabulary == list(VOC_CLASSES)
    counts: dict[str, int] = {}
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].dtype == torch.float32 and s["image"].shape[0] == 3
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["mask"].dtype == torch.int64 and s["mask"].shape == s["image"].shape[1:]
        values = set(s["mask"].unique().tolist())
        assert values <= set(range(21)) | {255}
        assert s["names"] == VOC_CLASSES and s["id"] == ds.ids[i] == ds.item_id(i)
        for label in values - {0, 255}:
            counts[s["names"][label - 1]] = counts.get(s["names"][label - 1], 0) + 1
    assert counts == {
        "aeroplane": 4, "bicycle": 1, "bird": 2, "bottle": 1, "bus": 1, "car": 1, "cow": 1, "horse": 1,
        "motorbike": 1, "person": 2, "sheep": 2,
    }  # fmt: skip


@needs_voc
def test_voc_pairs_follow_the_masks():
    ds = PascalVOC(VOC, "val")
    pairs = ds.pairs(fold_classes(0))
    expected = [
        (i, VOC_CLASSES[label - 1])
        for i, name in enumerate(ds.ids)
        for label in sorted(voc_labels(name) & set(pascal5i_labels(0)))
    ]
    assert pairs == expected and len(pairs) == 8  # aeroplane x4, bird x2, bicycle, bottle
    with pytest.raises(ConfigError, match="vocabulary"):
        ds.pairs(["unicorn"])


def make_voc(tmp_path: Path, train: list[str], val: list[str], aug: list[str] = ()) -> Path:
    """A VOC2012 folder linking the fixture's images and masks, with our own image lists."""
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").symlink_to(VOC / "JPEGImages")
    (root / "SegmentationClass").symlink_to(VOC / "SegmentationClass")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val) + "\n")
    if aug:
        (root / "SegmentationClassAug").mkdir()
        for name in aug:  # SBD's masks are grayscale; mark them so a test can tell them apart
            array = np.asarray(Image.open(VOC / "SegmentationClass" / f"{name}.png")).copy()
            array[:4, :4] = 255
            Image.fromarray(array, mode="L").save(root / "SegmentationClassAug" / f"{name}.png")
    return root


def fixture_names() -> list[str]:
    return sorted(p.stem for p in (VOC / "JPEGImages").glob("*.jpg"))


@needs_voc
@pytest.mark.parametrize("drop", [False, True])
def test_pascal5i_split_rules(tmp_path, drop):
    names = fixture_names()
    root = make_voc(tmp_path, train=names[4:], val=names[:4])
    split = build_split(Config(dataset="pascal5i", data_path=str(root), fold=2, drop_unseen_images=drop))
    unseen = set(pascal5i_labels(2))  # dining table, dog, horse, motorbike, person
    assert split.unseen == ["dining table", "dog", "horse", "motorbike", "person"]
    assert split.seen == [n for n in VOC_CLASSES if n not in split.unseen]
    expected = [n for n in names[4:] if voc_labels(n) - unseen and not (drop and voc_labels(n) & unseen)]
    assert split.train.ids == expected
    assert "sample_0582" not in split.train.ids  # motorbike + person: nothing seen to learn from
    assert ("sample_0294" in split.train.ids) == (not drop)  # car + person
    assert split.val.ids == names[:4]  # evaluation keeps every image
    assert split.val.pairs(split.unseen) == [(2, "horse")]  # sample_0008
    assert split.train[0]["names"] == VOC_CLASSES  # the full label space stays


@needs_voc
def test_pascal_uses_sbd_masks_for_training(tmp_path):
    names = fixture_names()
    root = make_voc(tmp_path, train=[], val=names[:4], aug=names[:9])
    train, val = PascalVOC(root, "train"), PascalVOC(root, "val")
    assert train.ids == names[4:9]  # SegmentationClassAug minus val.txt
    assert train[0]["mask"][:4, :4].eq(255).all()
    assert train.mask_path(train.ids[0]).parent.name == "SegmentationClassAug"
    assert val.mask_path(val.ids[0]).parent.name == "SegmentationClass"


@needs_voc
def test_pascal_hsnet_lists_define_images_and_pairs(tmp_path):
    names = fixture_names()
    root = make_voc(tmp_path, train=names, val=names)
    lists = tmp_path / "splits" / "pascal"
    (lists / "val").mkdir(parents=True)
    (lists / "trn").mkdir(parents=True)
    (lists / "val" / "fold0.txt").write_text("sample_0120__05\nsample_0000__01\nsample_0120__02\n")
    trn = {0: "sample_0000__01\n", 1: "sample_0294__07\n", 2: "sample_0294__15\nsample_0008__13\n", 3: ""}
    for fold, text in trn.items():
        (lists / "trn" / f"fold{fold}.txt").write_text(text)
    split = pascal5i_split(root, 0, split_dir=tmp_path / "splits")
    assert split.val.ids == ["sample_0120", "sample_0000"]
    assert split.val.pairs(split.unseen) == [(0, "bottle"), (1, "aeroplane"), (0, "bicycle")]
    assert split.train.ids == ["sample_0294", "sample_0008"]  # folds 1-3's lists, not fold 0's
    # drop_unseen_images still applies: holding fold 2 out drops sample_0294 (car + person).
    (lists / "trn" / "fold0.txt").write_text("sample_0000__01\nsample_0294__01\n")
    (lists / "val" / "fold2.txt").write_text("sample_0008__13\n")
    assert pascal5i_split(root, 2, split_dir=lists).train.ids == ["sample_0000", "sample_0294"]
    assert pascal5i_split(root, 2, split_dir=lists, drop_unseen_images=True).train.ids == ["sample_0000"]


@needs_voc
def test_pascal_refuses_bad_input(tmp_path):
    root = make_voc(tmp_path, train=["sample_0000", "nope_123"], val=["sample_0001"])
    with pytest.raises(DataError, match="nope_123"):
        PascalVOC(root, "train")
    with pytest.raises(DataError, match="JPEGImages"):
        PascalVOC(tmp_path, "val")
    with pytest.raises(ConfigError, match="unseen_classes"):
        build_split(Config(dataset="pascal5i", data_path=str(root), unseen_classes=["cat"]))
    with pytest.raises(ConfigError, match="data_path"):
        build_split(Config(dataset="pascal5i"))
    with pytest.raises(DataError, match="split list trn/fold0.txt not found"):
        pascal5i_split(root, 1, split_dir=tmp_path)


def test_builder_registry():
    assert {"pascal5i", "coco20i", "folder"} <= set(BUILDERS)
    assert all(callable(get_builder(name)) for name in BUILDERS)
    with pytest.raises(UnknownNameError, match="known: pascal5i"):
        get_builder("imagenet")
    with pytest.raises(ValueError, match="'folder' is registered twice"):
        register_dataset("folder")(lambda config: None)
    with pytest.raises(TypeError):
        BUILDERS["mine"] = lambda config: None  # read-only: the decorator is the way in


# ---------------------------------------------------------------------------------------------
# COCO-20i on a tiny synthetic COCO.


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    out = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": out["size"], "counts": out["counts"].decode()}


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


# COCO ids skip numbers (12, 26, ...); labels follow id order, so id 18 (dog) is label 17.
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
PERSON, CAR, DOG, TRAIN = 1, 3, 18, 7  # COCO category ids; labels 1, 3, 17, 7


Annotation = tuple[int, np.ndarray | list, int]  # category id, mask or polygon, iscrowd


def make_coco(tmp_path: Path, split: str, images: dict[str, list[Annotation]]) -> Path:
    """COCO root with ``images``: file stem -> [(category id, mask or polygon, iscrowd)] on 12x16 images."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2014").mkdir(exist_ok=True)
    data = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in zip(COCO_IDS, COCO_CLASSES, strict=True)][::-1],
    }
    for image_id, (stem, anns) in enumerate(images.items(), 1):
        data["images"].append({"id": image_id, "file_name": f"{stem}.jpg", "height": 12, "width": 16})
        Image.new("RGB", (16, 12), (image_id * 40, 0, 0)).save(root / f"{split}2014" / f"{stem}.jpg")
        for cat, seg, crowd in anns:
            area = float(seg.sum()) if isinstance(seg, np.ndarray) else 16.0
            segmentation = rle(seg) if isinstance(seg, np.ndarray) else seg
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                "iscrowd": crowd, "area": area, "segmentation": segmentation,
            })  # fmt: skip
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return root


def test_coco_render_masks(tmp_path):
    images = {
        "COCO_val2014_000000000001": [
            (PERSON, box(12, 16, 0, 10, 0, 10), 0),  # large
            (CAR, box(12, 16, 2, 4, 2, 4), 0),  # small, on the person
            (DOG, box(12, 16, 0, 12, 12, 16), 1),  # crowd of dogs on the right
            (TRAIN, box(12, 16, 10, 12, 13, 15), 0),  # an instance inside the crowd
        ],
        "COCO_val2014_000000000002": [(CAR, [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]], 0)],  # polygon
        "COCO_val2014_000000000003": [(DOG, box(12, 16, 0, 5, 0, 5), 1)],  # crowd only
    }
    root = make_coco(tmp_path, "val", images)
    ds = COCOInstances(root, "val", mask_dir=tmp_path / "masks")
    assert ds.ids == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]  # no instance, no image
    s = ds[0]
    mask = s["mask"]
    assert s["names"] == COCO_CLASSES and s["image"].shape == (3, 12, 16) and mask.shape == (12, 16)
    assert mask[0, 0] == 1 and mask[3, 3] == 3  # the small car stays on top of the person
    assert mask[5, 13] == 255 and mask[11, 14] == 7  # crowd is ignore, an instance in it is not
    assert mask[11, 0] == 0 and mask[0, 11] == 0
    assert set(mask.unique().tolist()) == {0, 1, 3, 7, 255}
    polygon = ds[1]["mask"]
    assert polygon[5, 6] == 3 and polygon[0, 0] == 0 and polygon[11, 15] == 0
    assert ds.labels(0) == {1, 3, 7} and ds.pairs(["car", "dog"]) == [(0, "car"), (1, "car")]
    # The rendered masks are cached as PNG: a dataset from a list reads them without annotations.
    cached = tmp_path / "masks" / "val2014" / "COCO_val2014_000000000001.png"
    assert cached.is_file() and np.array_equal(np.asarray(Image.open(cached)), mask.numpy())
    (root / "annotations" / "instances_val2014.json").unlink()
    listing = tmp_path / "fold0.json"
    listing.write_text(json.dumps({"2": ["val2014/COCO_val2014_000000000001.jpg"]}))
    again = COCOInstances(root, "val", listing, mask_dir=tmp_path / "masks")
    assert torch.equal(again[0]["mask"], mask) and again.pairs(["car"]) == [(0, "car")]


def test_coco20i_split(tmp_path):
    # Fold 0 holds out labels 1, 5, 9, ...: person (1) and dog (17) are unseen, car (3) and train (7) seen.
    make_coco(tmp_path, "val", {
        "COCO_val2014_000000000001": [(PERSON, box(12, 16, 0, 6, 0, 6), 0)],
        "COCO_val2014_000000000002": [(CAR, box(12, 16, 0, 6, 0, 6), 0)],
    })  # fmt: skip
    top, bottom = box(12, 16, 0, 6, 0, 6), box(12, 16, 6, 9, 0, 6)
    root = make_coco(tmp_path, "train", {
        "COCO_train2014_000000000001": [(PERSON, top, 0)],  # unseen only
        "COCO_train2014_000000000002": [(PERSON, top, 0), (CAR, bottom, 0)],
        "COCO_train2014_000000000003": [(TRAIN, top, 0), (PERSON, bottom, 1)],  # a crowd of persons
    })  # fmt: skip
    split = coco20i_split(root, 0)
    assert "person" in split.unseen and len(split.unseen) == 20 and len(split.seen) == 60
    assert split.train.ids == ["COCO_train2014_000000000002", "COCO_train2014_000000000003"]
    assert split.val.pairs(split.unseen) == [(0, "person")]
    # A crowd of persons is ignore, never background, so it does not count as showing the class.
    dropped = coco20i_split(root, 0, drop_unseen_images=True)
    assert dropped.train.ids == ["COCO_train2014_000000000003"]
    assert (root / "fusioner_masks").is_dir() is False  # labels come from annotations, nothing rendered


def test_coco_refuses_bad_input(tmp_path):
    root = make_coco(tmp_path, "val", {"COCO_val2014_000000000001": [(CAR, box(12, 16, 0, 6, 0, 6), 0)]})
    data = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    data["categories"] = data["categories"][:10]
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="instances_val2014.json"):
        COCOInstances(root, "val")
    listing = tmp_path / "fold0.json"
    listing.write_text(json.dumps({"2": ["val2014/COCO_val2014_000000000001.jpg"]}))
    ds = COCOInstances(root, "val", listing)
    (root / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(DataError, match="instances_val2014.json does not exist"):
        ds[0]
    with pytest.raises(ConfigError, match="fold 0: person"):
        build_split(Config(dataset="coco20i", data_path=str(root), unseen_classes=["cat"]))


# ---------------------------------------------------------------------------------------------
# Folder dataset.


@pytest.fixture
def voc_folder(tmp_path) -> Path:
    """The 14 VOC samples as a user folder: classes.txt, images/, grayscale masks/."""
    if not VOC.is_dir():
        pytest.skip(f"VOC samples not found at {VOC}")
    root = tmp_path / "mydata"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(["background", *VOC_CLASSES]) + "\n")
    for name in fixture_names():
        (root / "images" / f"{name}.jpg").write_bytes((VOC / "JPEGImages" / f"{name}.jpg").read_bytes())
        array = np.asarray(Image.open(VOC / "SegmentationClass" / f"{name}.png"))
        Image.fromarray(array, mode="L").save(root / "masks" / f"{name}.png")
    return root


def test_folder_happy_path(voc_folder):
    names = fixture_names()
    split = build_split(Config(dataset="folder", data_path=str(voc_folder), unseen_classes=["sheep", "cow"]))
    assert split.unseen == ["cow", "sheep"] and len(split.seen) == 18  # vocabulary order
    raw_train = FolderDataset(voc_folder, "train").ids
    assert len(split.val) == 3 and len(raw_train) == 11  # round(20% of 14)
    assert sorted(raw_train + split.val.ids) == names
    # Images showing only held-out classes (here: sheep, cow) are not trained on, as in PASCAL-5i.
    only_unseen = [n for n in raw_train if voc_labels(n) <= {10, 17}]
    assert only_unseen and split.train.ids == [n for n in raw_train if n not in only_unseen]
    assert set(split.val.ids) == seeded_val_names(names)
    for ds in (split.train, split.val):
        s = ds[0]
        original = np.asarray(Image.open(VOC / "SegmentationClass" / f"{s['id']}.png"))
        assert np.array_equal(s["mask"].numpy(), original) and s["names"] == VOC_CLASSES
        assert s["image"].shape == (3, *original.shape)
    # An image showing a held-out class beside a seen one (person beside a car or a motorbike) is
    # trained on, its person pixels as background ...
    person = build_split(Config(dataset="folder", data_path=str(voc_folder), unseen_classes=["person"]))
    assert [n for n in person.train.ids if 15 in voc_labels(n)]
    config = Config(dataset="folder", data_path=str(voc_folder), unseen_classes=["person"])
    config.drop_unseen_images = True
    dropped = build_split(config)
    kept = [n for n in person.train.ids if 15 not in voc_labels(n)]
    assert dropped.train.ids == kept and len(kept) < len(person.train)  # ... unless dropped


def test_folder_split_lists(voc_folder):
    names = fixture_names()
    (voc_folder / "splits").mkdir()
    (voc_folder / "splits" / "train.txt").write_text("\n".join(names[:5]))
    (voc_folder / "splits" / "val.txt").write_text("\n".join(names[5:9]))
    (voc_folder / "splits" / "test.txt").write_text("\n".join(names[9:]))
    assert FolderDataset(voc_folder, "train").ids == names[:5]
    assert FolderDataset(voc_folder, "val").ids == names[5:9]
    assert FolderDataset(voc_folder, "test").ids == names[9:]
    (voc_folder / "splits" / "val.txt").write_text("sample_0000\nmissing_img\n")
    with pytest.raises(DataError, match=r"val.txt lists 1 names with no image: missing_img"):
        FolderDataset(voc_folder, "val")


def make_folder(tmp_path: Path, classes: str = "bg\ncat\ndog\n", n: int = 3) -> Path:
    """A tiny valid folder: n 4x6 images with masks using labels 0-2 and 255."""
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text(classes)
    for i in range(n):
        Image.new("RGB", (6, 4), (10 * i, 0, 0)).save(root / "images" / f"im{i}.png")
        mask = np.full((4, 6), i % 3, dtype=np.uint8)
        mask[0, 0] = 255
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i}.png")
    return root


def test_folder_tiny_reads(tmp_path):
    root = make_folder(tmp_path)
    ds = FolderDataset(root, "train")
    assert ds.vocabulary == ["cat", "dog"] and ds.background == "bg"
    assert sorted(ds.ids + FolderDataset(root, "val").ids) == ["im0", "im1", "im2"]
    for i in range(len(ds)):
        assert ds[i]["mask"][0, 0] == 255 and ds[i]["mask"][1, 1] == int(ds.ids[i][-1]) % 3


@pytest.mark.parametrize(
    "classes,match",
    [
        ("", "classes.txt is empty"),
        ("\n\n", "classes.txt is empty"),
        ("bg\n", "names only the background"),
        ("bg\ncat\ncat\n", "names 'cat' more than once"),
        ("bg\n\ncat\n", "line 2 is blank"),
    ],
)
def test_folder_refuses_bad_classes(tmp_path, classes, match):
    root = make_folder(tmp_path, classes)
    with pytest.raises(DataError, match=match):
        FolderDataset(root)


def test_folder_refuses_unpaired_files(tmp_path):
    root = make_folder(tmp_path)
    (root / "masks" / "im1.png").rename(tmp_path / "aside.png")
    with pytest.raises(DataError, match=r"1 images have no mask .*im1.png"):
        FolderDataset(root)
    (tmp_path / "aside.png").rename(root / "masks" / "im1.png")
    (root / "masks" / "ghost.png").write_bytes((root / "masks" / "im0.png").read_bytes())
    with pytest.raises(DataError, match=r"1 masks have no image .*ghost.png"):
        FolderDataset(root)
    (root / "masks" / "ghost.png").unlink()
    (root / "images" / "im0.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="two images are named 'im0'"):
        FolderDataset(root)


def both_splits(root: Path) -> tuple[FolderDataset, FolderDataset]:
    return FolderDataset(root, "train"), FolderDataset(root, "val")


def find(root: Path, name: str) -> tuple[FolderDataset, int]:
    for ds in both_splits(root):
        if name in ds.ids:
            return ds, ds.ids.index(name)
    raise AssertionError(name)


def test_folder_refuses_bad_pixels_on_read(tmp_path):
    root = make_folder(tmp_path)
    Image.fromarray(np.zeros((5, 6), dtype=np.uint8), mode="L").save(root / "masks" / "im0.png")
    ds, i = find(root, "im0")  # construction stays cheap: sizes are checked on read
    with pytest.raises(DataError, match=r"masks/im0.png is 5x6 .*images/im0.png is 4x6"):
        ds[i]
    Image.fromarray(np.full((4, 6), 7, dtype=np.uint8), mode="L").save(root / "masks" / "im0.png")
    ds, i = find(root, "im0")
    label_error = r"masks/im0.png contains label 7, but .*/classes.txt defines labels 0..2"
    with pytest.raises(DataError, match=label_error):
        ds[i]
    with pytest.raises(DataError, match="label 7"):
        ds.labels(i)
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8), mode="L").save(root / "masks" / "im0.png")
    (root / "images" / "im0.png").write_bytes(b"this is not a png")
    ds, i = find(root, "im0")
    with pytest.raises(DataError, match=r"cannot read image .*im0.png"):
        ds[i]
    Image.new("RGB", (6, 4)).save(root / "images" / "im0.png")
    Image.new("RGB", (6, 4)).save(root / "masks" / "im0.png")
    with pytest.raises(DataError, match="mode RGB"):
        ds[i]


def test_folder_refuses_unknown_unseen_classes(tmp_path):
    root = make_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"'bird', 'fish' not in .*classes.txt; available: cat, dog"):
        build_split(Config(dataset="folder", data_path=str(root), unseen_classes=["cat", "bird", "fish"]))
    with pytest.raises(ConfigError, match="every class is held out"):
        build_split(Config(dataset="folder", data_path=str(root), unseen_classes=["cat", "dog"]))
    with pytest.raises(DataError, match="does not exist"):
        build_split(Config(dataset="folder", data_path=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------------------------------------
# Transforms.


def test_resize_and_hflip():
    image = torch.rand(3, 4, 6)
    mask = torch.tensor([[0, 0, 1, 1, 255, 255]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2)
    sample = {"image": image, "mask": mask, "names": ("a", "b", "c"), "id": "x"}
    up = resize(sample, 12)
    assert up["image"].shape == (3, 12, 12) and up["mask"].shape == (12, 12)
    assert up["mask"].dtype == torch.int64
    assert up["mask"][:6, :4].eq(0).all() and up["mask"][:6, 8:].eq(255).all()
    assert up["mask"][6:, :6].eq(2).all() and up["mask"][6:, 6:].eq(3).all()
    assert set(up["mask"].unique().tolist()) == {0, 1, 2, 3, 255}  # no blended labels
    assert up["names"] == sample["names"] and up["id"] == "x" and sample["mask"].shape == (4, 6)
    flat = resize({**sample, "image": torch.full((3, 4, 6), 0.25)}, 3)
    assert torch.allclose(flat["image"], torch.full((3, 3, 3), 0.25))
    # Antialiasing averages a checkerboard to grey when shrinking; plain bilinear would alias.
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2
    small = resize({**sample, "image": checker.float().expand(3, 8, 8), "mask": checker}, 2)
    assert torch.allclose(small["image"], torch.full((3, 2, 2), 0.5), atol=0.05)
    flipped = hflip(sample)
    assert torch.equal(flipped["mask"][0], torch.tensor([255, 255, 1, 1, 0, 0]))
    assert torch.equal(flipped["image"][:, :, 0], image[:, :, -1])
    assert torch.equal(hflip(flipped)["image"], image) and torch.equal(hflip(flipped)["mask"], mask)


def test_augmentations_keep_image_and_mask_aligned():
    import numpy as np

    from fusioner.data.augment import AUGMENTATIONS

    image = torch.zeros(3, 40, 60)
    mask = torch.zeros(40, 60, dtype=torch.long)
    image[:, 10:30, 5:25] = 1.0  # a white square labelled 3
    mask[10:30, 5:25] = 3
    for name in ("hflip", "crop"):
        for seed in range(6):
            out_image, out_mask = AUGMENTATIONS[name].apply(image, mask, np.random.default_rng(seed))
            assert out_image.shape == image.shape and out_mask.shape == mask.shape
            assert set(out_mask.unique().tolist()) <= {0, 3}  # nearest: no invented labels
            inside = out_image[0][out_mask == 3]
            assert inside.numel() == 0 or inside.mean() > 0.9  # the square's pixels moved with its label
    jittered, same = AUGMENTATIONS["jitter"].apply(image, mask, np.random.default_rng(0))
    assert torch.equal(same, mask) and 0 <= jittered.min() and jittered.max() <= 1
