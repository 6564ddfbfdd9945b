"""From logits to an answer: the two ways of asking a model about K names.

* ``best-name``: every pixel gets its best-scoring name, or the background where no name reaches
  ``threshold`` (the label map of ``fusioner predict``, the demo and the GZSS protocol).
* ``one-name``: each name is asked alone; its mask is where its own probability reaches
  ``threshold``, whatever the other names score, so masks may overlap (the 1-way protocol behind
  the headline figures).

``seen_bias`` is subtracted from the logits of the names the head was trained on before either
decision (calibrated stacking; the run's value is in its ``metrics.json``, fusioner/calibration.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fusioner.errors import FusionerError
from fusioner.inference import MODES, labels_from_logits
from fusioner.methods import REFINERS, build_refiner


def best_name(logits: Tensor, threshold: float, bias: Tensor) -> Tensor:
    """``k h w`` logits -> ``h w`` int64 labels (0 = background, i = names[i - 1])."""
    return labels_from_logits(logits[None] - bias[:, None, None], threshold)[0]


def one_name(logits: Tensor, threshold: float, bias: Tensor) -> Tensor:
    """``k h w`` logits -> ``k h w`` bool masks, each name on its own (they may overlap)."""
    return (logits - bias[:, None, None]).float().sigmoid() >= threshold


RULES: dict[str, Callable[[Tensor, float, Tensor], Tensor]] = {"best-name": best_name, "one-name": one_name}


@dataclass(frozen=True)
class Decision:
    """How ``predict`` turns logits into an answer; checked when built, so a bad value fails early."""

    threshold: float
    mode: str = "best-name"  # a key of RULES
    seen_bias: float = 0.0
    inference: str = "fixed"  # fixed | sliding (fusioner.inference.MODES)

    def __post_init__(self) -> None:
        if self.mode not in RULES:
            raise FusionerError(f"mode must be one of {', '.join(RULES)}, got {self.mode!r}")
        if self.inference not in MODES:
            raise FusionerError(f"inference must be one of {', '.join(MODES)}, got {self.inference!r}")
        threshold = _number("threshold", self.threshold)
        if not 0 < threshold < 1:
            raise FusionerError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold!r}")
        bias = _number("seen_bias", self.seen_bias)
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "seen_bias", bias)

    def apply(self, logits: Tensor, seen: Tensor | None = None) -> Tensor:
        """``k h w`` logits (+ bool ``k`` seen flags) -> labels ``h w`` or masks ``k h w``."""
        bias = torch.zeros(logits.shape[0], device=logits.device, dtype=logits.dtype)
        if self.seen_bias:
            if seen is None:
                raise FusionerError("seen_bias needs the names seen in training (give seen=...)")
            bias = self.seen_bias * seen.to(logits.device, logits.dtype)
        return RULES[self.mode](logits, self.threshold, bias)


def _number(key: str, value: object) -> float:
    """A finite float from a number or numeric string; a FusionerError naming ``key`` otherwise."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FusionerError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number) or isinstance(value, bool):
        raise FusionerError(f"{key} must be a finite number, got {value!r}")
    return number


def check_refiner(name: str) -> None:
    """Refuse a refinement that is not one of fusioner.methods.REFINERS ("" = the model's own)."""
    if name and name not in REFINERS:
        raise FusionerError(f"refinement must be one of {', '.join(REFINERS)}, got {name!r}")


def refiner_name(model: Any) -> str:
    """The name of the refiner the model was saved with (``none`` when it has none)."""
    return model.refiner.record()["refine"] if model.refiner is not None else "none"


@contextmanager
def refiner_as(model: Any, name: str) -> Iterator[None]:
    """Run with refiner ``name`` (its default settings) in place of the model's own; "" keeps the model's.

    Refinement is training-free (fusioner/methods/spectral.py), so any model can be asked with or
    without it. The swap is undone on exit; the page runs one request at a time (Gradio's default
    concurrency of 1 per event), so no other request sees it.
    """
    check_refiner(name)
    if not name or name == refiner_name(model):
        yield
        return
    own = model.refiner
    model.refiner = build_refiner({"refine": name})
    try:
        yield
    finally:
        model.refiner = own
