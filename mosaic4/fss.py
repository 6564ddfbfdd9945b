"""FSS-1000 on disk: ``ROOT/<class folder>/<k>.jpg`` images, each with a binary mask ``<k>.png``.

Releases of FSS-1000 differ in how masks are stored (0/255 grey, 0/1 grey, or grey written as
RGB); all of them are read here as one boolean array, and anything else is refused with the file
named, because a wrong mask would silently put the wrong pixels under a class name.

Class splits are plain text lists of class folder names, one per line (the FSS-1000 authors'
lists and the copies HSNet / LSeg use have this form).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fusioner.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg")
MASK_SUFFIX = ".png"


@dataclass(frozen=True)
class FSSImage:
    """One image/mask pair of a class folder."""

    image: Path
    mask: Path

    @property
    def id(self) -> str:
        """``<class folder>/<stem>``: stable across machines, unlike the absolute path."""
        return f"{self.image.parent.name}/{self.image.stem}"


@dataclass(frozen=True)
class FSSClass:
    """A class folder and its image/mask pairs, in a fixed order (numeric stems numerically)."""

    path: Path
    images: tuple[FSSImage, ...]

    @property
    def folder(self) -> str:
        return self.path.name

    @property
    def name(self) -> str:
        return class_name(self.path.name)


def class_name(folder: str) -> str:
    """FSS folder name -> class name as words: ``ab_wheel`` -> ``ab wheel``."""
    return " ".join(part for part in folder.split("_") if part)


def read_class_list(path: str | Path) -> list[str]:
    """A split file -> class folder names; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"class list {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read class list {path}: {e}") from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"class list {path} names no classes; expected one class folder name per line")
    seen: set[str] = set()
    duplicates = sorted({name for name in names if name in seen or seen.add(name)})
    if duplicates:
        raise DataError(f"class list {path} names these classes more than once: {', '.join(duplicates)}")
    return names


def _stem_key(path: Path) -> tuple[int, int | str]:
    # FSS stems are 1..10; numeric order keeps "10" after "9", so the order (and therefore
    # which image a seed picks) does not depend on how the file system lists the folder.
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # PIL raises several unrelated types for broken files
        raise DataError(f"cannot read {path}: {e}") from None


def scan_class(folder: Path, min_images: int = 1) -> FSSClass:
    """Pair every image of ``folder`` with its mask and check that their sizes agree.

    Only file headers are read here; mask values are checked by :func:`load_mask` when used.
    """
    files = sorted((f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")), key=_stem_key)
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    masks = {f.stem: f for f in files if f.suffix.lower() == MASK_SUFFIX}
    stems = [image.stem for image in images]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise DataError(f"class folder {folder} has more than one image named {', '.join(twice)}")
    orphans = sorted(set(masks) - set(stems))
    if orphans:
        raise DataError(f"mask {masks[orphans[0]]} has no image {orphans[0]}.jpg beside it")
    pairs = []
    for image in images:
        mask = masks.get(image.stem)
        if mask is None:
            raise DataError(f"image {image} has no mask {image.with_suffix(MASK_SUFFIX).name} beside it")
        image_size, mask_size = _image_size(image), _image_size(mask)
        if image_size != mask_size:
            raise DataError(
                f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image.name} is "
                f"{image_size[0]}x{image_size[1]}; expected the same size"
            )
        pairs.append(FSSImage(image=image, mask=mask))
    if len(pairs) < min_images:
        raise DataError(
            f"class folder {folder} has {len(pairs)} image/mask pairs; at least {min_images} needed"
        )
    return FSSClass(path=folder, images=tuple(pairs))


def scan_fss(root: str | Path, classes: Sequence[str] | None = None, min_images: int = 1) -> list[FSSClass]:
    """The classes of an FSS-1000 tree, sorted by folder name.

    ``classes`` restricts the scan to these folder names (a split list); by default every class
    folder under ``root`` is used. Sorting makes the result depend on the set of classes only,
    so a reordered split file yields the same mosaics.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"FSS-1000 root {root} is not a directory")
    if classes is None:
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise DataError(f"FSS-1000 root {root} has no class folders; expected ROOT/<class>/<k>.jpg")
    else:
        folders = sorted(root / name for name in set(classes))
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(f"{len(missing)} classes of the class list have no folder: {shown}")
    return [scan_class(folder, min_images=min_images) for folder in folders]


def load_image(path: Path) -> Image.Image:
    """An image file as RGB (FSS-1000 has a few greyscale JPEGs)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def load_mask(path: Path) -> np.ndarray:
    """A binary mask file -> bool ``h w``.

    Accepted: grey (L, 1, palette or LA) or RGB(A) with equal channels, holding only the values
    {0, 255} or only {0, 1}. Anything else (colours, other values) is refused with the file named.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode == "P":
                im, mode = im.convert("RGB"), "RGB"
            if mode not in ("1", "L", "LA", "RGB", "RGBA"):
                raise DataError(f"mask {path} has image mode {mode}; expected a grey or RGB binary mask")
            array = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    if array.ndim == 3:  # h w c: drop alpha, then all colour channels must agree
        channels = array[..., :1] if mode == "LA" else array[..., :3]
        if (channels != channels[..., :1]).any():
            raise DataError(f"mask {path} has colours; expected a binary mask (0/255 or 0/1, grey or RGB)")
        array = channels[..., 0]
    values = set(np.unique(array).tolist())
    if values <= {0, 255}:
        return array == 255
    if values <= {0, 1}:
        return array == 1
    shown = ", ".join(str(v) for v in sorted(values)[:8])
    raise DataError(f"mask {path} has values {{{shown}}}; expected only 0/255 or only 0/1")
