"""Mosaic-4: the robustness set of the paper, read from a directory written by ``mosaic4 generate``.

Each image is a 2x2 mosaic of four FSS-1000 images of four different classes, so the class name
alone must tell the model which quarter to segment. Tiles are numbered in row-major order
(0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right); label ``j + 1`` marks the object of tile
``j`` and ``names[j]`` is its class. ``FEATURES`` is the on-disk schema, shared with the generator
so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch

from fusioner.data.base import Sample, SegDataset, files_fingerprint
from fusioner.data.registry import register_dataset
from fusioner.data.splits import Split
from fusioner.errors import ConfigError, DataError

TILES = 4

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),  # the 2x2 mosaic, RGB
        "label": datasets.Image(),  # L-mode PNG "h w": 0 = background, j + 1 = object of tile j
        "names": datasets.Sequence(datasets.Value("string"), length=TILES),  # class name per tile
        "sources": datasets.Sequence(datasets.Value("string"), length=TILES),  # "<fss folder>/<stem>"
        "query": datasets.Value("int8"),  # tile holding the query class (the first one drawn)
    }
)


def load_mosaic4(path: str | Path) -> datasets.Dataset:
    """``datasets.load_from_disk(path)``, checked to hold the Mosaic-4 columns."""
    path = Path(path)
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path} is not a dataset written by `mosaic4 generate` (no save_to_disk files found)"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(data)}); expected one Mosaic-4 split")
    missing = [name for name in FEATURES if name not in data.column_names]
    if missing:
        raise DataError(f"{path} is not a Mosaic-4 dataset: it lacks the columns {', '.join(missing)}")
    return data


class Mosaic4(SegDataset):
    """A generated Mosaic-4 set in the Sample contract: labels 0..4, ``names`` = the four tile classes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = load_mosaic4(self.path)
        # Only the id and names columns are read here; images are decoded per sample.
        self.ids: list[str] = list(self.data["id"])
        self.vocabulary = sorted({name for names in self.data["names"] for name in names})
        # Rows live inside the folder's Arrow files, so one rewritten file may change any row: every
        # item's fingerprint covers all of them (a stat per file, once).
        arrow_files = sorted(f["filename"] for f in self.data.cache_files)
        self._files_fingerprint = files_fingerprint(arrow_files, extra=str(self.path.resolve()))

    def __len__(self) -> int:
        return len(self.data)

    def item_id(self, index: int) -> str:
        return self.ids[index]

    def item_fingerprint(self, index: int) -> str:
        return self._files_fingerprint

    def __getitem__(self, index: int) -> Sample:
        row = self.data[index]
        names = tuple(row["names"])
        image = np.asarray(row["image"].convert("RGB"), dtype=np.uint8)  # h w 3
        label = np.asarray(row["label"], dtype=np.uint8)  # h w
        if label.shape != image.shape[:2] or int(label.max(initial=0)) > len(names):
            raise DataError(
                f"{self.path}: sample {index} ({row['id']}) has a label map of shape {label.shape} with "
                f"labels up to {label.max(initial=0)}; expected {image.shape[:2]} with labels 0..{len(names)}"
            )
        return Sample(
            image=torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255),  # 3 h w
            mask=torch.from_numpy(label.astype(np.int64)),  # h w
            names=names,
            id=row["id"],
        )


class _EvaluationOnly(SegDataset):
    """Stands in for the training set of an evaluation-only benchmark, and says so when used."""

    def __init__(self) -> None:
        self.vocabulary = []

    def __len__(self) -> int:
        raise ConfigError("config key 'dataset': mosaic4 is an evaluation set; train on another dataset")


@register_dataset("mosaic4")
def build_mosaic4(config) -> Split:
    """``dataset: mosaic4``: a folder written by ``mosaic4 generate`` (``data_path``), evaluation only.

    Every name is unseen: the benchmark asks whether a model trained elsewhere finds the quarter
    a class name points to, so one-way IoU over all names is its score.
    """
    if not config.data_path:
        raise ConfigError("config key 'data_path' is empty; set it to a folder written by `mosaic4 generate`")
    val = Mosaic4(config.data_path)
    return Split(train=_EvaluationOnly(), val=val, seen=[], unseen=list(val.vocabulary))
