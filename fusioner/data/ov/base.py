"""The common shape of the open-vocabulary benchmarks: images, label maps, one fixed name list.

Every reader of this package yields the :class:`~fusioner.data.base.Sample` contract with the
dataset's *whole* name list as ``names``: label ``j + 1`` is ``names[j]``. These benchmarks label
every pixel with a name or leave it unlabeled, so label 0 (background) never occurs; unlabeled
pixels are ``dataset.ignore_index``. That is :data:`~fusioner.data.base.IGNORE` (255) for lists
shorter than 255 names; ADE20K-847 and Pascal Context-459 have names whose label would be 255,
so there it is -1 (masks are int64 in memory; the files themselves are 16-bit).

Each dataset registers an :class:`OVSpec` under its ``dataset:`` name: where its prepared layout
lives under the suite's ``data_root``, the file whose presence says it is there, how to get it
there, and its standard evaluation setting. Name lists are package data, one text file per
dataset in ``names/`` (one name a line, label order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image

from fusioner.data.base import IGNORE, Sample, SegDataset, files_fingerprint, read_image
from fusioner.data.registry import register_dataset
from fusioner.data.splits import Split
from fusioner.errors import ConfigError, DataError

NAMES_DIR = Path(__file__).resolve().parent / "names"


@cache
def read_names(key: str) -> tuple[str, ...]:
    """The name list ``names/<key>.txt`` shipped with the package, in label order."""
    path = NAMES_DIR / f"{key}.txt"
    try:
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        raise DataError(f"name list {path} is missing from the installed package") from None
    if len(set(names)) != len(names):
        raise DataError(f"name list {path} names a class twice")
    return names


def read_label_map(path: Path) -> np.ndarray:
    """A single-channel label image (8-bit PNG, palette PNG or 16-bit TIFF / PNG) -> its raw values."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I;16B", "I", "I;16L"):
                raise DataError(
                    f"label map {path} has mode {im.mode}; expected a single-channel 8 or 16-bit image"
                )
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise DataError(f"label map {path} does not exist") from None
    except DataError:
        raise
    except Exception as e:  # PIL raises several unrelated types for broken files
        raise DataError(f"cannot read label map {path}: {e}") from None


def offset_lut(num_names: int, ignore_index: int, size: int = 2**16) -> np.ndarray:
    """Raw value ``v < num_names`` -> label ``v + 1`` (the detectron2 layouts' 0-based train ids);
    every other value (255 / 65535 = unlabeled) -> ``ignore_index``."""
    lut = np.full(size, ignore_index, dtype=np.int64)
    lut[:num_names] = np.arange(1, num_names + 1)
    return lut


class OVDataset(SegDataset):
    """``(id, image file, label file)`` triples, raw label values mapped through ``lut``."""

    def __init__(
        self, name: str, names: Sequence[str], items: Sequence[tuple[str, Path, Path]], lut: np.ndarray
    ) -> None:
        if not items:
            raise DataError(f"{name}: no images found")
        self.name = name
        self.names = tuple(names)
        self.vocabulary = list(self.names)
        self.ignore_index = IGNORE if len(self.names) < IGNORE else -1
        self.items = list(items)
        self.lut = torch.from_numpy(lut)

    def __len__(self) -> int:
        return len(self.items)

    def item_id(self, index: int) -> str:
        return self.items[index][0]

    def item_fingerprint(self, index: int) -> str:
        return files_fingerprint(self.items[index][1:])

    def load_mask(self, index: int) -> torch.Tensor:
        """int64 ``h w``: label ``j + 1`` = ``names[j]``, unlabeled = ``ignore_index``."""
        _, _, mask_path = self.items[index]
        raw = read_label_map(mask_path)
        if raw.ndim != 2:
            raise DataError(f"label map {mask_path} has shape {raw.shape}; expected h w")
        if raw.min(initial=0) < 0 or raw.max(initial=0) >= len(self.lut):
            raise DataError(f"label map {mask_path} holds values outside 0..{len(self.lut) - 1}")
        return self.lut[torch.from_numpy(raw)]

    def __getitem__(self, index: int) -> Sample:
        id, image_path, mask_path = self.items[index]
        image = read_image(image_path)
        mask = self.load_mask(index)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise DataError(
                f"label map {mask_path} is {tuple(mask.shape)} but its image {image_path} is "
                f"{tuple(image.shape[-2:])}; expected the same size"
            )
        return Sample(image=image, mask=mask, names=self.names, id=id)


def paired_files(
    image_dir: Path, image_suffix: str, mask_dir: Path, mask_suffix: str, what: str
) -> list[tuple[str, Path, Path]]:
    """Every ``mask_dir/<id><mask_suffix>`` with its ``image_dir/<id><image_suffix>``, sorted by id.

    The label maps define the split (the prepared layouts hold only evaluated images); a label
    map without its image is an error naming both paths.
    """
    if not mask_dir.is_dir():
        raise DataError(f"{what}: label folder {mask_dir} does not exist")
    items, missing = [], []
    for mask in sorted(mask_dir.glob(f"*{mask_suffix}")):
        id = mask.name[: -len(mask_suffix)]
        image = image_dir / f"{id}{image_suffix}"
        (items if image.is_file() else missing).append((id, image, mask))
    if missing:
        raise DataError(
            f"{what}: {len(missing)} label maps in {mask_dir} have no image in {image_dir} "
            f"(first: {missing[0][1]})"
        )
    if not items:
        raise DataError(f"{what}: {mask_dir} holds no *{mask_suffix} label maps")
    return items


@dataclass(frozen=True)
class OVSpec:
    """One suite dataset: how to open it and how the suite scores it."""

    name: str
    title: str  # the column header papers use, e.g. "A-847"
    root: str  # its folder under data_root
    marker: str  # relative to root: the prepared label folder whose presence means "found"
    how: str  # how to get the layout there, said when the dataset is not found
    open: Callable[[Path], OVDataset]  # root -> the validation set
    short_side: int = 512  # images are resized so their short side is this, aspect kept
    mode: str = "sliding"  # fusioner/inference.py mode over the resized image


_SPECS: dict[str, OVSpec] = {}
# dataset name -> its spec, in registration order (the suite table's column order).
OV_DATASETS: Mapping[str, OVSpec] = MappingProxyType(_SPECS)


class _EvaluationOnly(SegDataset):
    def __init__(self, name: str) -> None:
        self.name, self.vocabulary = name, []

    def __len__(self) -> int:
        raise ConfigError(f"config key 'dataset': {self.name} is an evaluation set; train on another dataset")


def register_ov(spec: OVSpec) -> OVSpec:
    """Record ``spec`` for the suite and register ``dataset: <name>`` (``data_path`` = its root)."""
    if spec.name in _SPECS:
        raise ValueError(f"open-vocabulary dataset {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec

    @register_dataset(spec.name)
    def build(config) -> Split:
        if not config.data_path:
            raise ConfigError(f"config key 'data_path' is empty; set it to the {spec.root} folder")
        val = spec.open(Path(config.data_path))
        # Every name is "unseen": these sets test transfer to names a model was not trained on.
        return Split(train=_EvaluationOnly(spec.name), val=val, seen=[], unseen=list(val.names))

    return spec
