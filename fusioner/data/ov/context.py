"""Pascal Context on VOC 2010 images: 59 and 459 classes, in the detectron2 layout.

Under ``VOCdevkit/VOC2010/``::

    JPEGImages/<id>.jpg
    annotations_detectron2/pc59_val/<id>.png    uint8: 0..58 = names, 255 = unlabeled
    annotations_detectron2/pc459_val/<id>.tif   uint16: 0..458 = names, 65535 = unlabeled

``scripts/prepare_pascal_context.py`` writes both from the official downloads: Pascal Context-59
from ``trainval_merged.json`` (every pixel outside the 59 frequent classes, and the unlabeled
ones, is ignored: the usual "ignore the other 400" rule), Pascal Context-459 from the
``trainval/<id>.mat`` ``LabelMap`` arrays (1-based indices into ``labels.txt``, stored 0-based).

Names: ``names/pc459.txt`` is ``labels.txt`` in its own order and spelling ("airconditioner"), as
CAT-Seg / SAN pass it; ``names/pc59.txt`` is the 59-name list of those repos with VOC's three
compounds written as words ("potted plant", "dining table", "tv monitor"), as fusioner's VOC
names are. :data:`PC59_IDS` are the 59 classes' 1-based ``labels.txt`` indices, in label order.
"""

from __future__ import annotations

from pathlib import Path

from fusioner.data.ov.base import OVDataset, OVSpec, offset_lut, paired_files, read_names, register_ov

PC59_IDS: tuple[int, ...] = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144,
    158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354,
    355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)  # fmt: skip


def _open(root: Path, key: str, suffix: str, ignore: int) -> OVDataset:
    names = read_names(key)
    items = paired_files(
        root / "JPEGImages", ".jpg", root / "annotations_detectron2" / f"{key}_val", suffix, key
    )
    return OVDataset(key, names, items, offset_lut(len(names), ignore, 256 if suffix == ".png" else 2**16))


def open_pc59(root: Path) -> OVDataset:
    return _open(root, "pc59", ".png", 255)


def open_pc459(root: Path) -> OVDataset:
    return _open(root, "pc459", ".tif", -1)


_ROOT = "VOCdevkit/VOC2010"
register_ov(
    OVSpec(
        "pc459",
        "PC-459",
        _ROOT,
        "annotations_detectron2/pc459_val",
        "prepare it from VOC 2010 + Pascal Context with scripts/prepare_pascal_context.py",
        open_pc459,
    )
)
register_ov(
    OVSpec(
        "pc59",
        "PC-59",
        _ROOT,
        "annotations_detectron2/pc59_val",
        "prepare it from VOC 2010 + Pascal Context with scripts/prepare_pascal_context.py",
        open_pc59,
    )
)
