"""What users hand to ``predict``: images in any common form, names as a list or one string.

One reader of image files serves ``fusioner predict``, every training / evaluation dataset and the
demo (:func:`open_image`), so a photo means the same pixels everywhere:

* EXIF orientation is applied: a phone photo is segmented upright, as every viewer shows it, and
  a mask drawn on that view lines up with it in training.
* 16-bit images (PNG / TIFF, grey or colour) are scaled by their bit depth: Pillow's own
  ``convert("RGB")`` clips 16-bit grey values to 255, which turns nearly every pixel white.

:func:`as_pixels` turns a PIL image, an ``h w 3`` uint8 array, a file path or a float tensor into
the ``3 h w`` float tensor in [0, 1] the model takes; :func:`parse_names` turns ``"cat, dog"`` or
``["cat", "dog"]`` into a checked list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from fusioner.errors import DataError, FusionerError

# PIL modes holding one 16-bit (or wider integer) channel; "I" is how Pillow opens many 16-bit PNGs.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ImageLike = Image.Image | np.ndarray | Tensor | str | os.PathLike


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> ``h w 3`` uint8, upright (EXIF applied) and scaled by its bit depth."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GREY:
        grey = np.asarray(image).astype(np.float64)
        # "I" may also be a true 32-bit image: scale by what the values need, 16 bits at least.
        top = 65535.0 if grey.max(initial=0) <= 65535 else float(grey.max())
        grey = np.clip(grey, 0, None) / top
        return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    if image.mode == "F":  # float images: taken as [0, 1]
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
        return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    # 48 / 64-bit colour PNGs open as RGB / RGBA with the high byte of each value: already scaled.
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def open_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> ``h w 3`` uint8 (see the module doc); a DataError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            return to_rgb_array(image)
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"image file {path} is a folder, not an image") from None
    except Exception as e:  # PIL raises several unrelated types for broken files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def read_image(path: str | os.PathLike) -> Tensor:
    """An image file -> float32 ``3 h w`` in [0, 1]."""
    return array_to_tensor(open_image(path))


def array_to_tensor(array: np.ndarray) -> Tensor:
    """``h w 3`` uint8 -> float32 ``3 h w`` in [0, 1]."""
    if not array.flags.writeable:  # np.asarray of a PIL image is read-only; torch wants its own copy
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255)


def _array_pixels(array: np.ndarray, what: str) -> Tensor:
    """``h w``, ``h w 1|3|4`` arrays (uint8, uint16 or float in [0, 1]) -> ``3 h w`` float."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise FusionerError(f"{what}: expected an array 'h w 3' (or 'h w', 'h w 4'), got shape {array.shape}")
    array = array[..., :3] if array.shape[2] != 1 else np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255
    elif array.dtype == np.uint16:
        values = array.astype(np.float32) / 65535
    elif np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise FusionerError(
                f"{what}: float values run from {values.min():g} to {values.max():g}; expected [0, 1] "
                "(or give uint8 pixels)"
            )
    else:
        raise FusionerError(f"{what}: expected uint8, uint16 or float pixels, got {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(values)).permute(2, 0, 1)


def as_pixels(image: Any, what: str = "image") -> Tensor:
    """One image in any supported form -> float ``3 h w`` in [0, 1] (tensors pass through unchanged:
    the model checks their range, so 0-255 floats are refused there, never silently rescaled)."""
    if isinstance(image, Tensor):
        return image
    if isinstance(image, Image.Image):
        return array_to_tensor(to_rgb_array(image))
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if isinstance(image, np.ndarray):
        return _array_pixels(image, what)
    raise FusionerError(
        f"{what}: expected a PIL image, an 'h w 3' uint8 array, a file path or a float tensor, "
        f"got {type(image).__name__}"
    )


def as_images(images: Any) -> tuple[Tensor | list[Tensor], bool]:
    """``predict``'s ``images`` -> (what :meth:`FusionerModel.logits` takes, whether one image was given).

    A single item (PIL image, array, path, ``3 h w`` tensor) gives one image; a ``b 3 h w`` tensor
    stays a batch; a list or tuple gives a list (of images of any sizes).
    """
    if isinstance(images, Tensor):
        return images, images.ndim != 4
    if isinstance(images, np.ndarray) and images.ndim == 4:  # b h w c: a batch, as a b 3 h w tensor
        return torch.stack([as_pixels(a, f"image {i}") for i, a in enumerate(images)]), False
    if isinstance(images, (list, tuple)):
        if not images:
            raise FusionerError("no images given")
        return [as_pixels(im, f"image {i}") for i, im in enumerate(images)], False
    return as_pixels(images), True


def check_name(name: Any, where: str = "names") -> str:
    """One stripped class name; refuses non-strings, empty names and line breaks (one name per line
    in ``classes.txt``: a name with a newline would shift every label after it)."""
    if not isinstance(name, str):
        raise FusionerError(f"{where}: class names must be strings, got {type(name).__name__} {name!r}")
    name = name.strip()
    if len(name.splitlines()) > 1:  # every line break str.splitlines knows, as a text reader would
        raise FusionerError(f"{where}: the name {name!r} holds a line break; give each name on one line")
    if not name:
        raise FusionerError(f"{where}: empty class name")
    return name


def parse_names(names: str | Sequence[str], where: str = "names") -> list[str]:
    """``"cat, dog"`` or ``["cat", "dog"]`` -> ``["cat", "dog"]``; empty entries of a string are skipped,
    duplicates and line breaks refused."""
    if isinstance(names, str):
        given = [n for n in names.split(",") if n.strip()]
    elif isinstance(names, Sequence):
        given = list(names)
    else:
        raise FusionerError(
            f"{where}: expected a list of names or one comma-separated string, got {type(names).__name__}"
        )
    out = [check_name(n, where) for n in given]
    if not out:
        raise FusionerError(f"{where} is empty: give at least one class name")
    # The text models lower-case their input ("Cat" and "cat" embed identically): such twins would
    # split one class's pixels between two labels by chance, so they count as duplicates too.
    folded = [n.casefold() for n in out]
    duplicates = sorted({n for n, f in zip(out, folded, strict=True) if folded.count(f) > 1})
    if duplicates:
        raise FusionerError(f"{where} has duplicate names: {', '.join(duplicates)}")
    return out
