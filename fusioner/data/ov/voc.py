"""PASCAL VOC 2012 val as an open-vocabulary set: VOC-20 (no background) and VOC-21.

Read straight from the official layout under ``VOCdevkit/VOC2012/``: ``ImageSets/Segmentation/
val.txt``, ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG: 0 = background,
1..20 = VOC classes, 255 = object borders and difficult regions).

- ``voc20``: the 20 object names; background pixels are ignored (CAT-Seg / SAN's "VOC-20").
- ``voc21``: "background" is a name like the others, asked for in the same pass (label 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusioner.data.ov.base import OVDataset, OVSpec, read_names, register_ov
from fusioner.data.splits import read_name_list
from fusioner.errors import DataError


def _items(root: Path, what: str) -> list[tuple[str, Path, Path]]:
    ids = read_name_list(root / "ImageSets" / "Segmentation" / "val.txt")
    items = [(id, root / "JPEGImages" / f"{id}.jpg", root / "SegmentationClass" / f"{id}.png") for id in ids]
    missing = [p for item in items for p in item[1:] if not p.is_file()]
    if missing:
        raise DataError(f"{what}: {len(missing)} files listed by val.txt are missing (first: {missing[0]})")
    return items


def open_voc20(root: Path) -> OVDataset:
    names = read_names("voc20")
    lut = np.full(256, 255, dtype=np.int64)
    lut[1:21] = np.arange(1, 21)  # background (0) and borders (255) are ignored
    return OVDataset("voc20", names, _items(root, "voc20"), lut)


def open_voc21(root: Path) -> OVDataset:
    names = read_names("voc21")
    lut = np.full(256, 255, dtype=np.int64)
    lut[0:21] = np.arange(1, 22)  # background is names[0]
    return OVDataset("voc21", names, _items(root, "voc21"), lut)


_ROOT = "VOCdevkit/VOC2012"
register_ov(
    OVSpec(
        "voc20",
        "VOC-20",
        _ROOT,
        "SegmentationClass",
        "unpack VOCtrainval_11-May-2012.tar there (read as is)",
        open_voc20,
    )
)
register_ov(
    OVSpec(
        "voc21",
        "VOC-21",
        _ROOT,
        "SegmentationClass",
        "unpack VOCtrainval_11-May-2012.tar there (read as is)",
        open_voc21,
    )
)
