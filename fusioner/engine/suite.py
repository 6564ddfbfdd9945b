"""Benchmark suites: one model over every dataset of a family, one table.

- ``ov``: the open-vocabulary table (CAT-Seg, SAN, SED, ...): ADE20K-847, Pascal Context-459,
  ADE20K-150, Pascal Context-59, VOC-20, VOC-21, COCO-Stuff-171, Cityscapes. Each dataset is scored
  n-way: all its names in one pass, every pixel gets the best-scoring name (no threshold, no
  background; VOC-21 has "background" as a name), mIoU over the classes present in the ground
  truth (detectron2's ``SemSegEvaluator`` rule), unlabeled pixels ignored.
- ``fewshot``: PASCAL-5i folds 0-3 and COCO-20i folds 0-3, 1-way mIoU and FB-IoU on each fold's
  held-out names (:func:`fusioner.engine.evaluate.evaluate`, the HSNet protocol). That protocol
  trains one model per fold; the suite scores the one model it is given on every fold, so only
  the fold the model was trained for is the protocol's number.

Datasets are looked for under the config key ``data_root`` in the layouts of
:mod:`fusioner.data.ov` (and ``VOCdevkit/VOC2012``, ``coco`` with ``instances_val2014.json`` for
the few-shot folds); a dataset that is not there is listed with the path looked for and skipped.

Standard setting of the OV datasets (:class:`fusioner.data.ov.OVSpec`): the image is resized so
its short side is 512 (aspect kept), then scored with sliding ``image_size`` windows, as CAT-Seg's
``eval.sh`` does for every dataset (``TEST.SLIDING_WINDOW True``); labels are compared with the
ground truth at its own resolution.

Outputs in the suite folder: ``suite.json``, ``suite.md`` (one table) and
``per_class/<dataset>.json`` (IoU per name; ``null`` for names absent from the ground truth).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from fusioner.data.ov import OV_DATASETS, OVDataset
from fusioner.engine.evaluate import EvalSettings, evaluate
from fusioner.errors import ConfigError
from fusioner.inference import NAMES_PER_PASS, argmax_labels
from fusioner.io import atomic_write_json, atomic_write_text
from fusioner.metrics_file import pct
from fusioner.model import FusionerModel

log = logging.getLogger(__name__)

# The column order of the papers' tables (A-847, PC-459, A-150, PC-59, VOC-20, ...): largest vocabulary first.
OV_ORDER = ("ade847", "pc459", "ade150", "pc59", "voc20", "voc21", "cocostuff171", "cityscapes")


@dataclass(frozen=True)
class FewShotEntry:
    name: str  # "pascal5i-f0"
    title: str  # "PASCAL-5i fold 0"
    root: str  # under data_root
    marker: str  # relative to root: the file or folder whose presence means "found"
    how: str  # how to get it there
    fold: int
    open: Callable[[Path, int, str], tuple[Any, list[str], list[str]]]  # root, fold, split_dir


def _pascal5i(root: Path, fold: int, split_dir: str):
    from fusioner.data.pascal5i import PascalVOC, fold_classes
    from fusioner.data.splits import VOC_CLASSES, hsnet_list

    unseen = fold_classes(fold)
    listed = hsnet_list(split_dir, "pascal", "val", fold, ".txt") if split_dir else None
    return PascalVOC(root, "val", listed), [n for n in VOC_CLASSES if n not in unseen], unseen


def _coco20i(root: Path, fold: int, split_dir: str):
    from fusioner.data.coco20i import COCOInstances, fold_classes
    from fusioner.data.splits import COCO_CLASSES, hsnet_list

    unseen = fold_classes(fold)
    listed = hsnet_list(split_dir, "coco", "val", fold, ".json") if split_dir else None
    return COCOInstances(root, "val", listed), [n for n in COCO_CLASSES if n not in unseen], unseen


FEWSHOT = tuple(
    [
        FewShotEntry(
            f"pascal5i-f{f}",
            f"PASCAL-5i fold {f}",
            "VOCdevkit/VOC2012",
            "JPEGImages",
            "unpack VOCtrainval_11-May-2012.tar there",
            f,
            _pascal5i,
        )
        for f in range(4)
    ]
    + [
        FewShotEntry(
            f"coco20i-f{f}",
            f"COCO-20i fold {f}",
            "coco",
            "annotations/instances_val2014.json",
            "unpack COCO 2014 val2014.zip and annotations_trainval2014.zip there",
            f,
            _coco20i,
        )
        for f in range(4)
    ]
)
SUITES = ("ov", "fewshot")


class IoUMeter:
    """Per-class true positives, ground-truth and predicted pixel counts over valid pixels."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        k = len(names)
        self.tp, self.gt, self.pred = (torch.zeros(k, dtype=torch.long) for _ in range(3))

    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred`` ``h w`` name indices 0..k-1; ``target`` ``h w`` name indices, -1 = ignore."""
        valid = target >= 0
        p, t = pred[valid].cpu(), target[valid].cpu()
        k = len(self.names)
        self.tp += torch.bincount(t[p == t], minlength=k)
        self.gt += torch.bincount(t, minlength=k)
        self.pred += torch.bincount(p, minlength=k)

    def compute(self) -> dict[str, Any]:
        """mIoU over the classes present in the ground truth (detectron2's rule), pixel accuracy."""
        tp, gt, pred = self.tp.double(), self.gt.double(), self.pred.double()
        union = gt + pred - tp
        present = gt > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
        miou = float(iou[present].mean()) if present.any() else math.nan
        pacc = float(tp.sum() / gt.sum()) if gt.sum() > 0 else math.nan
        per_class = {
            n: (None if math.isnan(v) else round(v, 6)) for n, v in zip(self.names, iou.tolist(), strict=True)
        }
        return {"miou": miou, "pacc": pacc, "classes_present": int(present.sum()), "per_class": per_class}


def resize_short_side(image: Tensor, short_side: int) -> Tensor:
    """``3 H W`` -> ``3 h w`` with ``min(h, w) = short_side``, aspect kept, antialiased."""
    h, w = image.shape[-2:]
    scale = short_side / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


@torch.no_grad()
def evaluate_ov(
    model: FusionerModel,
    dataset: OVDataset,
    *,
    short_side: int,
    mode: str = "sliding",
    progress: bool = True,
) -> dict[str, Any]:
    """n-way mIoU of ``model`` on ``dataset`` with all ``dataset.names`` (module docstring)."""
    model.eval()
    device = next(model.head.parameters()).device
    names = list(dataset.names)
    # Text in chunks too: a long list times a template ensemble is one batch otherwise.
    text = torch.cat(
        [model.text(names[i : i + NAMES_PER_PASS]) for i in range(0, len(names), NAMES_PER_PASS)]
    )
    text = text.to(device)
    meter = IoUMeter(names)
    for i in tqdm(range(len(dataset)), desc=dataset.name, unit="img", disable=not progress):
        sample = dataset[i]
        mask = sample["mask"]
        image = resize_short_side(sample["image"].to(device), short_side)
        pred = argmax_labels(model, image, text, size=model.image_size, mode=mode, out_size=tuple(mask.shape))
        target = torch.where(mask == dataset.ignore_index, -1, mask - 1)
        meter.update(pred, target.to(device))
    return {
        **meter.compute(),
        "images": len(dataset),
        "names": len(names),
        "short_side": short_side,
        "mode": mode,
    }


def _fewshot(model: FusionerModel, entry: FewShotEntry, root: Path, split_dir: str, progress: bool) -> dict:
    dataset, seen, unseen = entry.open(root, entry.fold, split_dir)
    settings = EvalSettings(model.image_size, "fixed", model.threshold)
    metrics = evaluate(model, dataset, seen=seen, unseen=unseen, settings=settings, progress=progress)
    one_way = metrics["one_way"]
    return {
        "miou": one_way["miou"],
        "fbiou": one_way["fbiou"],
        "per_class": one_way["per_class"],
        "images": len(dataset),
        "names": len(unseen),
        "setting": f"1-way, {model.image_size}x{model.image_size}",
    }


@dataclass
class SuiteResult:
    dir: Path
    evaluated: dict[str, dict[str, Any]]
    skipped: dict[str, str]  # name -> why (the path looked for)


def run_suite(
    model: FusionerModel,
    suite: str,
    data_root: str | Path,
    out: str | Path,
    *,
    split_dir: str = "",
    short_side: int | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    on_line: Callable[[str], None] = print,
) -> SuiteResult:
    """Evaluate ``model`` on every dataset of ``suite`` found under ``data_root``; write the table.

    ``short_side`` replaces every OV dataset's standard short side (quick checks; the table says
    so). ``only``: a subset of the suite's dataset names. ``on_line`` receives one line per dataset
    (evaluated or skipped, with the reason).
    """
    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r} is not one of {', '.join(SUITES)}")
    if short_side is not None and short_side < 1:
        raise ConfigError(f"--short-side: expected at least 1 pixel, got {short_side}")
    if not data_root:
        raise ConfigError(
            "config key 'data_root' is empty; set it to the folder holding the suite's datasets "
            "(ADEChallengeData2016/, ADE20K_2021_17_01/, VOCdevkit/, coco/, cityscapes/)"
        )
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise ConfigError(f"config key 'data_root': {data_root} is not a folder")
    entries: list[Any] = [OV_DATASETS[n] for n in OV_ORDER] if suite == "ov" else list(FEWSHOT)
    if only:
        known = [e.name for e in entries]
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ConfigError(f"--only: {', '.join(unknown)} not in suite {suite} ({', '.join(known)})")
        entries = [e for e in entries if e.name in only]
    out = Path(out)
    evaluated: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for entry in entries:
        root = data_root / entry.root
        marker = root / entry.marker
        if not marker.exists():
            skipped[entry.name] = f"not found: {marker} does not exist; {entry.how}"
            on_line(f"{entry.name}: skipped, {skipped[entry.name]}")
            continue
        start = time.perf_counter()
        if suite == "ov":
            dataset = entry.open(root)
            result = evaluate_ov(
                model, dataset, short_side=short_side or entry.short_side, mode=entry.mode, progress=progress
            )
            result["setting"] = f"n-way, short side {result['short_side']}, {entry.mode} {model.image_size}"
        else:
            result = _fewshot(model, entry, root, split_dir, progress)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["title"] = entry.title
        atomic_write_json(out / "per_class" / f"{entry.name}.json", result.pop("per_class"))
        evaluated[entry.name] = result
        on_line(
            f"{entry.name}: mIoU {pct(result['miou'])} on {result['images']} images, {result['names']} names"
        )
    record = {
        "suite": suite,
        "data_root": str(data_root),
        "short_side_override": short_side,
        "datasets": evaluated,
        "skipped": skipped,
    }
    atomic_write_json(out / "suite.json", record)
    atomic_write_text(out / "suite.md", suite_table(record))
    return SuiteResult(out, evaluated, skipped)


