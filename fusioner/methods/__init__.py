"""The field's zero-shot segmentation designs as choices of one library (issue 12).

``method`` (registry :data:`METHODS`): ``fusioner`` (the default head, fusioner/model/head.py),
``zegclip`` (zegclip.py), ``zegformer`` (zegformer.py). ``refine`` (:data:`REFINERS`): ``none`` |
``spectral`` (spectral.py) | ``sazs`` (sazs.py: SAZS's eigen-mask swap), applied inside
fusioner/inference.py. ``pseudo_labels``
(:data:`PSEUDO_LABELS`): ``none`` | ``clip-zss`` | ``kmeans`` (pseudo_labels.py; CLIP-ZSS's
teacher and training modules: teacher.py, clip_zss.py). Importing this package imports
the implementations, whose registrations fill the tables.
"""

from fusioner.methods import fusioner_head, pseudo_labels, sazs, spectral, zegclip, zegformer  # noqa: F401
from fusioner.methods.build import (
    attach_vision,
    build_head,
    build_refiner,
    check_config,
    head_from_record,
    head_record,
)
from fusioner.methods.objective import Objective, build_objective
from fusioner.methods.registry import METHODS, PSEUDO_LABELS, REFINERS, Method, method_of

__all__ = [
    "METHODS",
    "PSEUDO_LABELS",
    "REFINERS",
    "Method",
    "Objective",
    "attach_vision",
    "build_head",
    "build_objective",
    "build_refiner",
    "check_config",
    "head_from_record",
    "head_record",
    "method_of",
]
