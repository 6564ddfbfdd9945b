"""What the demo does with one request, without Gradio: names, image, settings -> a segmentation.

The page (fusioner/demo/app.py) only turns controls into a :class:`Settings` and a
:class:`Segmentation` into components, so every rule here is tested by plain function calls.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from fusioner.calibration import Calibration, read_calibration  # noqa: F401 (app.py and tests import it here)
from fusioner.decide import refiner_as, refiner_name  # noqa: F401 (app.py imports refiner_name here)
from fusioner.errors import FusionerError
from fusioner.inference import MODES, labels_from_logits
from fusioner.inputs import check_name
from fusioner.io import atomic_save_png
from fusioner.model import FusionerModel
from fusioner.predict import MAX_NAMES
from fusioner.visualize import colour_labels, overlay, palette

# Phone photos are 12 Mpx: the head sees image_size pixels anyway, and full-size logits, overlays and
# heat maps would only slow the page down.
MAX_SIDE = 1024
HEATMAP_SIDE = 320  # gallery thumbnails: one per name, up to MAX_NAMES of them


@dataclass(frozen=True)
class Settings:
    """What the page's controls choose; a new control is a field here and a component in app.py."""

    threshold: float
    seen_bias: float = 0.0
    mode: str = "fixed"
    refine: str = ""  # a name of fusioner.methods.REFINERS; "" = the model's own (as trained)


@dataclass
class Segmentation:
    """One request's result. ``labels`` ``h w`` (0 = background, i = names[i - 1]); ``probabilities``
    ``k h w`` (each name's sigmoid); ``picture`` ``h w 3`` uint8, the image as the model saw it."""

    names: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    picture: np.ndarray
    seen: list[str]
    seconds: float

    def overlay(self) -> Image.Image:
        """The photo with each found name's colour and its name written on its region; the page shows
        the legend once, as text beside it (:meth:`legend_html`), so none is drawn into the picture."""
        return overlay(
            self.picture, self.labels.astype(np.int64), self.names, with_legend=False, label_segments=True
        )

    def label_picture(self) -> Image.Image:
        """The label map in the legend's colours (its raw values 0..k would show as near-black grey)."""
        return colour_labels(self.labels, len(self.names))

    def save_raw_labels(self, path: Path) -> Path:
        """The raw label map (pixel value i = names[i - 1], 0 = background) as an 8-bit PNG."""
        return atomic_save_png(path, Image.fromarray(self.labels))

    def shares(self) -> list[list[str | float | None]]:
        """Rows ``[name, % of pixels, highest probability]``: background first, then each name."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.names) + 1) / self.labels.size
        highest = self.probabilities.reshape(len(self.names), -1).max(axis=1)
        # Plain floats: Gradio's table shows numpy scalars as text.
        rows: list[list[str | float | None]] = [["background", round(100 * float(counts[0]), 2), None]]
        for name, share, top in zip(self.names, counts[1:], highest, strict=True):
            rows.append([name, round(100 * float(share), 2), round(float(top), 3)])
        return rows

    def heatmaps(self) -> list[tuple[Image.Image, str]]:
        """Each name's probability as a colour map over a grey copy of the image, with its name."""
        cmap = colormaps["inferno"]
        grey = self.picture.mean(axis=2, keepdims=True)
        out = []
        for name, prob in zip(self.names, self.probabilities, strict=True):
            heat = cmap(prob)[..., :3] * 255  # h w 3
            blend = (0.35 * grey + 0.65 * heat).round().astype(np.uint8)
            thumb = Image.fromarray(blend)
            thumb.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE))
            out.append((thumb, f"{name} (max {prob.max():.2f})"))
        return out

    def legend_html(self) -> str:
        """The overlay's colours as page text: found names with their swatch, the others listed after."""
        colours = palette(len(self.names))
        present = set(np.unique(self.labels).tolist())
        found, missing = [], []
        for i, name in enumerate(self.names, start=1):
            if i in present:
                r, g, b = (int(c) for c in colours[i])
                found.append(
                    f'<span class="fusioner-legend-item"><span style="display:inline-block;width:0.9em;'
                    f'height:0.9em;background:rgb({r},{g},{b});margin-right:0.3em"></span>'
                    f"{html.escape(name)}</span>"
                )
            else:
                missing.append(html.escape(name))
        parts = ['<div class="fusioner-legend">', " &nbsp; ".join(found) or "no name above the threshold"]
        if missing:
            parts.append(f"<br><small>not found: {', '.join(missing)}</small>")
        return "".join(parts) + "</div>"

    def status(self) -> str:
        h, w = self.labels.shape
        line = f"{len(self.names)} names, {w}x{h} px, {self.seconds:.2f} s"
        if self.seen:
            line += f"; calibrated as seen in training: {', '.join(self.seen)}"
        return line