def suite_table(record: dict[str, Any]) -> str:
    """``suite.md``: one row per dataset (mIoU in %), then the skipped datasets and why."""
    lines = [f"# Suite `{record['suite']}`", ""]
    if record["suite"] == "ov":
        lines += ["| dataset | names | images | mIoU | pixel acc. | setting |", "|---|---|---|---|---|---|"]
        for r in record["datasets"].values():
            lines.append(
                f"| {r['title']} | {r['names']} | {r['images']} | {pct(r['miou'])} | {pct(r['pacc'])} "
                f"| {r['setting']} |"
            )
    else:
        lines += ["| fold | images | 1-way mIoU | FB-IoU | setting |", "|---|---|---|---|---|"]
        for r in record["datasets"].values():
            lines.append(
                f"| {r['title']} | {r['images']} | {pct(r['miou'])} | {pct(r['fbiou'])} | {r['setting']} |"
            )
    if record.get("short_side_override"):
        lines += ["", f"Short side {record['short_side_override']} for every dataset (not the standard 512)."]
    if record["skipped"]:
        lines += ["", "Not evaluated (not found under data_root):", ""]
        lines += [f"- {name}: {why}" for name, why in record["skipped"].items()]
    return "\n".join(lines) + "\n"


def evaluate_suite(
    model_source: str,
    suite: str,
    config_path: str | None,
    overrides: list[str],
    *,
    out: str | None = None,
    short_side: int | None = None,
    only: list[str] | None = None,
    on_line: Callable[[str], None] = print,
) -> SuiteResult:
    """``fusioner eval --suite``: load the model, read ``data_root`` (and ``split_dir``) from the
    config (the run's own ``config.yaml`` when ``model_source`` is a run), run the suite."""
    from fusioner.config import load_config
    from fusioner.eval_output import check_suite_folder
    from fusioner.run import RunDir

    model = FusionerModel.from_pretrained(model_source)
    run_config = RunDir(model_source).config
    if config_path is None and run_config.is_file():
        config_path = str(run_config)
    config = load_config(config_path, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if out is None:
        out = str(Path(model_source if Path(model_source).is_dir() else ".") / f"suite-{suite}")
    check_suite_folder(Path(out))  # before any dataset is read
    return run_suite(
        model,
        suite,
        config.data_root,
        out,
        split_dir=config.split_dir,
        short_side=short_side,
        only=only,
        on_line=on_line,
    )
