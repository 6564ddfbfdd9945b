"""Cityscapes val with its 19 evaluated classes, read from the official layout under ``cityscapes/``::

    leftImg8bit/val/<city>/<stem>_leftImg8bit.png
    gtFine/val/<city>/<stem>_gtFine_labelIds.png   uint8 label ids 0..33, -1 as 255

Label ids map to the 19 train ids of the Cityscapes scripts (:data:`TRAIN_IDS`); every other id
(void, ego vehicle, rectification border, the classes not evaluated such as "parking") is ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusioner.data.ov.base import OVDataset, OVSpec, read_names, register_ov
from fusioner.errors import DataError

# Cityscapes label id -> train id (0..18), in the order of names/cityscapes.txt.
TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


def open_cityscapes(root: Path) -> OVDataset:
    names = read_names("cityscapes")
    label_root = root / "gtFine" / "val"
    items, missing = [], []
    for mask in sorted(label_root.glob(f"*/*{LABEL_SUFFIX}")):
        stem = mask.name[: -len(LABEL_SUFFIX)]
        image = root / "leftImg8bit" / "val" / mask.parent.name / f"{stem}{IMAGE_SUFFIX}"
        (items if image.is_file() else missing).append((stem, image, mask))
    if missing:
        raise DataError(f"cityscapes: {len(missing)} label maps have no image (first: {missing[0][1]})")
    if not items:
        raise DataError(f"cityscapes: {label_root} holds no <city>/*{LABEL_SUFFIX} files")
    lut = np.full(256, 255, dtype=np.int64)
    for label_id, train_id in TRAIN_IDS.items():
        lut[label_id] = train_id + 1
    return OVDataset("cityscapes", names, items, lut)


register_ov(
    OVSpec(
        "cityscapes",
        "Cityscapes",
        "cityscapes",
        "gtFine/val",
        "unpack gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip there (read as is)",
        open_cityscapes,
    )
)
