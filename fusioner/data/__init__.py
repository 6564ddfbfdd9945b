"""Datasets and splits: ``build_split(config)`` turns ``config.dataset`` into a :class:`Split`.

Each benchmark module provides ``build_<name>(config) -> Split``; :data:`BUILDERS` maps the
names ``config.dataset`` accepts to them. Builders are imported on first use, so a benchmark's
optional dependency (pycocotools for COCO) is only needed when that benchmark is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from fusioner.config import Config
from fusioner.data.base import IGNORE, Sample, SegDataset
from fusioner.data.splits import COCO_CLASSES, VOC_CLASSES, ListDataset, Split
from fusioner.errors import UnknownNameError

# config.dataset -> "module:function" of its builder.
BUILDERS: dict[str, str] = {
    "pascal5i": "fusioner.data.pascal5i:build_pascal5i",
    "coco20i": "fusioner.data.coco20i:build_coco20i",
    "folder": "fusioner.data.folder:build_folder",
    "pictograms": "fusioner.data.pictograms:build_pictograms",
    "mosaic4": "fusioner.data.mosaic:build_mosaic4",
}


def get_builder(name: str) -> Callable[[Config], Split]:
    if name not in BUILDERS:
        known = ", ".join(BUILDERS)
        raise UnknownNameError(f"config key 'dataset': unknown dataset {name!r}; known: {known}")
    module, _, function = BUILDERS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def build_split(config: Config) -> Split:
    """The train / val (/ test) datasets and seen / unseen class names ``config`` asks for."""
    split = get_builder(config.dataset)(config)
    if split.name == "this dataset":
        split.name = config.dataset
    return split


__all__ = [
    "BUILDERS",
    "COCO_CLASSES",
    "IGNORE",
    "VOC_CLASSES",
    "ListDataset",
    "Sample",
    "SegDataset",
    "Split",
    "build_split",
    "get_builder",
]
