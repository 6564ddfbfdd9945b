"""A run's GZSS calibration: the names its head was trained on and the ``seen_bias`` chosen on val.

``fusioner predict``, the demo and ``FusionerModel.predict`` subtract ``seen_bias`` from the logits
of the seen names (calibrated stacking, :func:`fusioner.inference.labels_from_logits`); this module
only finds the two figures beside a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fusioner.errors import FusionerError
from fusioner.run import RunDir


@dataclass(frozen=True)
class Calibration:
    """GZSS calibration of a run: the names the head was trained on and the ``seen_bias`` chosen on val."""

    seen: frozenset[str]
    seen_bias: float

    def flags(self, names: Sequence[str]) -> Tensor:
        """Bool ``k``: which of ``names`` were seen in training."""
        return torch.tensor([n in self.seen for n in names], dtype=torch.bool)


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
