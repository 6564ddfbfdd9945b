"""Open-vocabulary segmentation benchmarks (the table of CAT-Seg, SAN, SED, ...), one reader per family.

Importing this package registers ``ade847``, ``ade150``, ``pc459``, ``pc59``, ``voc20``, ``voc21``,
``cocostuff171`` and ``cityscapes`` as ``dataset:`` names and in :data:`OV_DATASETS`. Layouts and
ignore rules are in each module; the suite (``fusioner/engine/suite.py``) orders them as the papers'
tables do.
"""

from __future__ import annotations

# isort: off
from fusioner.data.ov.base import OV_DATASETS, OVDataset, OVSpec, read_names
from fusioner.data.ov import ade, context, voc, cocostuff, cityscapes  # noqa: F401
# isort: on

__all__ = ["OV_DATASETS", "OVDataset", "OVSpec", "read_names"]
