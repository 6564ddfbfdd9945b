"""Evaluation protocols over one dataset, with the logits of fusioner/inference.py.

For every image the model scores every name of the vocabulary once. Both fusion rules score a
name independently of the others asked with it, so one pass gives every protocol:

- ``one_way`` (HSNet): unseen names queried alone, binary fg / bg, one episode per (image, name)
  pair: the split list's pairs when the dataset was built from one (PASCAL-5i / COCO-20i with
  HSNet's lists: one list line, one episode; an image holding two fold classes but listed once is
  scored once, for its listed class), else every unseen name present in an image. HSNet's
  conventions (fusioner/engine/metrics.py): a logit exactly at the threshold is background, and a
  fold class with no episode stays in the mean at IoU 0;
- ``one_way_seen``: every seen name present in an image, the same way;
- ``gzss`` (ZegFormer / ZegCLIP): every seen and unseen name in one pass, mIoU on seen, on unseen,
  hIoU, under each of ``GZSS_PROTOCOLS`` (``protocols``: ``zegclip_voc``, target background
  ignored, ZegCLIP's published VOC figures; ``background_as_class``, background pixels count);
  the top-level figures are the dataset's default protocol, named in ``protocol`` (ZegCLIP's for
  PASCAL-5i / COCO-20i, background as a class for folder datasets: ``Split.gzss_protocol``);
  ``gzss_calibrated``: the same with ``seen_bias`` subtracted from the seen names' logits
  (calibrated stacking), the bias chosen on another split by :func:`choose_seen_bias` for the
  default protocol's hIoU;
- ``n_way`` (evaluation-only sets such as Mosaic-4, where nothing is "seen"): the sample's own
  names in one pass (4-way on Mosaic-4).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fusioner.data.base import IGNORE, SegDataset
from fusioner.data.ov import OVDataset
from fusioner.data.splits import ListDataset
from fusioner.engine.cache import FeatureCache
from fusioner.engine.metrics import GZSSMeter, OneWayMeter, check_gzss_protocol, one_way_foreground
from fusioner.engine.refine_cache import prepare_refine_store
from fusioner.errors import ConfigError
from fusioner.eval_output import metrics_target, write_metrics
from fusioner.inference import decoder_logits, image_logits
from fusioner.labels import ImageScores
from fusioner.model import FusionerModel
from fusioner.run import RunDir

log = logging.getLogger(__name__)

# Seen-bias candidates, in cosine units (multiplied by the head's 1/temperature): 0 to 0.4.
BIAS_GRID = tuple(i / 100 for i in range(41))


@dataclass
class EvalSettings:
    image_size: int
    mode: str = "fixed"  # fixed | sliding (fusioner/inference.py)
    threshold: float = 0.5


def _target(sample, index: dict[str, int], device: torch.device) -> Tensor:
    """The sample's labels in the evaluated label space (0 = background, j + 1 = names[j], -1 = ignore).

    Ignore is -1, not 255: with more than 254 names, name 254 would read as 255. Names the
    vocabulary does not hold are ignored.
    """
    lut = torch.full((256,), -1, dtype=torch.long, device=device)
    lut[0] = 0
    for label, name in enumerate(sample["names"], start=1):
        if name in index:
            lut[label] = index[name] + 1
    return lut[sample["mask"].to(device).clamp(0, 255)]


class _Scorer:
    """Logits of one sample over a vocabulary, from cached tokens when the cache holds them.

    In fixed mode they stay at the head's resolution (:class:`ImageScores` resizes what is scored:
    the best name per pixel without ``v`` full-size maps, exactly, fusioner/labels.py). A refiner's
    per-image inputs (SAZS's eigen-masks) are computed once per cached item of ``dataset`` and stored
    beside its features (fusioner/engine/refine_cache.py), then read back here.
    """

    def __init__(
        self,
        model,
        names: list[str],
        settings: EvalSettings,
        cache: FeatureCache | None,
        dataset: SegDataset,
        progress: bool = True,
    ) -> None:
        self.model, self.settings = model, settings
        self.cache = cache if settings.mode == "fixed" else None
        self.device = next(model.head.parameters()).device
        self.text = model.text(names).to(self.device)  # v ct
        refiner = getattr(model, "refiner", None)
        self.store = prepare_refine_store(
            self.cache, refiner, dataset, settings.image_size, self.device, progress=progress
        )

    def __call__(self, sample, rows: list[int] | None = None) -> ImageScores:
        tokens = cls = None
        if self.cache is not None and sample["id"] in self.cache:
            item = self.cache.read(sample["id"])
            tokens = item.tokens.to(self.device)
            cls = item.cls.to(self.device) if item.cls is not None else None
        text = self.text if rows is None else self.text[rows]
        image = sample["image"].to(self.device)
        size = tuple(image.shape[-2:])
        if self.settings.mode == "fixed":
            # The stored inputs are those of the cached tokens: served only with them.
            stored = tokens is not None and self.store is not None
            with self.store.serving(sample["id"]) if stored else nullcontext():
                logits = decoder_logits(self.model, image, text, self.settings.image_size, tokens, cls)
            return ImageScores(logits, size)
        logits = image_logits(self.model, image, text, size=self.settings.image_size, mode=self.settings.mode)
        return ImageScores(logits, size)


def _listed_episodes(dataset: SegDataset, names: list[str]) -> dict[int, list[str]] | None:
    """HSNet's 1-way episodes by image index: the split list's (image, name) lines for ``names``,
    one entry per line, in file order; None when the dataset was not built from a list."""
    if not isinstance(dataset, ListDataset) or dataset.listed_pairs is None:
        return None
    episodes: dict[int, list[str]] = {}
    for index, name in dataset.pairs(names):
        episodes.setdefault(index, []).append(name)
    return episodes


def _refuse_ov(dataset: SegDataset) -> None:
    """The open-vocabulary benchmarks' protocol is n-way over all their names with bounded memory
    (engine/suite.py); these protocols would hold k x h x w logits and cannot tell label 255 of an
    847-name set from ignore."""
    if isinstance(dataset, OVDataset):
        raise ConfigError(
            f"dataset {dataset.name} is scored n-way over all its {len(dataset.names)} names: "
            f"fusioner eval --model MODEL --suite ov --only {dataset.name} data_root=DIR"
        )


@torch.no_grad()
def evaluate(
    model: FusionerModel,
    dataset: SegDataset,
    *,
    seen: list[str],
    unseen: list[str],
    settings: EvalSettings,
    cache: FeatureCache | None = None,
    seen_bias: float | None = None,
    gzss_protocol: str = "background_as_class",
    progress: bool = True,
) -> dict:
    """Every protocol of the module docstring on ``dataset``; ``seen_bias`` adds ``gzss_calibrated``.

    Returns ``{"one_way", "one_way_seen", "gzss" [, "gzss_calibrated"]}`` with seen names, else
    ``{"one_way", "n_way"}``. ``gzss_protocol`` (one of ``GZSS_PROTOCOLS``) is the protocol of the
    top-level GZSS figures; every protocol's are under ``gzss["protocols"]``.
    """
    check_gzss_protocol(gzss_protocol)
    _refuse_ov(dataset)
    model.eval()
    names = list(seen) + list(unseen)
    index = {name: j for j, name in enumerate(names)}
    score = _Scorer(model, names, settings, cache, dataset, progress)
    device = score.device
    is_seen = torch.tensor([n in set(seen) for n in names], device=device)
    one_way, one_way_seen = OneWayMeter(list(unseen)), OneWayMeter(list(seen))
    multi = GZSSMeter(names, set(unseen), ignore_index=-1, protocol=gzss_protocol)
    calibrated = (
        GZSSMeter(names, set(unseen), ignore_index=-1, protocol=gzss_protocol)
        if seen_bias is not None
        else None
    )
    episodes = _listed_episodes(dataset, list(unseen)) if seen else None

    for i in tqdm(range(len(dataset)), desc="evaluating", unit="img", disable=not progress):
        sample = dataset[i]
        target = _target(sample, index, device)
        valid = sample["mask"].to(device) != IGNORE  # 1-way: pixels of names outside the vocabulary count
        if not seen:
            own = list(dict.fromkeys(n for n in sample["names"] if n in index))
            logits = score(sample, [index[n] for n in own])  # k names: the sample's own
            present = [n for n in own if (target == index[n] + 1).any()]
            for name in present:
                pred = one_way_foreground(logits.of([own.index(name)])[0], settings.threshold)
                one_way.update(name, pred, target == index[name] + 1, valid)
            local = logits.labels(settings.threshold)
            multi.update(torch.tensor([0] + [index[n] + 1 for n in own], device=device)[local], target)
            continue
        logits = score(sample)  # every name in one pass
        for name in dict.fromkeys(sample["names"]):
            if name not in index or not (target == index[name] + 1).any():
                continue
            if episodes is not None and name in one_way.class_names:
                continue  # the split list decides the unseen names' episodes (below)
            meter = one_way if name in one_way.class_names else one_way_seen
            pred = one_way_foreground(logits.of([index[name]])[0], settings.threshold)
            meter.update(name, pred, target == index[name] + 1, valid)
        for name in (episodes or {}).get(i, ()):  # one list line, one episode (present or not)
            pred = one_way_foreground(logits.of([index[name]])[0], settings.threshold)
            one_way.update(name, pred, target == index[name] + 1, valid)
        multi.update(logits.labels(settings.threshold), target)
        if calibrated is not None:
            calibrated.update(logits.labels(settings.threshold, seen_bias=seen_bias, seen=is_seen), target)

    if unseen and not one_way.pairs.any():
        log.warning(
            "no image of this split holds an unseen name (%s): the 1-way unseen mIoU is undefined (NaN)",
            ", ".join(unseen),
        )
    if not seen:
        # n-way over each image's own names: nothing is held out, and background is a label there.
        return {"one_way": one_way.compute(), "n_way": multi.compute("background_as_class")}
    metrics = {"one_way": one_way.compute(), "one_way_seen": one_way_seen.compute(), "gzss": multi.report()}
    if calibrated is not None:
        metrics["gzss_calibrated"] = {**calibrated.report(), "seen_bias": seen_bias}
    return metrics


@torch.no_grad()
def choose_seen_bias(
    model: FusionerModel,
    dataset: SegDataset,
    *,
    seen: list[str],
    unseen: list[str],
    settings: EvalSettings,
    cache: FeatureCache | None = None,
    gzss_protocol: str = "background_as_class",
    progress: bool = True,
) -> tuple[float, dict[float, dict]]:
    """The seen bias (logit units) of :data:`BIAS_GRID` with the best GZSS hIoU (``gzss_protocol``'s)
    on ``dataset``.

    Returns ``(bias, {bias: GZSS metrics at that bias})``. One pass: per pixel, the best seen and
    the best unseen logit decide the label for every candidate bias, so the grid costs one scoring.
    """
    model.eval()
    names = list(seen) + list(unseen)
    index = {name: j for j, name in enumerate(names)}
    score = _Scorer(model, names, settings, cache, dataset, progress)
    scale = float(model.head.scale)
    biases = [round(c * scale, 4) for c in BIAS_GRID]
    meters = [GZSSMeter(names, set(unseen), ignore_index=-1, protocol=gzss_protocol) for _ in biases]
    floor = math.log(settings.threshold / (1 - settings.threshold))  # the logit of the threshold
    k = len(seen)
    for i in tqdm(range(len(dataset)), desc="choosing seen_bias", unit="img", disable=not progress):
        sample = dataset[i]
        target = _target(sample, index, score.device)
        logits = score(sample)
        s_val, s_idx = logits.best(slice(None, k))
        u_val, u_idx = logits.best(slice(k, None))
        for bias, meter in zip(biases, meters, strict=True):
            seen_wins = s_val - bias >= u_val  # ties go to the seen name, as argmax over [seen; unseen]
            best = torch.where(seen_wins, s_val - bias, u_val)
            label = torch.where(seen_wins, s_idx + 1, u_idx + k + 1)
            meter.update(torch.where(best >= floor, label, 0), target)
    curve = {bias: meter.report() for bias, meter in zip(biases, meters, strict=True)}
    hiou = {b: -1.0 if math.isnan(m["hiou"]) else m["hiou"] for b, m in curve.items()}
    best_bias = max(hiou, key=lambda b: (hiou[b], -b))  # the smallest of equally good biases
    return best_bias, curve


def evaluate_model(
    model_source: str, config_path: str | None, overrides: list[str], *, out: str | None = None
) -> Path:
    """Load a model, build the config's evaluation split, evaluate, write ``metrics.json``.

    GZSS is reported raw and calibrated; the calibration's ``seen_bias`` is chosen on ``val``. With
    ``eval_split: val`` that is the reported split itself, which ``gzss_calibrated.chosen_on`` says.
    """
    from fusioner.config import load_config, override_keys
    from fusioner.data import build_split
    from fusioner.engine.cache import prepare_cache
    from fusioner.methods import build_refiner

    model = FusionerModel.from_pretrained(model_source)
    run_config = RunDir(model_source).config
    if config_path is None and run_config.is_file():
        config_path = str(run_config)  # a run directory: evaluate on what it was trained for
    elif config_path is None:  # a bare model (e.g. from the Hub): its own input size, data from overrides
        overrides = [f"image_size={model.image_size}", *overrides]
    config = load_config(config_path, overrides)
    # Where the figures go (the run's metrics.json only under its own config), refused before any work.
    target = metrics_target(model_source, config, out)
    if config.refine != "none" or "refine" in override_keys(overrides):
        # Refinement is training-free: `eval refine=spectral` applies it to any trained model.
        model.refiner = build_refiner(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    split = build_split(config)
    dataset = split.evaluation_set(config.eval_split)
    _refuse_ov(dataset)  # before any feature is computed
    use_cache = config.use_cache and config.eval_mode == "fixed" and config.image_size == model.image_size

    def cache_for(ds: SegDataset) -> FeatureCache | None:
        return prepare_cache(config, model.vision, ds, device) if use_cache else None

    settings = EvalSettings(config.image_size, config.eval_mode, model.threshold)
    bias, curve = None, None
    if split.seen and split.unseen:
        bias, curve = choose_seen_bias(
            model,
            split.val,
            seen=split.seen,
            unseen=split.unseen,
            settings=settings,
            cache=cache_for(split.val),
            gzss_protocol=split.gzss_protocol,
        )
    metrics = evaluate(
        model,
        dataset,
        seen=split.seen,
        unseen=split.unseen,
        settings=settings,
        cache=cache_for(dataset),
        seen_bias=bias,
        gzss_protocol=split.gzss_protocol,
    )
    if bias is not None:
        metrics["gzss_calibrated"]["chosen_on"] = "val"
        metrics["gzss_calibrated"]["val_hiou_by_bias"] = {str(b): m["hiou"] for b, m in curve.items()}
    metrics["eval_split"] = config.eval_split
    metrics["model"] = str(model_source)
    metrics["config"] = config.to_dict()
    return write_metrics(target, metrics)
