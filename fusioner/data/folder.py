"""A folder of the user's own images and label masks.

Layout::

    ROOT/classes.txt          one name per line; line i names label i; line 0 names the
                              background (label 0), which is never queried as a class
    ROOT/images/NAME.jpg      (or .jpeg / .png)
    ROOT/masks/NAME.png       single-channel uint8 labels, 255 = ignore
    ROOT/splits/train.txt     optional, one NAME per line (also val.txt, test.txt)

Without ``splits/``, the validation set is the 20% of names ranked first by the SHA-1 of the
name (:func:`fusioner.data.splits.seeded_val_names`) and the training set is the rest: fixed
for a given set of names, whatever the seed or library versions.

When checks run: everything that a directory listing and the text files reveal is checked on
construction (classes.txt empty, blank or duplicate names; an image without a mask or a mask
without an image; two images with one name; a split list naming a missing image). What needs
the pixels is checked when a sample or its labels are read (an unreadable image, a mask whose
size differs from its image, a label that classes.txt does not define), so opening a large
folder stays cheap; each error names the offending file.
"""

from __future__ import annotations

from pathlib import Path

from fusioner.config import Config
from fusioner.data.base import IGNORE
from fusioner.data.registry import register_dataset
from fusioner.data.splits import (
    ListDataset,
    Split,
    read_name_list,
    seeded_val_names,
    split_names,
    training_subset,
)
from fusioner.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")


def read_classes(path: Path) -> list[str]:
    """classes.txt -> all names, background first; refuses empty, blank or duplicate lines."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        raise DataError(f"class list {path} does not exist (one name per line, background first)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read class list {path}: {e}") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"class list {path} is empty; expected the background name, then one class per line")
    if "" in lines:
        raise DataError(f"class list {path}, line {lines.index('') + 1} is blank; line i names label i")
    if len(lines) < 2:
        raise DataError(f"class list {path} names only the background ({lines[0]!r}); add at least one class")
    if len(lines) > IGNORE:
        raise DataError(f"class list {path} has {len(lines)} lines; labels must stay below {IGNORE} (ignore)")
    duplicates = sorted({n for n in lines if lines.count(n) > 1})
    if duplicates:
        raise DataError(f"class list {path} names {', '.join(map(repr, duplicates))} more than once")
    return lines


class FolderDataset(ListDataset):
    """``split`` of a dataset folder (layout in the module docstring); labels 1..N = classes.txt."""

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root)
        if split not in SPLITS:
            raise ConfigError(f"folder dataset split {split!r} is not one of {', '.join(SPLITS)}")
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist")
        self.split = split
        classes_file = self.root / "classes.txt"
        classes = read_classes(classes_file)
        self.background = classes[0]
        self.label_source = str(classes_file)
        self._images = self._pair_files()
        ids = self._split_ids(split)
        if not ids:
            raise DataError(f"the {split} split of {self.root} holds no images")
        super().__init__(ids, classes[1:])

    def _pair_files(self) -> dict[str, Path]:
        """NAME -> image path, after checking that images and masks pair up one to one."""
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise DataError(f"dataset folder {self.root} has no {d.name}/ folder")
        images: dict[str, Path] = {}
        for p in sorted(image_dir.iterdir()):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if p.stem in images:
                raise DataError(f"two images are named {p.stem!r}: {images[p.stem]} and {p}")
            images[p.stem] = p
        # The mask's own file name: masks/x.PNG pairs with images/x.jpg, and is then read as x.PNG.
        self._masks: dict[str, Path] = {}
        for p in sorted(mask_dir.iterdir()):
            if p.suffix.lower() == ".png":
                if p.stem in self._masks:
                    raise DataError(f"two masks are named {p.stem!r}: {self._masks[p.stem]} and {p}")
                self._masks[p.stem] = p
        masks = set(self._masks)
        unmasked = sorted(set(images) - masks)
        if unmasked:
            raise DataError(
                f"{len(unmasked)} images have no mask in {mask_dir}: "
                + ", ".join(str(images[n]) for n in unmasked[:5])
            )
        orphans = sorted(masks - set(images))
        if orphans:
            raise DataError(
                f"{len(orphans)} masks have no image in {image_dir}: "
                + ", ".join(str(self._masks[n]) for n in orphans[:5])
            )
        if not images:
            raise DataError(f"{image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return images

    def _split_ids(self, split: str) -> list[str]:
        split_dir = self.root / "splits"
        if not split_dir.is_dir():
            if split == "test":
                raise DataError(f"{split_dir / 'test.txt'} does not exist; a test split must be listed")
            val = seeded_val_names(list(self._images))
            return [n for n in self._images if (n in val) == (split == "val")]
        path = split_dir / f"{split}.txt"
        ids = read_name_list(path)
        missing = [n for n in ids if n not in self._images]
        if missing:
            raise DataError(f"{path} lists {len(missing)} names with no image: {', '.join(missing[:5])}")
        if len(set(ids)) != len(ids):
            raise DataError(f"{path} lists a name more than once")
        return ids

    def image_path(self, id: str) -> Path:
        return self._images[id]

    def mask_path(self, id: str) -> Path:
        return self._masks[id]


@register_dataset("folder")
def build_folder(config: Config) -> Split:
    """Train on ``train`` (or the seeded 80%), choose on ``val``, report on ``val`` or ``test``
    (``eval_split``); ``unseen_classes`` are held out."""
    if not config.data_path:
        raise ConfigError("config key 'data_path' is empty; set it to the dataset folder")
    train = FolderDataset(config.data_path, "train")
    seen, unseen = split_names(train.vocabulary, config.unseen_classes, train.label_source)
    # The rule PASCAL-5i / COCO-20i follow (data/splits.py): an image without a seen class would be
    # all background once the held-out names are mapped away.
    train = training_subset(train, seen, unseen, drop_unseen_images=config.drop_unseen_images)
    # The test split is opened only when asked for: a folder without splits/test.txt is fine otherwise.
    test = FolderDataset(config.data_path, "test") if config.eval_split == "test" else None
    return Split(
        train=train,
        val=FolderDataset(config.data_path, "val"),
        seen=seen,
        unseen=unseen,
        test=test,
        name=f"folder dataset {config.data_path}",
    )
