"""Shared fixtures: the real VOC samples from ../shared as a folder dataset, built in tmp."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOC = SHARED / "data" / "voc2012-samples" / "VOC2012"
VOC_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
]  # fmt: skip


def require_voc() -> Path:
    if not VOC.is_dir():
        pytest.skip(f"the shared VOC samples are not at {VOC}")
    return VOC


@pytest.fixture(scope="session")
def voc_folder(tmp_path_factory) -> Path:
    """The 14 real VOC images in the folder-dataset layout; the sheep and cow images are in val."""
    voc = require_voc()
    root = tmp_path_factory.mktemp("voc_folder")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("\n".join(VOC_NAMES) + "\n")
    train, val = [], []
    for jpg in sorted((voc / "JPEGImages").glob("*.jpg")):
        shutil.copy(jpg, root / "images" / jpg.name)
        labels = np.asarray(Image.open(voc / "SegmentationClass" / f"{jpg.stem}.png"))
        Image.fromarray(labels.astype(np.uint8)).save(root / "masks" / f"{jpg.stem}.png")
        present = set(np.unique(labels).tolist())
        (val if present & {10, 17} else train).append(jpg.stem)
    (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(val) + "\n")
    return root
