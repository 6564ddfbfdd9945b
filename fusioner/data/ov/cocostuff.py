"""COCO-Stuff-171 on COCO 2017 val, in the detectron2 layout under ``coco/``::

    val2017/<id>.jpg
    stuffthingmaps_detectron2/val2017/<id>.png   uint8: 0..170 = names, 255 = unlabeled

The official ``stuffthingmaps_trainval2017`` PNGs hold ``COCO id - 1`` (0..181, with 11 ids that
no class uses) and 255; ``scripts/prepare_cocostuff.py`` maps the 171 used ids to 0..170 in id
order (:data:`COCOSTUFF_IDS`). Names: the 80 thing names of COCO then the 91 stuff names
("building-other", "wall-brick", ...), as CAT-Seg / SAN / MaskFormer use them.
"""

from __future__ import annotations

from pathlib import Path

from fusioner.data.ov.base import OVDataset, OVSpec, offset_lut, paired_files, read_names, register_ov

# The COCO category ids of the 171 classes, in label order: the 80 thing ids, then stuff 92..182.
COCOSTUFF_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
    *range(92, 183),
)  # fmt: skip


def open_cocostuff171(root: Path) -> OVDataset:
    names = read_names("cocostuff171")
    items = paired_files(
        root / "val2017", ".jpg", root / "stuffthingmaps_detectron2" / "val2017", ".png", "cocostuff171"
    )
    return OVDataset("cocostuff171", names, items, offset_lut(len(names), 255, 256))


register_ov(
    OVSpec(
        "cocostuff171",
        "COCO-Stuff",
        "coco",
        "stuffthingmaps_detectron2/val2017",
        "prepare it from val2017.zip + stuffthingmaps_trainval2017.zip with scripts/prepare_cocostuff.py",
        open_cocostuff171,
    )
)
