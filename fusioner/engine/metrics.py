"""Zero-shot segmentation metrics: the one-way protocol (HSNet) and the generalized one (ZegFormer).

Both meters accumulate integer pixel counts over the whole test set and compute IoU once at the
end (dataset-level IoU, not a mean of per-image IoUs). Results are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from fusioner.data.base import IGNORE


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")


def _check_names(names: Sequence[str], allow_empty: bool = False) -> list[str]:
    names = list(names)
    if not names and not allow_empty:
        raise ValueError("no class names to evaluate")
    if len(set(names)) != len(names):
        raise ValueError(f"class names repeat: {names}")
    return names


class OneWayMeter:
    """One-way zero-shot segmentation: each (image, class) pair is a binary fg / bg problem.

    HSNet's convention: per class, foreground and background intersections and unions are summed
    over every pair of that class (ignore pixels excluded). ``miou`` is the mean foreground IoU
    over *all* the classes given here (the fold's classes), and ``fbiou`` sums intersections and
    unions over those classes for foreground and background separately, then averages the two
    IoUs. As in HSNet a union of zero is clamped to one, so a class that was never evaluated
    counts as IoU 0 in the mean instead of being skipped: give only the classes the test set
    holds, and a missing class shows up as a low score rather than a silently easier mean.
    With no classes at all (nothing held out), or no pair evaluated at all, both scores are NaN.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = _check_names(class_names, allow_empty=True)
        self._index = {n: i for i, n in enumerate(self.class_names)}
        self.reset()

    def reset(self) -> None:
        k = len(self.class_names)
        self.intersection = torch.zeros(2, k, dtype=torch.int64)  # (bg, fg) k
        self.union = torch.zeros(2, k, dtype=torch.int64)  # (bg, fg) k
        self.pairs = torch.zeros(k, dtype=torch.int64)  # k: pairs seen per class

    def update(self, name: str, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """Add one pair: ``pred``, ``target`` and ``valid`` are bool ``h w`` (or any equal shape)."""
        if name not in self._index:
            raise KeyError(f"class {name!r} is not one of the meter's classes {self.class_names}")
        if valid is None:
            valid = torch.ones_like(target, dtype=torch.bool)
        _check_same_shape(pred=pred, target=target, valid=valid)
        for key, t in (("pred", pred), ("target", target), ("valid", valid)):
            if t.dtype != torch.bool:
                raise TypeError(f"{key} must be a bool tensor, got {t.dtype}")
        fg_pred, fg_true = pred & valid, target & valid
        bg_pred, bg_true = ~pred & valid, ~target & valid
        counts = torch.stack(
            [
                (bg_pred & bg_true).sum(),
                (fg_pred & fg_true).sum(),
                (bg_pred | bg_true).sum(),
                (fg_pred | fg_true).sum(),
            ]
        ).cpu()
        i = self._index[name]
        self.intersection[:, i] += counts[:2]
        self.union[:, i] += counts[2:]
        self.pairs[i] += 1

    def compute(self) -> dict[str, float | dict[str, float]]:
        if not self.class_names:
            return {"miou": math.nan, "fbiou": math.nan, "per_class": {}}
        if not self.pairs.any():
            # No image held any of these classes: the score is undefined, not 0 (callers warn).
            undefined = dict.fromkeys(self.class_names, math.nan)
            return {"miou": math.nan, "fbiou": math.nan, "per_class": undefined}
        inter, union = self.intersection.double(), self.union.double()
        iou = inter / union.clamp(min=1)  # (bg, fg) k
        fb = inter.sum(1) / union.sum(1).clamp(min=1)  # (bg, fg)
        return {
            "miou": iou[1].mean().item(),
            "fbiou": fb.mean().item(),
            "per_class": {n: iou[1, i].item() for i, n in enumerate(self.class_names)},
        }


class GZSSMeter:
    """Generalized zero-shot segmentation: every pixel labelled among background + all names.

    Accumulates a confusion matrix over the label space 0 = background, i = ``names[i - 1]``;
    target pixels equal to ``ignore_index`` are skipped. A class's IoU is NaN when it never
    occurs in a target nor a prediction, and NaNs are left out of every mean (mmseg's
    convention, which ZegFormer and ZegCLIP report).

    Background has an IoU (``per_class[background]``) but counts in none of the means: ``miou``
    is over all names, ``miou_seen`` / ``miou_unseen`` over the seen / unseen names, ``hiou``
    their harmonic mean, as ZegCLIP reports VOC 15/5. Background pixels still matter: a class
    predicted on them is a false positive of that class.
    """

    def __init__(
        self,
        names: Sequence[str],
        unseen: Collection[str],
        background: str = "background",
        ignore_index: int = IGNORE,
    ) -> None:
        self.names = _check_names(names)
        unknown = sorted(set(unseen) - set(self.names))
        if unknown:
            raise ValueError(f"unseen classes {unknown} are not among the names {self.names}")
        if background in self.names:
            raise ValueError(f"the background name {background!r} is also a class name")
        self.unseen = set(unseen)
        self.background = background
        self.ignore_index = ignore_index
        self.num_classes = len(self.names) + 1
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)  # target pred

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add integer label maps ``pred`` and ``target`` (``h w``, or any equal shape)."""
        _check_same_shape(pred=pred, target=target)
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"pred and target must be integer label maps, got {pred.dtype}, {target.dtype}")
        k = self.num_classes
        valid = target != self.ignore_index
        p, t = pred[valid].long(), target[valid].long()
        for key, x in (("pred", p), ("target", t)):
            if x.numel() and (x.min() < 0 or x.max() >= k):
                raise ValueError(f"{key} holds labels outside 0..{k - 1} (or {self.ignore_index} in target)")
        self.confusion += torch.bincount(t * k + p, minlength=k * k).view(k, k).cpu()

    def iou(self) -> Tensor:
        """``k`` per-label IoU, label 0 = background; NaN where the label never occurs."""
        conf = self.confusion.double()
        tp = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.nan)

    def compute(self) -> dict[str, float | dict[str, float]]:
        iou = self.iou()
        seen = [i + 1 for i, n in enumerate(self.names) if n not in self.unseen]
        unseen = [i + 1 for i, n in enumerate(self.names) if n in self.unseen]
        miou_seen = iou[seen].nanmean().item() if seen else math.nan
        miou_unseen = iou[unseen].nanmean().item() if unseen else math.nan
        total = miou_seen + miou_unseen
        hiou = 2 * miou_seen * miou_unseen / total if total > 0 else (math.nan if math.isnan(total) else 0.0)
        return {
            "miou": iou[1:].nanmean().item(),
            "miou_seen": miou_seen,
            "miou_unseen": miou_unseen,
            "hiou": hiou,
            "per_class": {n: iou[i].item() for i, n in enumerate([self.background, *self.names])},
        }
