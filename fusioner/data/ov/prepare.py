"""Converters from the official downloads to the layouts the readers read (``scripts/prepare_*.py``).

Each function reads the files as their authors publish them and writes the prepared files
atomically (a killed run leaves whole files; re-running rewrites them), returning how many it
wrote. The layouts are those of detectron2 / MaskFormer / CAT-Seg, so a folder prepared by their
scripts is read as is, and one prepared here works with theirs.

- :func:`prepare_ade150`: ``ADEChallengeData2016/annotations/validation`` (0 = other, 1..150) ->
  ``annotations_detectron2/validation`` (0..149, 255).
- :func:`prepare_ade847`: the full ADE20K release (``index_ade20k.pkl``, ``*_seg.png``) ->
  ``images_detectron2/validation`` + ``annotations_detectron2/validation`` (uint16 TIFF, 65535 =
  unlabeled), short side capped at 512 as MaskFormer's converter does.
- :func:`prepare_pascal_context`: ``trainval_merged.json`` -> ``pc59_val`` PNGs and
  ``trainval/<id>.mat`` -> ``pc459_val`` TIFFs.
- :func:`prepare_cocostuff`: ``stuffthingmaps/val2017`` -> ``stuffthingmaps_detectron2/val2017``.
- :func:`prepare_sbd`: SBD's ``cls/*.mat`` (+ VOC's own masks) -> ``VOC2012/SegmentationClassAug``.
- :func:`prepare_coco20i`: COCO 2014 instance annotations -> the class masks of COCO-20i.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fusioner.data.ov.base import read_label_map, read_names
from fusioner.data.ov.cocostuff import COCOSTUFF_IDS
from fusioner.data.ov.context import PC59_IDS
from fusioner.errors import DataError, FusionerError
from fusioner.io import atomic_write, read_json

Progress = Callable[[Iterable], Iterable]


def _quiet(items: Iterable) -> Iterable:
    return items


def _save(path: Path, array: np.ndarray, format: str) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=format))


def _remap(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    if raw.max(initial=0) >= len(lut):
        raise DataError(f"label value {raw.max()} is outside 0..{len(lut) - 1}")
    return lut[raw]


# -- ADE20K-150 ------------------------------------------------------------------------------------
def prepare_ade150(root: str | Path, progress: Progress = _quiet) -> int:
    """Shift the official labels by one: 0 ("other") -> 255, ``v`` -> ``v - 1``."""
    root = Path(root)
    src = root / "annotations" / "validation"
    files = sorted(src.glob("*.png"))
    if not files:
        raise DataError(
            f"{src} holds no annotation PNGs; expected ADEChallengeData2016/annotations/validation"
        )
    lut = np.full(256, 255, dtype=np.uint8)
    lut[1:151] = np.arange(150)
    for path in progress(files):
        _save(
            root / "annotations_detectron2" / "validation" / path.name,
            _remap(read_label_map(path), lut),
            "PNG",
        )
    return len(files)


# -- ADE20K-847 ------------------------------------------------------------------------------------
class _IndexUnpickler(pickle.Unpickler):
    """``index_ade20k.pkl`` holds a dict of lists and numpy arrays; nothing else may be built from it
    (a pickle can run any code it names, so only numpy's array constructors are let through)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"index_ade20k.pkl refers to {module}.{name}; only numpy arrays are read from it")
        return super().find_class(module, name)


def read_ade_index(path: str | Path) -> dict[str, Any]:
    """The parts of ``index_ade20k.pkl`` the converter needs: ``filename``, ``folder``, ``objectnames``."""
    path = Path(path)
    try:
        index = _IndexUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise DataError(f"ADE20K index {path} does not exist (it ships with ADE20K_2021_17_01)") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read ADE20K index {path}: {e}") from None
    missing = [k for k in ("filename", "folder", "objectnames") if k not in index]
    if missing:
        raise DataError(f"ADE20K index {path} lacks {', '.join(missing)}")
    return index


def ade_class_map(seg: np.ndarray) -> np.ndarray:
    """An ADE20K ``*_seg.png`` (``h w 3``) -> object class per pixel: ``R / 10 * 256 + G``, a 1-based
    index into the index's ``objectnames`` (0 = unlabeled); the ADE20K toolkit's rule."""
    return (seg[..., 0].astype(np.int64) // 10) * 256 + seg[..., 1].astype(np.int64)


def _short_side_at_most(h: int, w: int, limit: int) -> tuple[int, int] | None:
    if min(h, w) <= limit:
        return None
    return (limit, round(w / h * limit)) if h <= w else (round(h / w * limit), limit)


def prepare_ade847(root: str | Path, max_short_side: int = 512, progress: Progress = _quiet) -> int:
    """Validation images of the full ADE20K (``root`` = ``ADE20K_2021_17_01``) in the 847-class layout.

    Object class ``c`` becomes label ``j`` when ``objectnames[c - 1]`` is the ``j``-th name of
    ``names/ade847.txt`` (the 847 names are ADE's own object names, so the map is made by name;
    MaskFormer's converter carries a table of index ids instead, which matches this as long as the
    index lists each of the 847 names once; not checked against the real index, which the tests
    do not have); other classes and unlabeled pixels become 65535. Images whose short side exceeds
    ``max_short_side`` are shrunk to it (image bilinear, labels nearest), as MaskFormer's converter does.
    """
    root = Path(root)
    index = read_ade_index(root / "index_ade20k.pkl")
    position = {name: j for j, name in enumerate(read_names("ade847"))}
    objectnames = [str(n) for n in index["objectnames"]]
    lut = np.full(len(objectnames) + 1, 65535, dtype=np.uint16)  # class c (1-based) -> train id
    for c, name in enumerate(objectnames, start=1):
        if name in position:
            lut[c] = position[name]
    found = len(set(lut[1:].tolist()) - {65535})
    if found < len(position):
        missing = [n for n in position if n not in set(objectnames)]
        raise DataError(
            f"{root / 'index_ade20k.pkl'}: {len(missing)} of the 847 names are not ADE object names "
            f"(first: {missing[0]!r}); expected the ADE20K_2021_17_01 index"
        )
    count = 0
    pairs = [
        (str(f), str(d)) for f, d in zip(index["filename"], index["folder"], strict=True) if "_val_" in str(f)
    ]
    for file_name, folder in progress(pairs):
        folder_path = root.parent / folder if (root.parent / folder).is_dir() else root / folder
        image_path = folder_path / file_name
        seg_path = image_path.with_name(image_path.stem + "_seg.png")
        try:
            with Image.open(image_path) as im:
                image = im.convert("RGB")
            with Image.open(seg_path) as im:
                seg = np.asarray(im.convert("RGB"))
        except FileNotFoundError as e:
            raise DataError(f"ADE20K index lists {e.filename}, which does not exist") from None
        labels = ade_class_map(seg)
        if labels.max(initial=0) >= len(lut):
            raise DataError(
                f"{seg_path}: object class {labels.max()} is beyond the index's {len(objectnames)}"
            )
        out = lut[labels]
        size = _short_side_at_most(image.height, image.width, max_short_side)
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
            out = np.asarray(Image.fromarray(out).resize((size[1], size[0]), Image.NEAREST))
        stem = Path(file_name).stem
        atomic_write(
            root / "images_detectron2" / "validation" / f"{stem}.jpg",
            lambda tmp, image=image: image.save(tmp, format="JPEG", quality=95),
        )
        _save(root / "annotations_detectron2" / "validation" / f"{stem}.tif", out.astype(np.uint16), "TIFF")
        count += 1
    if not count:
        raise DataError(f"{root / 'index_ade20k.pkl'} lists no validation images (file names with _val_)")
    return count


# -- Pascal Context --------------------------------------------------------------------------------
def _decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(segmentation)


def prepare_pascal_context(root: str | Path, progress: Progress = _quiet) -> dict[str, int]:
    """Write ``annotations_detectron2/pc59_val`` and ``pc459_val`` under ``root`` (``VOC2010``).

    PC-59 from ``trainval_merged.json`` (images of phase ``val``; each segment's ``category_id``
    indexes ``labels.txt``; the 59 classes of :data:`PC59_IDS` become 0..58, everything else 255).
    PC-459 from ``trainval/<id>.mat`` (``LabelMap``, 1-based ``labels.txt`` indices -> 0..458) for the
    ids of ``pascalcontext_val.txt`` when present, else the same val images as PC-59. Either source
    may be absent; at least one must be there.
    """
    root = Path(root)
    merged, mats = root / "trainval_merged.json", root / "trainval"
    if not merged.is_file() and not mats.is_dir():
        raise DataError(f"{root} has neither trainval_merged.json (PC-59) nor trainval/ (PC-459)")
    written = {"pc59": 0, "pc459": 0}
    val_ids: list[str] = []
    if merged.is_file():
        data = read_json(merged, "Pascal Context annotation file")
        if not isinstance(data, dict) or not {"images", "annos_segmentation"} <= data.keys():
            raise DataError(
                f"{merged} is not Pascal Context's trainval_merged.json (images, annos_segmentation)"
            )
        images = {im["image_id"]: im for im in data["images"] if im.get("phase") == "val"}
        segments: dict[Any, list[dict]] = {}
        for ann in data["annos_segmentation"]:
            if ann["image_id"] in images:
                segments.setdefault(ann["image_id"], []).append(ann)
        lut = np.full(460, 255, dtype=np.uint8)
        lut[list(PC59_IDS)] = np.arange(59)
        for image_id, im in progress(images.items()):
            category = np.zeros((im["height"], im["width"]), dtype=np.int64)
            for ann in segments.get(image_id, []):
                category[_decode_rle(ann["segmentation"]) > 0] = ann["category_id"]
            stem = Path(im["file_name"]).stem
            _save(root / "annotations_detectron2" / "pc59_val" / f"{stem}.png", _remap(category, lut), "PNG")
            val_ids.append(stem)
            written["pc59"] += 1
    if mats.is_dir():
        listed = root / "pascalcontext_val.txt"
        if listed.is_file():
            val_ids = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        elif not val_ids:
            raise DataError(
                f"{root}: trainval/ needs pascalcontext_val.txt or trainval_merged.json to know the val ids"
            )
        for stem in progress(val_ids):
            label_map = _read_mat(mats / f"{stem}.mat", "LabelMap")
            if label_map.min() < 1 or label_map.max() > 459:
                raise DataError(
                    f"{mats / f'{stem}.mat'}: LabelMap values {label_map.min()}..{label_map.max()}, "
                    "expected 1..459"
                )
            _save(
                root / "annotations_detectron2" / "pc459_val" / f"{stem}.tif",
                (label_map - 1).astype(np.uint16),
                "TIFF",
            )
            written["pc459"] += 1
    return written


def _read_mat(path: Path, key: str) -> Any:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading .mat files needs scipy: pip install scipy") from None
    try:
        data = loadmat(path, squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except Exception as e:  # scipy raises several types for broken files
        raise DataError(f"cannot read {path}: {e}") from None
    if key not in data:
        raise DataError(
            f"{path} has no {key!r} (it holds {', '.join(k for k in data if not k.startswith('__'))})"
        )
    return data[key]


# -- COCO-Stuff ------------------------------------------------------------------------------------
def prepare_cocostuff(root: str | Path, split: str = "val2017", progress: Progress = _quiet) -> int:
    """``root/stuffthingmaps/<split>`` (``COCO id - 1``, 255) -> ``stuffthingmaps_detectron2/<split>``
    (the 171 used ids -> 0..170 in id order, the 11 unused ids and 255 -> 255)."""
    root = Path(root)
    src = root / "stuffthingmaps" / split
    files = sorted(src.glob("*.png"))
    if not files:
        raise DataError(
            f"{src} holds no PNGs; unzip stuffthingmaps_trainval2017.zip into {root / 'stuffthingmaps'}"
        )
    lut = np.full(256, 255, dtype=np.uint8)
    lut[[i - 1 for i in COCOSTUFF_IDS]] = np.arange(len(COCOSTUFF_IDS))
    for path in progress(files):
        _save(
            root / "stuffthingmaps_detectron2" / split / path.name, _remap(read_label_map(path), lut), "PNG"
        )
    return len(files)


# -- SBD -> SegmentationClassAug (PASCAL-5i training) -----------------------------------------------
def prepare_sbd(sbd_root: str | Path, voc_root: str | Path, progress: Progress = _quiet) -> int:
    """``VOC2012/SegmentationClassAug/<id>.png`` for every image of SBD (``sbd_root/cls/<id>.mat``,
    ``GTcls.Segmentation``: 0 = background, 1..20) and of VOC's ``SegmentationClass``.

    VOC's own mask wins where both exist: it marks object borders as ignore (255), SBD's do not.
    """
    sbd_root, voc_root = Path(sbd_root), Path(voc_root)
    cls = sbd_root / "cls" if (sbd_root / "cls").is_dir() else sbd_root / "dataset" / "cls"
    mats = {p.stem: p for p in sorted(cls.glob("*.mat"))}
    if not mats:
        raise DataError(f"{sbd_root} holds no cls/*.mat files (SBD's benchmark_RELEASE/dataset/cls)")
    voc_masks = {p.stem: p for p in sorted((voc_root / "SegmentationClass").glob("*.png"))}
    out = voc_root / "SegmentationClassAug"
    for id in progress(sorted(set(mats) | set(voc_masks))):
        if id in voc_masks:
            labels = read_label_map(voc_masks[id])
        else:
            labels = np.asarray(_read_mat(mats[id], "GTcls").Segmentation, dtype=np.int64)
        stray = set(np.unique(labels).tolist()) - set(range(21)) - {255}
        if stray:
            source = voc_masks.get(id) or mats[id]
            raise DataError(f"{source} holds labels {sorted(stray)[:5]}; expected 0..20 and 255")
        _save(out / f"{id}.png", labels.astype(np.uint8), "PNG")
    return len(set(mats) | set(voc_masks))


# -- COCO-20i --------------------------------------------------------------------------------------
def prepare_coco20i(root: str | Path, split: str = "val", progress: Progress = _quiet) -> int:
    """Render every class mask of COCO 2014 ``split`` from the instance annotations into the reader's
    mask folder (``root/fusioner_masks``; the rules are :mod:`fusioner.data.coco20i`'s). The reader
    renders missing masks itself; this does it once, ahead of time."""
    from fusioner.data.coco20i import COCOInstances

    dataset = COCOInstances(root, split)
    for id in progress(dataset.ids):
        dataset.load_mask(id)
    return len(dataset.ids)


def run_script(name: str, work: Callable[[], str]) -> int:
    """The body of a ``scripts/prepare_*.py``: run ``work`` and print the line it returns; a
    FusionerError becomes one ``name: error: ...`` line and exit code 2, as the CLI's errors do."""
    try:
        print(work())
    except FusionerError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "run_script",
    "ade_class_map",
    "prepare_ade150",
    "prepare_ade847",
    "prepare_coco20i",
    "prepare_cocostuff",
    "prepare_pascal_context",
    "prepare_sbd",
    "read_ade_index",
]
