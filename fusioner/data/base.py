"""The sample contract every dataset follows.

A sample is a dict::

    image: float32 "3 h w" in [0, 1], the image at its own size
    mask:  int64   "h w": 0 = background, i >= 1 = names[i - 1], 255 = ignore
    names: tuple[str, ...]: the class name of each label 1..len(names), in label order
    id:    str, unique and stable within the dataset (the feature cache keys on it)

Masks stay in the dataset's own label space; which names count as seen or unseen, and whether a
sample is queried one name at a time or with all names at once, is the protocol's choice
(``fusioner.engine``), never the dataset's. ``vocabulary`` lists every class name the dataset
can contain, so the engine can sample absent names as negatives.

``item_fingerprint(i)`` says whether an item's content may have changed since it was last read
(the feature cache re-encodes an item whose fingerprint differs). Readers of files give the size
and modification time of each file the item is read from (:func:`files_fingerprint`): a stat per
file, no decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import TypedDict

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fusioner.errors import DataError
from fusioner.inputs import read_image as _read_pixels

IGNORE = 255


class Sample(TypedDict):
    image: Tensor
    mask: Tensor
    names: tuple[str, ...]
    id: str


class SegDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``vocabulary`` and implement ``__len__`` / ``__getitem__``."""

    vocabulary: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def item_id(self, index: int) -> str:
        """The sample's ``id`` without decoding it; subclasses override this with a cheap lookup."""
        return self[index]["id"]

    def item_fingerprint(self, index: int) -> str:
        """A digest that changes whenever sample ``index``'s content (pixels, mask or names) may have.

        This default digests the decoded sample: right for any dataset, but it reads every item, so
        readers of files override it with :func:`files_fingerprint` of the files they read.
        """
        sample = self[index]
        h = hashlib.sha1()
        for tensor in (sample["image"], sample["mask"]):
            h.update(str(tuple(tensor.shape)).encode())
            h.update(tensor.contiguous().numpy().tobytes())
        h.update(json.dumps(list(sample["names"])).encode())
        return h.hexdigest()[:20]


def files_fingerprint(paths: Iterable[str | os.PathLike[str]], extra: str = "") -> str:
    """Digest of each file's path, size and modification time (ns), plus ``extra``: one stat per file.

    Size + mtime is what make and rsync trust: editing or replacing a file changes it without
    reading a byte. A missing file is digested as missing (reading the item then names it).
    """
    h = hashlib.sha1(extra.encode())
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"\n{os.fspath(path)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        except FileNotFoundError:
            h.update(f"\n{os.fspath(path)}\tmissing".encode())
    return h.hexdigest()[:20]


def read_image(path) -> Tensor:
    """RGB image file -> float32 ``3 h w`` in [0, 1]; unreadable files raise DataError naming the path.

    The one reader of fusioner.inputs: EXIF orientation applied, 16-bit images scaled by their depth,
    as in ``fusioner predict`` and the demo.
    """
    return _read_pixels(path)


def read_mask(path) -> Tensor:
    """Single-channel label PNG (palette or L) -> int64 ``h w``; the palette index is the label."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"mask {path} has mode {im.mode}; expected a single-channel (L or P) PNG")
            array = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"mask file {path} does not exist") from None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    return torch.from_numpy(array.astype(np.int64))
