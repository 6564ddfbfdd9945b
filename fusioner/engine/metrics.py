"""Zero-shot segmentation metrics: the one-way protocol (HSNet) and the generalized one (ZegCLIP).

Both meters accumulate integer pixel counts over the whole test set and compute IoU once at the
end (dataset-level IoU, not a mean of per-image IoUs). Results are fractions in [0, 1].

Where each convention comes from (checked against the reference code's numbers,
``benchmarks/parity.py`` on ``../shared/data/reference-parity``):

- 1-way: juhongm999/hsnet ``common/evaluation.py`` (per-episode fg / bg intersection and union,
  target 255 left out) and ``common/logger.py`` (``AverageMeter.compute_iou``: summed counts per
  fold class, union clamped to 1, mean over *every* fold class). A foreground decision is a logit
  strictly above the threshold's logit (:func:`one_way_foreground`), as the released Fusioner code
  decides: a logit of exactly 0 is background.
- GZSS: ZiqinZhou66/ZegCLIP's VOC ``evaluate`` over mmsegmentation 0.24's ``intersect_and_union``
  (:data:`GZSS_PROTOCOLS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

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


def one_way_foreground(logits: Tensor, threshold: float) -> Tensor:
    """Bool foreground of one name's logits: ``sigmoid(logit) > threshold``, decided on the logit.

    Strictly above: a logit of exactly ``log(t / (1 - t))`` (0 at the usual 0.5) is background, as
    in the released Fusioner code (and HSNet's argmax over (bg, fg), where a tie goes to bg). The
    comparison is on logits, not on sigmoid outputs, which round to exactly 0.5 for |logit| < 6e-8.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold} is not between 0 and 1 (exclusive)")
    return logits.float() > math.log(threshold / (1 - threshold))


class OneWayMeter:
    """One-way zero-shot segmentation: each (image, class) pair is a binary fg / bg problem.

    HSNet's convention: per class, foreground and background intersections and unions are summed
    over every episode of that class (ignore pixels excluded). ``miou`` is the mean foreground IoU
    over *all* the classes given here (the fold's classes), and ``fbiou`` sums intersections and
    unions over those classes for foreground and background separately, then averages the two
    IoUs. As in HSNet a union of zero is clamped to one, so a class with no episode counts as
    IoU 0 in the mean instead of being skipped (the released Fusioner code's own metric skips it;
    HSNet's mean is the published one): give only the classes the test set holds, and a missing
    class shows up as a low score rather than a silently easier mean. With no classes at all
    (nothing held out), or no episode at all, both scores are NaN. ``episodes`` counts the
    updates per class: one per line of an HSNet split list.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = _check_names(class_names, allow_empty=True)
        self._index = {n: i for i, n in enumerate(self.class_names)}
        self.reset()

    def reset(self) -> None:
        k = len(self.class_names)
        self.intersection = torch.zeros(2, k, dtype=torch.int64)  # (bg, fg) k
        self.union = torch.zeros(2, k, dtype=torch.int64)  # (bg, fg) k
        self.pairs = torch.zeros(k, dtype=torch.int64)  # k: episodes seen per class

    def update(self, name: str, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """Add one episode: ``pred``, ``target`` and ``valid`` are bool ``h w`` (or any equal shape)."""
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
        episodes = {n: int(self.pairs[i]) for i, n in enumerate(self.class_names)}
        if not self.class_names:
            return {"miou": math.nan, "fbiou": math.nan, "per_class": {}, "episodes": {}}
        if not self.pairs.any():
            # No image held any of these classes: the score is undefined, not 0 (callers warn).
            undefined = dict.fromkeys(self.class_names, math.nan)
            return {"miou": math.nan, "fbiou": math.nan, "per_class": undefined, "episodes": episodes}
        inter, union = self.intersection.double(), self.union.double()
        iou = inter / union.clamp(min=1)  # (bg, fg) k
        fb = inter.sum(1) / union.sum(1).clamp(min=1)  # (bg, fg)
        return {
            "miou": iou[1].mean().item(),
            "fbiou": fb.mean().item(),
            "per_class": {n: iou[1, i].item() for i, n in enumerate(self.class_names)},
            "episodes": episodes,
        }


# ---------------------------------------------------------------------------------------------
# GZSS protocols: per-label IoU from the confusion matrix (target x pred, label 0 = background).


def _iou(confusion: Tensor) -> Tensor:
    """mmseg's ``intersect_and_union``: tp / (target + pred - tp) per label, NaN where both are 0."""
    conf = confusion.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.nan)


def _background_as_class(confusion: Tensor) -> Tensor:
    return _iou(confusion)


