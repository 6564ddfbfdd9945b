"""A ``metrics.json`` read back: :class:`Metrics` (checked on reading, the headline figures, the
line ``fusioner eval`` prints) and :func:`pct`, how reports write a figure.

Evaluation writes the file (fusioner/engine/evaluate.py, fusioner/eval_output.py); a run directory
(fusioner/run.py), a sweep's report, a push and the demo read it through here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusioner.errors import DataError
from fusioner.io import read_json


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal; ``n/a`` for NaN and for anything not a number."""
    return "n/a" if not isinstance(value, (int, float)) or math.isnan(value) else f"{100 * value:.1f}"


def _gzss_figures(gz: dict[str, Any]) -> str:
    """Seen / unseen / hIoU of each GZSS protocol, named, the headline's protocol first
    (fusioner/engine/metrics.py GZSS_PROTOCOLS); a file from before protocols were named as it is."""

    def figures(m: dict[str, Any]) -> str:
        return f"seen {m['miou_seen']:.4f} unseen {m['miou_unseen']:.4f} hIoU {m['hiou']:.4f}"

    if "protocols" not in gz:
        return figures(gz)
    first = gz.get("protocol")
    order = sorted(gz["protocols"], key=lambda name: name != first)
    return "; ".join(f"[{name}] {figures(gz['protocols'][name])}" for name in order)


@dataclass(frozen=True)
class Metrics:
    """The content of a ``metrics.json`` (see :mod:`fusioner.engine.evaluate` for its protocols)."""

    data: dict[str, Any]
    path: Path | None = None

    @classmethod
    def read(cls, path: str | Path) -> Metrics:
        """Read and check ``path``; a missing or broken file, or one without ``one_way``, is a DataError."""
        path = Path(path)
        data = read_json(path, "metrics file")
        if not isinstance(data, dict) or not isinstance(data.get("one_way"), dict):
            raise DataError(f"metrics file {path}: key 'one_way' is missing; re-run `fusioner eval`")
        return cls(data, path)

    @property
    def one_way(self) -> dict[str, Any]:
        return self.data["one_way"]

    @property
    def gzss(self) -> dict[str, Any] | None:
        """Generalized zero-shot figures; None on evaluation-only sets (which have ``n_way``)."""
        return self.data.get("gzss")

    @property
    def gzss_calibrated(self) -> dict[str, Any] | None:
        """GZSS with the ``seen_bias`` chosen on val; None where there was nothing to calibrate."""
        return self.data.get("gzss_calibrated")

    def headline(self) -> dict[str, float]:
        """``miou``, ``fbiou`` (1-way) and, where evaluated, ``gzss_miou_seen / _unseen / _hiou`` and
        the same of ``gzss_calibrated`` (``gzss_cal_*``)."""
        figures = {"miou": self.one_way["miou"], "fbiou": self.one_way["fbiou"]}
        for prefix, gz in (("gzss", self.gzss), ("gzss_cal", self.gzss_calibrated)):
            if gz is not None:
                figures.update({f"{prefix}_{k}": gz[k] for k in ("miou_seen", "miou_unseen", "hiou")})
        return figures

    def line(self) -> str:
        """One line of the headline figures, as ``fusioner eval`` prints it."""
        one, gz = self.one_way, self.gzss
        line = f"1-way mIoU {one['miou']:.4f}  FB-IoU {one['fbiou']:.4f}"
        if "one_way_seen" in self.data:
            line += f"  (seen names {self.data['one_way_seen']['miou']:.4f})"
        if gz is not None:
            line += f"  |  GZSS {_gzss_figures(gz)}"
            cal = self.gzss_calibrated
            if cal is not None:
                chosen = cal.get("chosen_on", "?")
                line += f"  |  calibrated (seen_bias {cal['seen_bias']:.2f}, chosen on {chosen})"
                line += f" {_gzss_figures(cal)}"
        else:
            line += f"  |  n-way (each image's own names in one pass) mIoU {self.data['n_way']['miou']:.4f}"
        return line
