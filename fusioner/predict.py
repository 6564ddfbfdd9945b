"""Segment users' own images with their own class names: all names in one forward pass.

Where the outputs go (:func:`plan_outputs`), and what ``--out`` may already hold:

* Each input ``x/photo.jpg`` writes ``<name>_labels.png`` and ``<name>_overlay.png`` (``--mode
  one-name``: ``<name>_mask<i>.png`` per class name i, 255 inside, in place of the label map). ``<name>`` is
  the input's stem (``photo``) when no other input of the same call shares it (compared
  case-insensitively, as macOS and Windows file systems do); inputs that share one use their file
  name (``photo.jpg``), and those still equal prepend as many parent folders as it takes, joined by
  ``__`` (``a__photo.jpg``, ``b__photo.jpg``). The rule depends on the inputs only, not their order.
* ``classes.txt`` says what each label means (line 0 background, line i = names[i-1]), the layout
  the folder dataset reads; ``predictions.json`` records every file predict wrote in ``--out``, the
  class names, and which input each output came from.
* predict never overwrites a file it did not write: any output path that exists and is not in
  ``predictions.json`` (or a ``classes.txt`` that differs from the one recorded there) is refused
  before anything is written. Re-running into the same ``--out`` replaces its own files. A run with
  other class names is refused while ``--out`` holds label maps it would not rewrite, since their
  labels would no longer match ``classes.txt``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fusioner.decide import Decision, check_refiner, refiner_as
from fusioner.errors import DataError, FusionerError
from fusioner.inputs import check_name, read_image
from fusioner.io import atomic_save_png, atomic_write_json, atomic_write_text
from fusioner.model import FusionerModel
from fusioner.progress import Counter, step
from fusioner.visualize import masks_overlay, overlay, to_uint8

MAX_NAMES = 254  # label maps are uint8 PNGs and 255 means "ignore" in every dataset
CLASSES = "classes.txt"
MANIFEST = "predictions.json"
WRITER = "fusioner predict"  # the manifest's mark: a predictions.json without it is someone else's
LABELS, OVERLAY = "_labels.png", "_overlay.png"
MASK = "_mask{}.png"  # one-name mode: one binary mask per class name, numbered as in classes.txt


def check_names(names: Sequence[str]) -> None:
    """Refuse a class list a label map cannot hold: empty, with duplicates, or over MAX_NAMES names."""
    if not names:
        raise FusionerError("--classes is empty: give at least one class name")
    for name in names:  # classes.txt holds one name a line: a line break would shift every label
        check_name(name, "--classes")
    if len(set(names)) != len(names):
        raise FusionerError(
            f"--classes has duplicate names: {sorted({n for n in names if names.count(n) > 1})}"
        )
    if len(names) > MAX_NAMES:
        raise FusionerError(f"--classes has {len(names)} names; label maps hold at most {MAX_NAMES}")


def _name_at(path: Path, level: int) -> str:
    """Level 0: the stem; 1: the file name; 2+: that many - 1 parent folders too, joined by ``__``."""
    if level == 0:
        return path.stem
    return "__".join(path.parts[1:][-level:])  # parts[0] is the root


def output_names(images: Sequence[str]) -> list[str]:
    """One distinct output name per input (see the module doc); the same file given twice is refused."""
    seen: dict[Path, str] = {}
    for given in images:  # one file under two names (a symlink, ../x) is still one file
        if (target := Path(given).resolve()) in seen:
            raise FusionerError(f"image {given} is given twice (also as {seen[target]}); give it once")
        seen[target] = given
    # Named as given: a symlink photo.jpg -> IMG_0042.jpg writes photo_labels.png, as documented.
    paths = [Path(os.path.abspath(p)) for p in images]
    levels = [0] * len(paths)
    for _ in range(max(len(p.parts) for p in paths) + 1):
        groups: dict[str, list[int]] = {}
        for i, path in enumerate(paths):
            groups.setdefault(_name_at(path, levels[i]).casefold(), []).append(i)
        clashes = [members for members in groups.values() if len(members) > 1]
        if not clashes:
            return [_name_at(path, level) for path, level in zip(paths, levels, strict=True)]
        for members in clashes:  # every member of a clash goes one level up, so the rule ignores order
            for i in members:
                levels[i] += 1
    clash = [images[i] for i in clashes[0]]
    raise FusionerError(f"images {clash} would write the same output names; rename one of them")


@dataclass(frozen=True)
class OutputPlan:
    """Every file one predict call writes, checked against what ``out`` already holds."""

    out: Path
    names: tuple[str, ...]  # the class names, label i = names[i - 1]
    images: tuple[tuple[str, str], ...]  # (input path as given, output name)
    recorded: dict[str, str]  # the existing manifest's files (output file -> its input)
    masks: bool = False  # one-name mode: a mask per class name in place of the label map

    def suffixes(self) -> list[str]:
        maps = [MASK.format(i) for i in range(1, len(self.names) + 1)] if self.masks else [LABELS]
        return [*maps, OVERLAY]

    def files(self) -> dict[str, str]:
        """Output file name -> the input it comes from, for this call."""
        return {
            name + suffix: str(Path(image).resolve())
            for image, name in self.images
            for suffix in self.suffixes()
        }


def _refuse_foreign(path: Path) -> DataError:
    return DataError(f"{path} exists and fusioner predict did not write it; choose another --out")


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        raise _refuse_foreign(path) from None
    ours = isinstance(manifest, dict) and manifest.get("written_by") == WRITER
    if (
        not ours
        or not isinstance(manifest.get("files"), dict)
        or not isinstance(manifest.get("classes"), list)
    ):
        raise _refuse_foreign(path)
    return manifest


def _classes_text(names: Sequence[str]) -> str:
    return "\n".join(["background", *names]) + "\n"


def _is_map(file: str) -> bool:
    """A label map or a one-name mask: files whose values mean class numbers of classes.txt."""
    return file.endswith(LABELS) or re.search(r"_mask\d+\.png$", file) is not None


def plan_outputs(
    images: Sequence[str], names: Sequence[str], out: Path, *, masks: bool = False
) -> OutputPlan:
    """Name every output and refuse, before anything is written, to replace a file predict did not write.

    Raises FusionerError naming the first such file, a missing input, or (with other class names than
    the recorded ones) a label map of an earlier call that this call would leave behind.
    """
    check_names(names)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; expected a folder")
    for image in images:
        if not Path(image).is_file():
            raise DataError(f"image file {image} does not exist")
    plan_images = tuple(zip(images, output_names(images), strict=True))
    manifest = _read_manifest(out) or {"files": {}, "classes": None}
    plan = OutputPlan(out, tuple(names), plan_images, dict(manifest["files"]), masks)
    classes = out / CLASSES
    if classes.exists() and (
        manifest["classes"] is None or classes.read_bytes() != _classes_text(manifest["classes"]).encode()
    ):
        raise _refuse_foreign(classes)
    for file in plan.files():
        if (out / file).exists() and file not in plan.recorded:
            raise _refuse_foreign(out / file)
    if manifest["classes"] is not None and list(manifest["classes"]) != list(names):
        stale = sorted(
            f for f in plan.recorded if _is_map(f) and f not in plan.files() and (out / f).exists()
        )
        if stale:
            raise DataError(
                f"--out {out} holds {len(stale)} label maps made with other class names "
                f"({', '.join(manifest['classes'])}), e.g. {out / stale[0]}, which classes.txt would no "
                f"longer describe; choose another --out or delete them"
            )
    return plan


def write_predictions(plan: OutputPlan, segment: Callable[[Tensor], Tensor]) -> list[Path]:
    """Run ``segment`` on each input and write its label map (or masks) and overlay, with
    ``classes.txt`` and ``predictions.json``.

    ``segment``: float ``3 h w`` in [0, 1] -> integer labels ``h w`` (0 = background), or with
    ``plan.masks`` bool masks ``k h w``. Any predictor (the PyTorch model, an exported one) writes
    through this one function, so every one of them names and guards its outputs the same way.
    """
    out, names = plan.out, list(plan.names)
    # The manifest goes first, listing every file about to be written: a call killed half-way
    # leaves files that the next call still knows as its own.
    files = {**plan.recorded, **plan.files()}
    atomic_write_json(out / MANIFEST, {"written_by": WRITER, "classes": names, "files": files})
    atomic_write_text(out / CLASSES, _classes_text(names))
    written = []
    counter = Counter(len(plan.images), "predict")
    for image_path, name in plan.images:
        image = read_image(image_path)
        answer = segment(image).cpu()
        if plan.masks:
            masks = answer.bool().numpy()  # k h w
            for i, mask in enumerate(masks, start=1):
                png = Image.fromarray(mask.astype(np.uint8) * 255)
                written.append(atomic_save_png(out / f"{name}{MASK.format(i)}", png))
            picture = masks_overlay(to_uint8(image), masks, names)
        else:
            labels = answer.to(torch.uint8).numpy()  # h w
            written.append(atomic_save_png(out / f"{name}{LABELS}", Image.fromarray(labels)))
            picture = overlay(to_uint8(image), labels.astype(np.int64), names)
        written.append(atomic_save_png(out / f"{name}{OVERLAY}", picture))
        counter.advance(Path(image_path).name)
    return written


def choose_decision(
    model: FusionerModel, *, threshold: float | None, mode: str, seen_bias: float | None, inference: str
) -> tuple[Decision, frozenset[str]]:
    """The settings of one predict call and the names the seen bias applies to.

    ``threshold`` None: the model's own; ``seen_bias`` None: the calibration in the run's
    metrics.json (none found: 0, the plain rule).
    """
    calibration = model.calibration
    if seen_bias is None:
        seen_bias = calibration.seen_bias if calibration else 0.0
    elif seen_bias and calibration is None:
        raise FusionerError(
            "--seen-bias needs the names the model was trained on, from its run's metrics.json "
            "(fusioner eval writes it); none found beside the model"
        )
    threshold = model.threshold if threshold is None else threshold
    decision = Decision(threshold, mode, seen_bias, inference)
    return decision, calibration.seen if calibration else frozenset()


@torch.no_grad()
def predict_images(
    model_source: str,
    images: list[str],
    names: list[str],
    out: Path,
    *,
    threshold: float | None = None,
    mode: str = "best-name",
    seen_bias: float | None = None,
    refine: str = "",
    inference: str = "fixed",
) -> list[Path]:
    """Write a label map (or masks) and an overlay per image into ``out`` (see the module doc).

    ``threshold`` default the model's; ``seen_bias`` default the run's calibration; ``refine`` a
    refiner of fusioner.methods ("" = the model's own); ``inference`` fixed | sliding.
    """
    # Bad values and refused outputs before the model loads: a refusal costs nothing.
    Decision(0.5 if threshold is None else threshold, mode, seen_bias or 0.0, inference)
    check_refiner(refine)
    plan = plan_outputs(images, names, out, masks=mode == "one-name")
    with step(f"loading model {model_source}"):
        model = FusionerModel.from_pretrained(model_source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    decision, seen = choose_decision(
        model, threshold=threshold, mode=mode, seen_bias=seen_bias, inference=inference
    )
    flags = torch.tensor([n in seen for n in names], dtype=torch.bool)

    def segment(image: Tensor) -> Tensor:
        with refiner_as(model, refine):
            logits = model.logits(image.to(device), names, mode=decision.inference)
        return decision.apply(logits, flags)

    return write_predictions(plan, segment)