def _zegclip_voc(confusion: Tensor) -> Tensor:
    # reduce_zero_label: target background becomes ignore, so its row leaves every count. A
    # predicted background stays in its target's row (a miss) but in no class's prediction count
    # (mmseg's histogram starts at class 0 = label 1; the background's -1 falls outside it).
    reduced = confusion.clone()
    reduced[0] = 0
    iou = _iou(reduced)
    iou[0] = torch.nan  # background is not a class here: it has no IoU
    return iou


@dataclass(frozen=True)
class GZSSProtocol:
    iou: Callable[[Tensor], Tensor]  # k+1 x k+1 confusion -> k+1 IoUs (label 0 = background)
    what: str  # one line, for docs and printed reports


_PROTOCOLS = {
    "zegclip_voc": GZSSProtocol(
        _zegclip_voc,
        "ZegCLIP's VOC protocol: target background ignored; a pixel predicted as background is a "
        "miss of its true class",
    ),
    "background_as_class": GZSSProtocol(
        _background_as_class,
        "background counted as a label: a name predicted on background is a false positive of that "
        "name; background itself is in no mean",
    ),
}
# Protocol name -> how it scores; read-only. Every GZSS report holds every protocol (``protocols``).
GZSS_PROTOCOLS: Mapping[str, GZSSProtocol] = MappingProxyType(_PROTOCOLS)


def check_gzss_protocol(name: str) -> str:
    if name not in GZSS_PROTOCOLS:
        raise ValueError(f"GZSS protocol {name!r} is not one of {', '.join(GZSS_PROTOCOLS)}")
    return name


class GZSSMeter:
    """Generalized zero-shot segmentation: every pixel labelled among background + all names.

    Accumulates one confusion matrix over the label space 0 = background, i = ``names[i - 1]``
    (target pixels equal to ``ignore_index`` skipped) and scores it by each of
    :data:`GZSS_PROTOCOLS`:

    - ``zegclip_voc``: ZegCLIP's VOC evaluation (``reduce_zero_label`` under mmseg 0.24): target
      background pixels are ignored; a pixel predicted as background is a miss of its true class.
      The figures ZegCLIP and ZegFormer publish for VOC 15/5.
    - ``background_as_class``: the same arithmetic with background kept as a label: a name
      predicted on a background pixel is a false positive of that name.

    In both, a name's IoU is NaN when it never occurs in a target nor a prediction, and NaNs are
    left out of every mean (numpy ``nanmean``, as mmseg); background counts in no mean: ``miou`` is
    over all names, ``miou_seen`` / ``miou_unseen`` over the seen / unseen names, ``hiou`` their
    harmonic mean (ZegCLIP prints seen and unseen; its paper reports this hIoU). ``protocol`` is
    what :meth:`compute` gives by default.
    """

    def __init__(
        self,
        names: Sequence[str],
        unseen: Collection[str],
        background: str = "background",
        ignore_index: int = IGNORE,
        protocol: str = "background_as_class",
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
        self.protocol = check_gzss_protocol(protocol)
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

    def iou(self, protocol: str | None = None) -> Tensor:
        """``k`` per-label IoU under ``protocol`` (default: the meter's), label 0 = background."""
        return GZSS_PROTOCOLS[check_gzss_protocol(protocol or self.protocol)].iou(self.confusion)

    def compute(self, protocol: str | None = None) -> dict[str, float | str | dict[str, float]]:
        """The figures of one protocol (default: the meter's), named in ``protocol``.

        ``per_class`` starts with the background (NaN under ``zegclip_voc``, where it is ignored).
        """
        protocol = check_gzss_protocol(protocol or self.protocol)
        iou = self.iou(protocol)
        seen = [i + 1 for i, n in enumerate(self.names) if n not in self.unseen]
        unseen = [i + 1 for i, n in enumerate(self.names) if n in self.unseen]
        miou_seen = iou[seen].nanmean().item() if seen else math.nan
        miou_unseen = iou[unseen].nanmean().item() if unseen else math.nan
        total = miou_seen + miou_unseen
        hiou = 2 * miou_seen * miou_unseen / total if total > 0 else (math.nan if math.isnan(total) else 0.0)
        return {
            "protocol": protocol,
            "miou": iou[1:].nanmean().item(),
            "miou_seen": miou_seen,
            "miou_unseen": miou_unseen,
            "hiou": hiou,
            "per_class": {n: iou[i].item() for i, n in enumerate([self.background, *self.names])},
        }

    def report(self) -> dict:
        """The meter's protocol's figures at the top level (what headlines read), and every
        protocol's figures under ``protocols`` (``{name: compute(name)}``)."""
        return {**self.compute(), "protocols": {name: self.compute(name) for name in GZSS_PROTOCOLS}}
