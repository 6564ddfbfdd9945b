"""Split rules: which images and which (image, class) pairs each split of a benchmark holds.

Fold rules (the few-shot / zero-shot benchmarks of OSLSM, FWB, HSNet and Fusioner):

* PASCAL-5i: fold ``i`` holds VOC labels ``5i+1 .. 5i+5``.
* COCO-20i: fold ``i`` holds COCO labels ``{i+1, i+5, ..., i+77}`` (interleaved, as in FWB/HSNet),
  labels 1..80 being COCO's categories in id order.

Image rules, shared by every list-backed dataset (:class:`ListDataset`):

* training keeps the images that show at least one seen class (an image showing only held-out
  classes would be all background once the engine maps them away); ``drop_unseen_images``
  also drops every image that shows a held-out class at all;
* evaluation keeps every image of the split; :meth:`ListDataset.pairs` gives the (image, class)
  pairs of the one-way protocol: every class of interest present in the mask, or exactly the
  pairs of an HSNet list file when the dataset was built from one (one line, one episode, as
  HSNet, LSeg and the released Fusioner code score them; fusioner/engine/evaluate.py).

HSNet list files are read here too: PASCAL ``name__classid`` text files and COCO JSON files
mapping a class index 0-79 to image paths.
"""

from __future__ import annotations

import copy
import hashlib
from abc import abstractmethod
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
from torch import Tensor

from fusioner.data.base import IGNORE, Sample, SegDataset, files_fingerprint, read_image, read_mask
from fusioner.errors import ConfigError, DataError
from fusioner.io import read_json

NUM_FOLDS = 4

# VOC label order; "diningtable", "pottedplant" and "tvmonitor" spelled as words for text encoders.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)  # fmt: skip

# COCO's 80 instance categories in category-id order (label i = the i-th category, 1-based).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@dataclass
class Split:
    """What one experiment trains and evaluates on.

    ``train`` and ``val`` keep the dataset's full label space: mapping ``unseen`` names to
    background while training is the engine's job.
    """

    train: SegDataset  # training images
    val: SegDataset  # evaluation images (and where GZSS calibration is chosen)
    seen: list[str]  # class names used for training
    unseen: list[str]  # held-out names (the fold's classes for PASCAL-5i / COCO-20i)
    test: SegDataset | None = None  # the reported split, where the dataset has one apart from val
    name: str = "this dataset"  # for messages
    # Which GZSS protocol (fusioner/engine/metrics.py GZSS_PROTOCOLS) heads metrics.json and picks
    # the calibration; every protocol is reported either way. PASCAL-5i and COCO-20i use ZegCLIP's
    # (their figures go next to published tables). The default, for folder datasets and everything
    # else, counts background: a user's own data labels its background on purpose (it is what the
    # application must leave unlabelled), and a name painted over it is a real error there; under
    # ZegCLIP's protocol a model that never predicts background would lose nothing for it.
    gzss_protocol: str = "background_as_class"

    def __post_init__(self) -> None:
        overlap = set(self.seen) & set(self.unseen)
        if overlap:
            raise ConfigError(f"classes {sorted(overlap)} are both seen and unseen")

    def evaluation_set(self, eval_split: str) -> SegDataset:
        """The dataset config key ``eval_split`` names: ``val`` or ``test``."""
        if eval_split == "val":
            return self.val
        if eval_split == "test" and self.test is not None:
            return self.test
        if eval_split == "test":
            raise ConfigError(
                f"config key 'eval_split': {self.name} has no test split apart from val "
                "(its published figures are on val); use eval_split=val"
            )
        raise ConfigError(f"config key 'eval_split': {eval_split!r} is not one of val, test")


# ---------------------------------------------------------------------------------------------
# Fold rules.


def check_fold(fold: int) -> int:
    if not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise ConfigError(f"config key 'fold': {fold!r} is not one of 0, 1, 2, 3")
    return fold


def pascal5i_labels(fold: int) -> list[int]:
    """VOC labels held out in PASCAL-5i fold ``fold``: ``5i+1 .. 5i+5``."""
    check_fold(fold)
    return list(range(5 * fold + 1, 5 * fold + 6))


def coco20i_labels(fold: int) -> list[int]:
    """COCO labels (1-80) held out in COCO-20i fold ``fold``: ``{i+1, i+5, ..., i+77}``."""
    check_fold(fold)
    return list(range(fold + 1, 81, NUM_FOLDS))


# ---------------------------------------------------------------------------------------------
# List files.


