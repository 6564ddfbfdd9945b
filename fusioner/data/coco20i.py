"""COCO 2014 instances rendered to class masks, and the COCO-20i split.

Layout under the root::

    train2014/COCO_train2014_*.jpg, val2014/COCO_val2014_*.jpg
    annotations/instances_{train,val}2014.json

Masks are rendered from the instance annotations with labels 1..80 in COCO's category-id order
(:data:`COCO_CLASSES`). Crowd regions (``iscrowd=1``) are painted ignore (255) first, then the
other instances from the largest to the smallest, so a small object on a larger one stays
visible and an instance drawn over a crowd region keeps its label. Rendered masks are cached as
PNG (written atomically) under ``mask_dir``, ``<root>/fusioner_masks`` by default, and rendered
again when the annotation file is newer; the annotation file is only loaded when a mask or a
label set is not known yet.

Image lists by rule: every image of the split with at least one non-crowd instance. An HSNet
fold JSON (class index 0-79 -> image paths) replaces the rule and fixes the one-way pairs.
"""

from __future__ import annotations

import contextlib
import io
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fusioner.config import Config
from fusioner.data.registry import register_dataset
from fusioner.data.splits import (
    COCO_CLASSES,
    NUM_FOLDS,
    ListDataset,
    Split,
    coco20i_labels,
    drop_images_with,
    hsnet_list,
    read_coco_lists,
    training_subset,
)
from fusioner.errors import ConfigError, DataError
from fusioner.io import atomic_write, read_json

log = logging.getLogger(__name__)

SPLITS = {"train": "train2014", "val": "val2014"}


class COCOIndex:
    """The parts of a COCO instances file the masks need: images, annotations per image, labels."""

    def __init__(self, path: Path) -> None:
        try:
            from pycocotools.coco import COCO
        except ImportError:
            raise DataError("COCO annotations need pycocotools: pip install pycocotools") from None
        data = read_json(path, "COCO annotation file")
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
            raise DataError(f"{path} is not a COCO instances file (needs images, annotations, categories)")
        names = tuple(c["name"] for c in sorted(data["categories"], key=lambda c: c["id"]))
        if names != COCO_CLASSES:
            raise DataError(f"{path}: categories are not COCO's 80 instance categories (got {len(names)})")
        self.path = path
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        cat_ids = sorted(self.coco.cats)
        self.label_of = {cat: i + 1 for i, cat in enumerate(cat_ids)}
        self.by_file = {img["file_name"]: img["id"] for img in self.coco.imgs.values()}

    def image_id(self, file_name: str) -> int:
        if file_name not in self.by_file:
            raise DataError(f"image {file_name} is not in COCO annotation file {self.path}")
        return self.by_file[file_name]

    def annotations(self, file_name: str) -> list[dict[str, Any]]:
        return self.coco.imgToAnns.get(self.image_id(file_name), [])

    def labels(self, file_name: str) -> frozenset[int]:
        """Labels of the non-crowd instances (crowd pixels are ignore, never a class)."""
        anns = self.annotations(file_name)
        return frozenset(self.label_of[a["category_id"]] for a in anns if not a["iscrowd"])

    def render(self, file_name: str) -> np.ndarray:
        """``h w`` uint8 class mask: crowd = 255 first, then instances from largest to smallest."""
        img = self.coco.imgs[self.image_id(file_name)]
        mask = np.zeros((img["height"], img["width"]), dtype=np.uint8)
        anns = self.annotations(file_name)
        for ann in [a for a in anns if a["iscrowd"]]:
            mask[self.coco.annToMask(ann) > 0] = 255
        for ann in sorted((a for a in anns if not a["iscrowd"]), key=lambda a: -a["area"]):
            mask[self.coco.annToMask(ann) > 0] = self.label_of[ann["category_id"]]
        return mask


