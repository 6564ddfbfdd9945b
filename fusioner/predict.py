"""Segment users' own images with their own class names: all names in one forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusioner.data.base import read_image
from fusioner.errors import FusionerError
from fusioner.io import atomic_save_png, atomic_write_text
from fusioner.model import FusionerModel
from fusioner.visualize import overlay, to_uint8

MAX_NAMES = 254  # label maps are uint8 PNGs and 255 means "ignore" in every dataset


@torch.no_grad()
def predict_images(model_source: str, images: list[str], names: list[str], out: Path) -> list[Path]:
    """Write ``<stem>_overlay.png`` (colours + legend) and ``<stem>_labels.png`` per image.

    ``out/classes.txt`` says what each label means (line 0 background, line i = names[i-1]), the
    same layout the folder dataset reads.
    """
    if not names:
        raise FusionerError("--classes is empty: give at least one class name")
    if len(set(names)) != len(names):
        raise FusionerError(
            f"--classes has duplicate names: {sorted({n for n in names if names.count(n) > 1})}"
        )
    if len(names) > MAX_NAMES:
        raise FusionerError(f"--classes has {len(names)} names; label maps hold at most {MAX_NAMES}")
    model = FusionerModel.from_pretrained(model_source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    written = []
    atomic_write_text(out / "classes.txt", "\n".join(["background", *names]) + "\n")
    for path in images:
        image = read_image(path).to(device)
        labels = model.predict(image, names).byte().cpu().numpy()
        stem = Path(path).stem
        label_png = atomic_save_png(out / f"{stem}_labels.png", Image.fromarray(labels))
        picture = overlay(to_uint8(image), labels.astype(np.int64), names)
        overlay_png = atomic_save_png(out / f"{stem}_overlay.png", picture)
        written += [overlay_png, label_png]
    return written