def parse_names(text: str | None) -> list[str]:
    """``"cat, dog,grass"`` -> ``["cat", "dog", "grass"]``; refuses none, duplicates and too many."""
    if text is not None and not isinstance(text, str):  # API clients may send anything
        raise FusionerError(f"names must be text, e.g. 'skin, hair, jeans'; got {type(text).__name__}")
    names = [check_name(n, "names") for n in (text or "").split(",") if n.strip()]
    if not names:
        raise FusionerError("type at least one name, e.g. 'skin, hair, jeans'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FusionerError(f"each name once, please; given more than once: {', '.join(duplicates)}")
    if len(names) > MAX_NAMES:
        raise FusionerError(f"{len(names)} names; a label map holds at most {MAX_NAMES}")
    return names


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Any PIL image -> ``3 h w`` float in [0, 1], its longer side at most MAX_SIDE."""
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@torch.no_grad()
def segment(
    model: FusionerModel,
    image: Image.Image,
    names: list[str],
    settings: Settings,
    calibration: Calibration | None = None,
) -> Segmentation:
    """All ``names`` in one pass over ``image``; ``settings.seen_bias`` applies to calibrated seen names."""
    if settings.mode not in MODES:
        raise FusionerError(f"inference mode must be one of {', '.join(MODES)}, got {settings.mode!r}")
    if not 0 < settings.threshold < 1:
        raise FusionerError(f"threshold must be between 0 and 1, got {settings.threshold}")
    if not math.isfinite(settings.seen_bias):  # NaN would silently make every pixel background
        raise FusionerError(f"seen_bias must be a finite number, got {settings.seen_bias}")
    start = time.perf_counter()
    pixels = to_tensor(image)
    device = next(model.head.parameters()).device
    with refiner_as(model, settings.refine):
        logits = model.logits(pixels.to(device), names, mode=settings.mode)  # k h w
    seen = [n for n in names if calibration and n in calibration.seen] if settings.seen_bias else []
    flags = torch.tensor([n in seen for n in names]) if seen else None
    labels = labels_from_logits(
        logits[None], settings.threshold, seen_bias=settings.seen_bias if seen else 0.0, seen=flags
    )[0]
    return Segmentation(
        names=list(names),
        labels=labels.byte().cpu().numpy(),
        probabilities=logits.float().sigmoid().cpu().numpy(),
        picture=(pixels * 255).round().byte().permute(1, 2, 0).numpy(),
        seen=seen,
        seconds=time.perf_counter() - start,
    )


# The benchmark vocabularies the package ships (fusioner/data/ov/names), offered as presets.
PRESETS = {"VOC-20": "voc20", "PC-59": "pc59", "ADE-150": "ade150", "COCO-Stuff-171": "cocostuff171"}


def preset_names(label: str) -> str:
    """A preset's names as the names box holds them: ``"aeroplane, bicycle, ..."``."""
    from fusioner.data.ov.base import read_names  # the dataset package: imported when a preset is asked

    if label not in PRESETS:
        raise FusionerError(f"vocabulary preset must be one of {', '.join(PRESETS)}, got {label!r}")
    return ", ".join(read_names(PRESETS[label]))
