"""Pure functions over :class:`~fusioner.data.base.Sample` dicts: each returns a new sample."""

from __future__ import annotations

import torch.nn.functional as F

from fusioner.data.base import Sample


def resize(sample: Sample, size: int) -> Sample:
    """Resize to ``size x size``: image bilinear with antialiasing, mask nearest (labels stay labels)."""
    image = F.interpolate(sample["image"][None], size=(size, size), mode="bilinear", antialias=True)
    # nearest-exact samples pixel centres (as PIL does); plain "nearest" shifts by half a pixel.
    mask = F.interpolate(sample["mask"][None, None].float(), size=(size, size), mode="nearest-exact")
    return {**sample, "image": image[0], "mask": mask[0, 0].long()}


def hflip(sample: Sample) -> Sample:
    """Mirror left-right."""
    return {**sample, "image": sample["image"].flip(-1), "mask": sample["mask"].flip(-1)}