def read_name_list(path: str | Path) -> list[str]:
    """One name per line (VOC ``ImageSets``, folder ``splits/*.txt``); blank lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"list file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read list file {path}: {e}") from None
    return [line.strip() for line in lines if line.strip()]


def read_pascal_list(path: str | Path) -> list[tuple[str, int | None]]:
    """HSNet PASCAL list -> ``(image name, VOC label)``; a plain name line gives label None.

    HSNet lines are ``2007_000033__01``: the label is VOC's (1-based, 1 = aeroplane).
    """
    out: list[tuple[str, int | None]] = []
    for lineno, line in enumerate(read_name_list(path), 1):
        name, sep, label = line.rpartition("__")
        if not sep:
            out.append((line, None))
            continue
        if not name or not label.isdigit() or not 1 <= int(label) <= len(VOC_CLASSES):
            raise DataError(
                f"list file {path}, line {lineno}: {line!r} is not NAME__CLASSID with CLASSID in 1..20"
            )
        out.append((name, int(label)))
    return out


def read_coco_lists(path: str | Path) -> list[tuple[str, int]]:
    """HSNet COCO fold JSON (``{"0": ["val2014/COCO_val2014_....jpg", ...], ...}``) -> pairs.

    Keys are COCO class indices 0-79; the returned label is 1-based (key + 1), image paths stay
    relative to the COCO root. Pairs come in key order, then file order.
    """
    path = Path(path)
    data = read_json(path, "list file")
    if not isinstance(data, dict):
        raise DataError(f"list file {path}: expected a JSON object mapping class index 0-79 to image paths")
    pairs: list[tuple[str, int]] = []
    for key in sorted(data, key=lambda k: int(k) if str(k).isdigit() else -1):
        images = data[key]
        if not str(key).isdigit() or not 0 <= int(key) < len(COCO_CLASSES):
            raise DataError(f"list file {path}: key {key!r} is not a COCO class index 0-79")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError(f"list file {path}: key {key!r} must map to a list of image paths")
        pairs.extend((p, int(key) + 1) for p in images)
    return pairs


def hsnet_list(split_dir: str | Path, benchmark: str, split: str, fold: int, suffix: str) -> Path:
    """The HSNet list for ``split`` ("trn" | "val") and ``fold`` under ``split_dir``.

    ``split_dir`` may be HSNet's ``data/splits`` folder (holding ``pascal/`` and ``coco/``) or one
    benchmark's folder (holding ``trn/`` and ``val/``).
    """
    split_dir = Path(split_dir)
    for base in (split_dir / benchmark, split_dir):
        path = base / split / f"fold{fold}{suffix}"
        if path.is_file():
            return path
    raise DataError(
        f"split list {split}/fold{fold}{suffix} not found under {split_dir} or {split_dir / benchmark}"
    )


def seeded_val_names(names: Sequence[str], fraction: float = 0.2) -> set[str]:
    """The ``round(fraction * n)`` names (at least one when n >= 2) that form the validation set.

    Names are ranked by the SHA-1 of the name, not by a seeded shuffle: the split never changes
    with the Python or torch version, and adding an image never moves another one.
    """
    ranked = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    n_val = max(1, round(fraction * len(ranked))) if len(ranked) >= 2 else 0
    return set(ranked[:n_val])


def split_names(vocabulary: Sequence[str], unseen: Iterable[str], source: str) -> tuple[list[str], list[str]]:
    """Validate ``unseen`` against ``vocabulary``; return ``(seen, unseen)`` in vocabulary order."""
    unseen = list(dict.fromkeys(unseen))
    missing = [n for n in unseen if n not in vocabulary]
    if missing:
        raise ConfigError(
            f"config key 'unseen_classes': {', '.join(map(repr, missing))} not in {source}; "
            f"available: {', '.join(vocabulary)}"
        )
    seen = [n for n in vocabulary if n not in unseen]
    if not seen:
        raise ConfigError("config key 'unseen_classes': every class is held out; nothing is left to train on")
    return seen, [n for n in vocabulary if n in unseen]


# ---------------------------------------------------------------------------------------------
# Datasets over a list of images.


class ListDataset(SegDataset):
    """A dataset over a list of image ids with a fixed vocabulary (labels 1..len(vocabulary)).

    Subclasses say where an id's image and mask are (:meth:`image_path`, :meth:`mask_path`) and
    may override :meth:`load_mask` (rendered masks; then :meth:`item_files` names what it renders
    from) or :meth:`labels` (a cheaper source than the mask). Reading a sample checks that image
    and mask agree in size, reading a sample or its labels that every label is in the vocabulary,
    so a broken file fails with its name, not deep inside a loss.
    """

    label_source = "the dataset"  # named when a mask holds a label outside the vocabulary

    def __init__(
        self,
        ids: Sequence[str],
        vocabulary: Sequence[str],
        listed_pairs: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        if len(set(ids)) != len(ids):
            raise DataError(f"{type(self).__name__}: image ids are not unique")
        self.ids = list(ids)
        self.vocabulary = list(vocabulary)
        # (id, label) pairs from an HSNet list: when present they define the one-way protocol.
        self.listed_pairs = list(listed_pairs) if listed_pairs is not None else None
        self._labels: dict[str, frozenset[int]] = {}  # id -> labels present (shared by selections)

    @abstractmethod
    def image_path(self, id: str) -> Path: ...

    @abstractmethod
    def mask_path(self, id: str) -> Path: ...

    def load_mask(self, id: str) -> Tensor:
        """``h w`` int64 mask in the dataset's label space."""
        return read_mask(self.mask_path(id))

    def __len__(self) -> int:
        return len(self.ids)

    def item_id(self, index: int) -> str:
        return self.ids[index]

    def item_files(self, index: int) -> list[Path]:
        """The files sample ``index`` is read from (its fingerprint is their sizes and mtimes)."""
        id = self.ids[index]
        return [self.image_path(id), self.mask_path(id)]

    def item_fingerprint(self, index: int) -> str:
        return files_fingerprint(self.item_files(index))

    def __getitem__(self, index: int) -> Sample:
        id = self.ids[index]
        image = read_image(self.image_path(id))
        mask = self.load_mask(id)
        if tuple(image.shape[-2:]) != tuple(mask.shape):
            raise DataError(
                f"mask {self.mask_path(id)} is {mask.shape[0]}x{mask.shape[1]} (h x w) but image "
                f"{self.image_path(id)} is {image.shape[1]}x{image.shape[2]}"
            )
        self._remember(id, mask)
        return Sample(image=image, mask=mask, names=tuple(self.vocabulary), id=id)

    def _remember(self, id: str, mask: Tensor) -> frozenset[int]:
        values = set(torch.unique(mask).tolist()) - {0, IGNORE}
        bad = sorted(v for v in values if not 1 <= v <= len(self.vocabulary))
        if bad:
            raise DataError(
                f"mask {self.mask_path(id)} contains label {bad[0]}, but {self.label_source} defines "
                f"labels 0..{len(self.vocabulary)} (and {IGNORE} = ignore)"
            )
        self._labels[id] = frozenset(values)
        return self._labels[id]

    def labels(self, index: int) -> frozenset[int]:
        """Labels >= 1 present in image ``index`` (read from its mask once, then remembered)."""
        id = self.ids[index]
        if id not in self._labels:
            self._remember(id, self.load_mask(id))
        return self._labels[id]

    def select(self, indices: Iterable[int]) -> Self:
        """A copy holding only the images at ``indices`` (listed pairs follow their images)."""
        out = copy.copy(self)
        out.ids = [self.ids[i] for i in indices]
        if self.listed_pairs is not None:
            keep = set(out.ids)
            out.listed_pairs = [(id, label) for id, label in self.listed_pairs if id in keep]
        return out

    def pairs(self, names: Collection[str]) -> list[tuple[int, str]]:
        """One-way protocol pairs ``(index, name)`` for the class names of interest.

        From the HSNet list when the dataset came from one (those pairs, in file order), else every
        name in ``names`` whose label occurs in an image's mask, by image then label order.
        """
        unknown = [n for n in names if n not in self.vocabulary]
        if unknown:
            raise ConfigError(f"class names {unknown} are not in this dataset's vocabulary")
        wanted = {self.vocabulary.index(n) + 1 for n in names}
        vocab = self.vocabulary
        if self.listed_pairs is not None:
            index = {id: i for i, id in enumerate(self.ids)}
            return [(index[id], vocab[label - 1]) for id, label in self.listed_pairs if label in wanted]
        return [(i, vocab[label - 1]) for i in range(len(self)) for label in sorted(self.labels(i) & wanted)]


def training_subset(
    dataset: ListDataset, seen: Collection[str], unseen: Collection[str], *, drop_unseen_images: bool
) -> ListDataset:
    """Keep images showing a seen class; with ``drop_unseen_images``, drop any showing an unseen one."""
    seen_labels = {dataset.vocabulary.index(n) + 1 for n in seen}
    unseen_labels = {dataset.vocabulary.index(n) + 1 for n in unseen}
    keep = []
    for i in range(len(dataset)):
        labels = dataset.labels(i)
        if labels & seen_labels and not (drop_unseen_images and labels & unseen_labels):
            keep.append(i)
    return dataset.select(keep)


def drop_images_with(dataset: ListDataset, names: Collection[str]) -> ListDataset:
    """Drop every image whose mask shows one of ``names``."""
    labels = {dataset.vocabulary.index(n) + 1 for n in names}
    return dataset.select(i for i in range(len(dataset)) if not dataset.labels(i) & labels)
