"""ADE20K: the 150-class SceneParsing benchmark and the 847-class full ADE20K, detectron2 layouts.

ADE20K-150 (``ADEChallengeData2016/``)::

    images/validation/ADE_val_*.jpg
    annotations_detectron2/validation/ADE_val_*.png   uint8: 0..149 = names, 255 = unlabeled

The official ``annotations/validation`` PNGs hold 0 = "other" and 1..150; ``scripts/prepare_ade150.py``
shifts them by one (0 -> 255), as detectron2 / MaskFormer / CAT-Seg do.

ADE20K-847 (``ADE20K_2021_17_01/``), written by ``scripts/prepare_ade847.py`` from the full ADE20K
release (``index_ade20k.pkl`` + ``*_seg.png``)::

    images_detectron2/validation/ADE_val_*.jpg
    annotations_detectron2/validation/ADE_val_*.tif   uint16: 0..846 = names, 65535 = unlabeled

Names: the lists CAT-Seg / SAN / MaskFormer use (``names/ade150.txt``; ``names/ade847.txt`` keeps
ADE's WordNet-style synonym lists, "building, edifice", as those repos pass them to CLIP).
"""

from __future__ import annotations

from pathlib import Path

from fusioner.data.ov.base import OVDataset, OVSpec, offset_lut, paired_files, read_names, register_ov


def open_ade150(root: Path) -> OVDataset:
    names = read_names("ade150")
    items = paired_files(
        root / "images" / "validation",
        ".jpg",
        root / "annotations_detectron2" / "validation",
        ".png",
        "ade150",
    )
    return OVDataset("ade150", names, items, offset_lut(len(names), 255, 256))


def open_ade847(root: Path) -> OVDataset:
    names = read_names("ade847")
    items = paired_files(
        root / "images_detectron2" / "validation",
        ".jpg",
        root / "annotations_detectron2" / "validation",
        ".tif",
        "ade847",
    )
    return OVDataset("ade847", names, items, offset_lut(len(names), -1))


register_ov(
    OVSpec(
        name="ade847",
        title="A-847",
        root="ADE20K_2021_17_01",
        marker="annotations_detectron2/validation",
        how="prepare it from the full ADE20K release with scripts/prepare_ade847.py",
        open=open_ade847,
    )
)
register_ov(
    OVSpec(
        name="ade150",
        title="A-150",
        root="ADEChallengeData2016",
        marker="annotations_detectron2/validation",
        how="prepare it from ADEChallengeData2016.zip with scripts/prepare_ade150.py",
        open=open_ade150,
    )
)
