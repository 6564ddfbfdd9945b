"""What the demo does with one request, without Gradio: names, image, settings -> a segmentation.

The page (fusioner/demo/app.py) only turns controls into a :class:`Settings` and a
:class:`Segmentation` into components, so every rule here is tested by plain function calls.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from fusioner.errors import FusionerError
from fusioner.inference import MODES, labels_from_logits
from fusioner.methods import REFINERS, build_refiner
from fusioner.model import FusionerModel
from fusioner.predict import MAX_NAMES
from fusioner.run import RunDir
from fusioner.visualize import overlay, palette

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


@dataclass(frozen=True)
class Calibration:
    """GZSS calibration of a run: the names the head was trained on and the ``seen_bias`` chosen on val."""

    seen: frozenset[str]
    seen_bias: float


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
        return overlay(self.picture, self.labels.astype(np.int64), self.names)

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
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise FusionerError("type at least one name, e.g. 'skin, hair, jeans'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FusionerError(f"each name once, please; given more than once: {', '.join(duplicates)}")
    if len(names) > MAX_NAMES:
        raise FusionerError(f"{len(names)} names; a label map holds at most {MAX_NAMES}")
    return names


def read_calibration(source: str | Path | None) -> Calibration | None:
    """The run's seen names and chosen ``seen_bias``, from its ``metrics.json``; None where unknown.

    ``fusioner eval`` writes ``gzss.per_class`` (background, then every name) and ``one_way.per_class``
    (the unseen names): the seen names are the difference. A Hub model carries no metrics.json.
    """
    if source is None:
        return None
    path = Path(source)
    for run in (RunDir(path), RunDir(path.parent)):  # a run directory, or its model/ folder
        if not run.metrics.is_file():
            continue
        try:
            metrics = run.read_metrics()
        except FusionerError:
            return None
        calibrated, gzss = metrics.gzss_calibrated, metrics.gzss
        if not calibrated or not gzss or "seen_bias" not in calibrated:
            return None
        everything = list(gzss.get("per_class") or {})[1:]  # the first entry is the background
        seen = frozenset(everything) - set(metrics.one_way.get("per_class") or {})
        return Calibration(seen, float(calibrated["seen_bias"])) if seen else None
    return None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Any PIL image -> ``3 h w`` float in [0, 1], its longer side at most MAX_SIDE."""
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def refiner_name(model: FusionerModel) -> str:
    """The name of the refiner the model was saved with (``none`` when it has none)."""
    return model.refiner.record()["refine"] if model.refiner is not None else "none"


@contextmanager
def refiner_as(model: FusionerModel, name: str) -> Iterator[None]:
    """Run with refiner ``name`` (its default settings) in place of the model's own; "" keeps the model's.

    Refinement is training-free (fusioner/methods/spectral.py), so any model can be asked with or
    without it. The swap is undone on exit; the page runs one request at a time (Gradio's default
    concurrency of 1 per event), so no other request sees it.
    """
    if name and name not in REFINERS:
        raise FusionerError(f"refinement must be one of {', '.join(REFINERS)}, got {name!r}")
    if not name or name == refiner_name(model):
        yield
        return
    own = model.refiner
    model.refiner = build_refiner({"refine": name})
    try:
        yield
    finally:
        model.refiner = own


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
