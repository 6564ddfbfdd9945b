"""Pictogram scenes, the quickstart's dataset: reading a folder that :mod:`fusioner.pictograms` wrote.

Layout of a generated folder (:func:`fusioner.pictograms.generate_scenes`)::

    images/<id>.png   RGB scene
    masks/<id>.png    L: 0 = background, i = names[i - 1] of the scene
    scenes.jsonl      one {"id", "split", "names", "glyphs", "boxes"} per line; boxes are
                      [x0, y0, x1, y1) of each pasted glyph, in label order
    names.json        {"seen", "unseen", "params", ...}: written last, it marks a complete folder

The val split holds unseen and seen names, so it serves both the zero-shot protocol (unseen names
only) and the generalized one (seen + unseen, hIoU); see :mod:`fusioner.pictograms` for the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fusioner.data.base import Sample, SegDataset, files_fingerprint, read_image, read_mask
from fusioner.data.registry import register_dataset
from fusioner.data.splits import Split
from fusioner.errors import ConfigError, DataError
from fusioner.io import read_json

SPLITS = ("train", "val")
# The folder's layout: written by fusioner.pictograms.scenes, read here.
IMAGES, MASKS = "images", "masks"
SCENES = "scenes.jsonl"
MANIFEST = "names.json"  # written last: its presence marks a complete folder


def read_manifest(root: str | Path) -> dict[str, Any]:
    """``names.json`` of a complete generation: ``seen``, ``unseen``, ``params``, ``glyphs``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{root} holds no complete pictogram generation ({path} is missing); run generate_scenes()"
        )
    manifest = read_json(path, "pictogram manifest")
    for key in ("seen", "unseen", "params"):
        if key not in manifest:
            raise DataError(f"{path} has no key {key!r}")
    return manifest


class PictogramScenes(SegDataset):
    """One split ("train" or "val") of a folder written by :func:`fusioner.pictograms.generate_scenes`.

    ``vocabulary`` is the seen names for "train" and seen + unseen for "val"; ``seen`` and
    ``unseen`` are the two sorted lists of the split.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        if split not in SPLITS:
            raise ConfigError(f"pictogram split {split!r} is not one of {', '.join(SPLITS)}")
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.seen: list[str] = list(manifest["seen"])
        self.unseen: list[str] = list(manifest["unseen"])
        self.vocabulary = self.seen if split == "train" else self.seen + self.unseen
        path = self.root / SCENES
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            scenes = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        self.scenes = [s for s in scenes if s.get("split") == split]
        self.split = split

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> Sample:
        scene = self.scenes[index]
        image = read_image(self.root / IMAGES / f"{scene['id']}.png")
        mask = read_mask(self.root / MASKS / f"{scene['id']}.png")
        names = tuple(scene["names"])
        if int(mask.max()) > len(names):
            raise DataError(
                f"mask of scene {scene['id']} in {self.root} has label {int(mask.max())} "
                f"but the scene names only {len(names)} classes"
            )
        return {"image": image, "mask": mask, "names": names, "id": scene["id"]}

    def item_id(self, index: int) -> str:
        return self.scenes[index]["id"]

    def item_fingerprint(self, index: int) -> str:
        scene = self.scenes[index]
        files = [self.root / IMAGES / f"{scene['id']}.png", self.root / MASKS / f"{scene['id']}.png"]
        # The names come from scenes.jsonl, not from a file of their own.
        return files_fingerprint(files, extra=json.dumps(scene["names"]))


@register_dataset("pictograms")
def build_pictograms(config) -> Split:
    """``dataset: pictograms``: the folder ``data_path`` (written by ``generate_scenes``)."""
    train, val = PictogramScenes(config.data_path, "train"), PictogramScenes(config.data_path, "val")
    return Split(train=train, val=val, seen=train.seen, unseen=train.unseen)
