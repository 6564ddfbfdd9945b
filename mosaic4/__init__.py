"""mosaic4: generate, publish and read the Mosaic-4 robustness benchmark (Fusioner, BMVC 2022).

Each Mosaic-4 image is a 2x2 mosaic of four FSS-1000 images from four different classes, with a
label map (0 = background, j + 1 = the object of tile j) and the four class names in tile order.
Read a generated set for evaluation with :class:`fusioner.data.mosaic.Mosaic4`.
"""

from mosaic4.card import build_card, publish
from mosaic4.fss import FSSClass, FSSImage, class_name, load_mask, read_class_list, scan_fss
from mosaic4.generate import MosaicOptions, Plan, generate, plan_sample, render, write_mosaic4

__all__ = [
    "FSSClass",
    "FSSImage",
    "MosaicOptions",
    "Plan",
    "build_card",
    "class_name",
    "generate",
    "load_mask",
    "plan_sample",
    "publish",
    "read_class_list",
    "render",
    "scan_fss",
    "write_mosaic4",
]
