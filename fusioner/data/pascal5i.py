"""PASCAL VOC 2012 (with SBD's SegmentationClassAug when present) and its PASCAL-5i split.

Layout under the root (the ``VOC2012`` folder)::

    JPEGImages/NAME.jpg
    SegmentationClass/NAME.png       palette PNG, VOC labels 0-20, 255 = ignore
    SegmentationClassAug/NAME.png    optional: SBD-augmented masks (grayscale, same labels)
    ImageSets/Segmentation/{train,val}.txt

Image lists by rule: ``val`` is ``val.txt``; ``train`` is every ``SegmentationClassAug`` mask
not in ``val.txt`` (the usual 10,582-image ``train_aug``) when that folder exists, else
``train.txt``. Training masks come from ``SegmentationClassAug`` first, evaluation masks from
``SegmentationClass`` first (its object boundaries are marked ignore). HSNet list files
(``name__classid`` lines, or plain names) replace the rule for their split. HSNet's
``trn/foldN.txt`` holds the pairs of fold N's *own* classes, so training on fold i reads the
other three folds' ``trn`` files (as HSNet does); evaluation reads ``val/fold{i}.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fusioner.config import Config
from fusioner.data.registry import register_dataset
from fusioner.data.splits import (
    NUM_FOLDS,
    VOC_CLASSES,
    ListDataset,
    Split,
    drop_images_with,
    hsnet_list,
    pascal5i_labels,
    read_name_list,
    read_pascal_list,
    training_subset,
)
from fusioner.errors import ConfigError, DataError

SPLITS = ("train", "val")


class PascalVOC(ListDataset):
    """VOC 2012 segmentation images in VOC's label space (1 = aeroplane ... 20 = tv monitor)."""

    label_source = "PASCAL VOC"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        list_files: str | Path | Sequence[str | Path] | None = None,
    ) -> None:
        self.root = Path(root)
        if split not in SPLITS:
            raise ConfigError(f"PASCAL VOC split {split!r} is not one of {', '.join(SPLITS)}")
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{self.root} is not a VOC2012 folder: {self.root / 'JPEGImages'} does not exist")
        self.split = split
        listed = None
        if list_files is not None:
            if isinstance(list_files, (str, Path)):
                list_files = [list_files]
            entries = [entry for path in list_files for entry in read_pascal_list(path)]
            ids = list(dict.fromkeys(name for name, _ in entries))
            if all(label is not None for _, label in entries):
                listed = [(name, label) for name, label in entries]
        else:
            ids = self._ids_by_rule()
        if not ids:
            raise DataError(f"PASCAL VOC {split} split under {self.root} holds no images")
        super().__init__(ids, VOC_CLASSES, listed)
        self._masks = self._find_masks()

    def _ids_by_rule(self) -> list[str]:
        sets = self.root / "ImageSets" / "Segmentation"
        aug = self.root / "SegmentationClassAug"
        if self.split == "val":
            return read_name_list(sets / "val.txt")
        if aug.is_dir():
            val = set(read_name_list(sets / "val.txt"))
            return sorted(p.stem for p in aug.glob("*.png") if p.stem not in val)
        return read_name_list(sets / "train.txt")

    def _find_masks(self) -> dict[str, Path]:
        dirs = ["SegmentationClassAug", "SegmentationClass"]
        if self.split == "val":
            dirs.reverse()
        dirs = [self.root / d for d in dirs if (self.root / d).is_dir()]
        masks: dict[str, Path] = {}
        missing = []
        for id in self.ids:
            path = next((d / f"{id}.png" for d in dirs if (d / f"{id}.png").is_file()), None)
            if path is None or not self.image_path(id).is_file():
                missing.append(id)
            else:
                masks[id] = path
        if missing:
            raise DataError(
                f"PASCAL VOC {self.split}: {len(missing)} listed images lack a JPEG in "
                f"{self.root / 'JPEGImages'} or a mask in {' / '.join(map(str, dirs)) or 'no mask folder'} "
                f"(first: {', '.join(missing[:5])})"
            )
        return masks

    def image_path(self, id: str) -> Path:
        return self.root / "JPEGImages" / f"{id}.jpg"

    def mask_path(self, id: str) -> Path:
        return self._masks[id]


def fold_classes(fold: int) -> list[str]:
    """The five VOC class names PASCAL-5i fold ``fold`` holds out."""
    return [VOC_CLASSES[label - 1] for label in pascal5i_labels(fold)]


def pascal5i_split(
    root: str | Path,
    fold: int,
    *,
    drop_unseen_images: bool = False,
    split_dir: str | Path | None = None,
) -> Split:
    """PASCAL-5i fold ``fold``: train on the other 15 classes, evaluate the fold's 5.

    ``split_dir``: HSNet's list folder (``trn/foldN.txt``, ``val/foldN.txt``, optionally under
    ``pascal/``); training reads the ``trn`` lists of the other folds. Without it the image
    lists follow the rules in the module docstring.
    """
    unseen = fold_classes(fold)
    seen = [n for n in VOC_CLASSES if n not in unseen]
    train_lists = val_list = None
    if split_dir:
        others = [f for f in range(NUM_FOLDS) if f != fold]
        train_lists = [hsnet_list(split_dir, "pascal", "trn", f, ".txt") for f in others]
        val_list = hsnet_list(split_dir, "pascal", "val", fold, ".txt")
    train = PascalVOC(root, "train", train_lists)
    if train_lists is None:
        train = training_subset(train, seen, unseen, drop_unseen_images=drop_unseen_images)
    elif drop_unseen_images:  # HSNet's lists already hold only images with seen classes
        train = drop_images_with(train, unseen)
    val = PascalVOC(root, "val", val_list)
    # GZSS as ZegCLIP evaluates VOC (target background ignored), the published figures' protocol.
    return Split(train=train, val=val, seen=seen, unseen=unseen, gzss_protocol="zegclip_voc")


@register_dataset("pascal5i", num_folds=NUM_FOLDS)
def build_pascal5i(config: Config) -> Split:
    if config.unseen_classes:
        raise ConfigError(
            "config key 'unseen_classes' is for the folder dataset; PASCAL-5i holds out the classes "
            f"of config key 'fold' (fold {config.fold}: {', '.join(fold_classes(config.fold))})"
        )
    if not config.data_path:
        raise ConfigError("config key 'data_path' is empty; set it to the VOC2012 folder")
    return pascal5i_split(
        config.data_path,
        config.fold,
        drop_unseen_images=config.drop_unseen_images,
        split_dir=config.split_dir or None,
    )