class COCOInstances(ListDataset):
    """COCO 2014 images with class masks rendered from instance annotations (labels 1-80).

    Ids are file stems (``COCO_val2014_000000000139``); ``files`` maps each to its path
    relative to the root, as in the annotation file (``val2014/...jpg``).
    """

    label_source = "COCO (80 categories)"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        list_file: str | Path | None = None,
        mask_dir: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        if split not in SPLITS:
            raise ConfigError(f"COCO split {split!r} is not one of {', '.join(SPLITS)}")
        if not self.root.is_dir():
            raise DataError(f"COCO root {self.root} does not exist")
        self.split = split
        self.annotation_file = self.root / "annotations" / f"instances_{SPLITS[split]}.json"
        self.mask_dir = Path(mask_dir) if mask_dir is not None else self.root / "fusioner_masks"
        self._cache_writable = True
        listed = None
        if list_file is not None:
            pairs = read_coco_lists(list_file)
            files = list(dict.fromkeys(path for path, _ in pairs))
            listed = [(Path(path).stem, label) for path, label in pairs]
        else:
            files = sorted(f for f in self.index.by_file if self.index.labels(f))
            files = [f"{SPLITS[split]}/{f}" if "/" not in f else f for f in files]
        self.files = {Path(f).stem: f for f in files}
        if not files:
            raise DataError(f"COCO {split} split under {self.root} holds no images")
        super().__init__(list(self.files), COCO_CLASSES, listed)

    @cached_property
    def index(self) -> COCOIndex:
        return COCOIndex(self.annotation_file)

    def image_path(self, id: str) -> Path:
        return self.root / self.files[id]

    def mask_path(self, id: str) -> Path:
        return self.mask_dir / Path(self.files[id]).with_suffix(".png")

    def item_files(self, index: int) -> list[Path]:
        id = self.ids[index]
        # With the annotation file present, the mask PNG is its render, written on first read:
        # fingerprinting the PNG would change every fingerprint after the first fill.
        source = self.annotation_file if self.annotation_file.is_file() else self.mask_path(id)
        return [self.image_path(id), source]

    def _rendered_is_current(self, path: Path) -> bool:
        """A rendered mask is current unless the annotation file was changed after it was written."""
        if not path.is_file():
            return False
        try:
            return self.annotation_file.stat().st_mtime_ns <= path.stat().st_mtime_ns
        except FileNotFoundError:  # listed masks without annotations: the PNGs are all there is
            return True

    def load_mask(self, id: str) -> Tensor:
        path = self.mask_path(id)
        if self._rendered_is_current(path):
            return super().load_mask(id)
        mask = self.index.render(Path(self.files[id]).name)
        if self._cache_writable:
            try:
                atomic_write(path, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"))
            except OSError as e:  # a read-only dataset folder: render every time instead
                log.warning("cannot cache COCO masks in %s (%s); rendering on every read", self.mask_dir, e)
                self._cache_writable = False
        return torch.from_numpy(mask.astype(np.int64))

    def labels(self, index: int) -> frozenset[int]:
        """Labels of the image's non-crowd instances, from the annotations (no mask rendering)."""
        id = self.ids[index]
        if id not in self._labels:
            self._labels[id] = self.index.labels(Path(self.files[id]).name)
        return self._labels[id]


def fold_classes(fold: int) -> list[str]:
    """The twenty COCO class names COCO-20i fold ``fold`` holds out."""
    return [COCO_CLASSES[label - 1] for label in coco20i_labels(fold)]


def coco20i_split(
    root: str | Path,
    fold: int,
    *,
    drop_unseen_images: bool = False,
    split_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
) -> Split:
    """COCO-20i fold ``fold``: train on the other 60 classes, evaluate the fold's 20.

    ``split_dir``: HSNet's list folder (``trn/foldN.json``, ``val/foldN.json``, optionally under
    ``coco/``); without it every annotated image of the split is used (see module docstring).
    """
    unseen = fold_classes(fold)
    seen = [n for n in COCO_CLASSES if n not in unseen]
    train_list = hsnet_list(split_dir, "coco", "trn", fold, ".json") if split_dir else None
    val_list = hsnet_list(split_dir, "coco", "val", fold, ".json") if split_dir else None
    train = COCOInstances(root, "train", train_list, mask_dir)
    if train_list is None:
        train = training_subset(train, seen, unseen, drop_unseen_images=drop_unseen_images)
    elif drop_unseen_images:  # HSNet's lists already hold only images with seen classes
        train = drop_images_with(train, unseen)
    val = COCOInstances(root, "val", val_list, mask_dir)
    # GZSS as ZegCLIP evaluates VOC (target background ignored): COCO-20i's background is the
    # same "no annotated object" as VOC's, not a class anyone names, so the PASCAL-5i and COCO-20i
    # rows of a table are scored alike (both protocols are in metrics.json).
    return Split(train=train, val=val, seen=seen, unseen=unseen, gzss_protocol="zegclip_voc")


@register_dataset("coco20i", num_folds=NUM_FOLDS)
def build_coco20i(config: Config) -> Split:
    if config.unseen_classes:
        raise ConfigError(
            "config key 'unseen_classes' is for the folder dataset; COCO-20i holds out the classes "
            f"of config key 'fold' (fold {config.fold}: {', '.join(fold_classes(config.fold))})"
        )
    if not config.data_path:
        raise ConfigError("config key 'data_path' is empty; set it to the COCO 2014 folder")
    return coco20i_split(
        config.data_path,
        config.fold,
        drop_unseen_images=config.drop_unseen_images,
        split_dir=config.split_dir or None,
    )
