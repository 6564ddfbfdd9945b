"""Evaluation protocols: 1-way zero-shot (HSNet) and generalized zero-shot (seen + unseen, one pass).

Images are evaluated at their own resolution: either resized to ``image_size`` and the logits
resized back (``eval_mode: fixed``, can read the feature cache), or with overlapping
``image_size`` windows over the original image whose logits are averaged (``sliding``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from fusioner.data.base import IGNORE, SegDataset
from fusioner.engine.cache import FeatureCache
from fusioner.engine.metrics import GZSSMeter, OneWayMeter
from fusioner.io import atomic_write_json
from fusioner.model import FusionerModel, labels_from_logits


@dataclass
class EvalSettings:
    image_size: int
    mode: str = "fixed"  # fixed | sliding
    threshold: float = 0.5


def _tokens(model: FusionerModel, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
    out = model.vision(image)
    return out.tokens, out.grid


def fixed_logits(
    model: FusionerModel, image: Tensor, text: Tensor, size: int, cached: Tensor | None = None
) -> Tensor:
    """image ``3 H W``, text ``q k ct`` (q queries of k names each) -> logits ``q k H W``."""
    h, w = image.shape[-2:]
    if cached is not None:
        tokens, grid = cached.flatten(0, 1)[None].float(), (cached.shape[0], cached.shape[1])
    else:
        small = F.interpolate(
            image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        tokens, grid = _tokens(model, small)
    tokens = tokens.to(text.device).expand(text.shape[0], -1, -1)
    logits = model.head(tokens, grid, text)  # at the decoder's resolution: resized once, below
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


def sliding_logits(model: FusionerModel, image: Tensor, text: Tensor, size: int) -> Tensor:
    """Average the logits of ``size x size`` windows (stride 2/3 size) over the original image."""
    h, w = image.shape[-2:]
    ph, pw = max(h, size), max(w, size)
    padded = F.pad(image, (0, pw - w, 0, ph - h))
    stride = max(1, size * 2 // 3)
    ys = sorted({min(y, ph - size) for y in range(0, ph - size + stride, stride)})
    xs = sorted({min(x, pw - size) for x in range(0, pw - size + stride, stride)})
    total = torch.zeros(text.shape[0], text.shape[1], ph, pw, device=text.device)
    count = torch.zeros(1, 1, ph, pw, device=text.device)
    for y in ys:
        for x in xs:
            tokens, grid = _tokens(model, padded[None, :, y : y + size, x : x + size])
            logits = model.head(tokens.expand(text.shape[0], -1, -1), grid, text, (size, size))
            total[..., y : y + size, x : x + size] += logits.float()
            count[..., y : y + size, x : x + size] += 1
    return (total / count)[..., :h, :w]


@torch.no_grad()
def evaluate(
    model: FusionerModel,
    dataset: SegDataset,
    *,
    seen: list[str],
    unseen: list[str],
    settings: EvalSettings,
    cache: FeatureCache | None = None,
    progress: bool = True,
) -> dict:
    """1-way on every unseen name present in an image (queried alone), plus one multi-class protocol.

    - ``gzss`` (when there are seen names): every seen and unseen name in one pass, mIoU on seen,
      on unseen, and hIoU;
    - ``n_way`` (evaluation-only sets such as Mosaic-4, where nothing is "seen"): the sample's own
      names in one pass (4-way on Mosaic-4), IoU per name over the whole set.

    Returns ``{"one_way": {miou, fbiou, per_class}, "gzss" | "n_way": {...}}``.
    """
    model.eval()
    device = next(model.head.parameters()).device
    names = list(seen) + list(unseen)
    index = {name: j for j, name in enumerate(names)}
    text_all = model.text(names).to(device)  # v ct
    queried = set(unseen)
    one_way = OneWayMeter(list(unseen))
    multi = GZSSMeter(names, set(unseen), ignore_index=-1)

    def logits_for(sample, text: Tensor) -> Tensor:
        image = sample["image"].to(device)
        if settings.mode == "sliding":
            return sliding_logits(model, image, text, settings.image_size)
        cached = (
            cache.read(sample["id"]).tokens.to(device)
            if cache is not None and sample["id"] in cache
            else None
        )
        return fixed_logits(model, image, text, settings.image_size, cached)

    for i in tqdm(range(len(dataset)), desc="evaluating", unit="img", disable=not progress):
        sample = dataset[i]
        mask = sample["mask"].to(device)
        valid = mask != IGNORE
        # The sample's labels in the evaluated label space (0 = background; unknown names ignored).
        # Ignore is -1 there: with more than 254 names, name 254 would otherwise read as 255.
        lut = torch.full((256,), -1, dtype=torch.long, device=device)
        lut[0] = 0
        for label, name in enumerate(sample["names"], start=1):
            if name in index:
                lut[label] = index[name] + 1
        target = lut[mask.clamp(0, 255)]

        present = [
            n for n in dict.fromkeys(sample["names"]) if n in queried and (target == index[n] + 1).any()
        ]
        if present:
            text = text_all[[index[n] for n in present]][:, None]  # p 1 ct: each name queried alone
            probs = logits_for(sample, text)[:, 0].float().sigmoid()
            for name, prob in zip(present, probs, strict=True):
                one_way.update(name, prob >= settings.threshold, target == index[name] + 1, valid)

        if seen:
            logits = logits_for(sample, text_all[None])  # 1 v H W: every name in one pass
            multi.update(labels_from_logits(logits, settings.threshold)[0], target)
        else:
            own = list(dict.fromkeys(n for n in sample["names"] if n in index))
            logits = logits_for(sample, text_all[[index[n] for n in own]][None])  # 1 k H W
            local = labels_from_logits(logits, settings.threshold)[0]
            to_global = torch.tensor([0] + [index[n] + 1 for n in own], device=device)
            multi.update(to_global[local], target)

    return {"one_way": one_way.compute(), "gzss" if seen else "n_way": multi.compute()}


def evaluate_model(
    model_source: str, config_path: str | None, overrides: list[str], *, out: str | None = None
) -> Path:
    """Load a model, build the config's validation split, evaluate, write ``metrics.json``."""
    from fusioner.config import load_config
    from fusioner.data import build_split
    from fusioner.engine.train import prepare_cache

    model = FusionerModel.from_pretrained(model_source)
    run_config = Path(model_source) / "config.yaml"
    if config_path is None and run_config.is_file():
        config_path = str(run_config)  # a run directory: evaluate on what it was trained for
    elif config_path is None:  # a bare model (e.g. from the Hub): its own input size, data from overrides
        overrides = [f"image_size={model.image_size}", *overrides]
    config = load_config(config_path, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    split = build_split(config)
    cache = None
    if config.use_cache and config.eval_mode == "fixed" and config.image_size == model.image_size:
        cache = prepare_cache(config, model.vision, split.val, device)
    settings = EvalSettings(config.image_size, config.eval_mode, model.threshold)
    metrics = evaluate(model, split.val, seen=split.seen, unseen=split.unseen, settings=settings, cache=cache)
    metrics["model"] = str(model_source)
    metrics["config"] = config.to_dict()
    target = (
        Path(out)
        if out
        else (Path(model_source) if Path(model_source).is_dir() else Path(".")) / "metrics.json"
    )
    if target.suffix != ".json":
        target = target / "metrics.json"
    atomic_write_json(target, metrics)
    return target
