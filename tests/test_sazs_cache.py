"""SAZS's eigen-masks precomputed once per cached image and read back at evaluation (issue 25):
fusioner/engine/refine_cache.py with methods/sazs.py, on the real VOC samples through the frozen
EfficientNet-Lite0 + MiniLM pair (and a tiny random-init CLIP as the ``refine_vision`` backbone)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext

import pytest
import torch

from fusioner.adapters import create_vision
from fusioner.config import load_config
from fusioner.data import build_split
from fusioner.engine import evaluate as evaluate_module
from fusioner.engine.cache import FeatureCache, cache_key, fill_cache
from fusioner.engine.evaluate import EvalSettings, evaluate
from fusioner.engine.refine_cache import RefineStore, prepare_refine_store
from fusioner.methods import sazs as sazs_module
from fusioner.methods.sazs import SAZSRefiner, binary_eigen_masks
from fusioner.model import FusionerModel

SIZE = 128  # an 8 x 8 token grid for EfficientNet-Lite0
TINY_VISION = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32))


def _config(root, tmp_path, **kw):
    base = dict(
        dataset="folder",
        data_path=str(root),
        unseen_classes=["cow", "sheep"],
        vision="efficientnet_lite0",
        text="minilm_l6",
        preset="tiny",
        image_size=SIZE,
        refine="sazs",
        sazs_min_iou=0.0,  # every name takes its best eigen-mask: the metrics hang on the masks
        spectral_eigs=3,
        out_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
    )
    return load_config(None, **{**base, **kw})


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return create_vision("clip_vitb16", weights="random", **TINY_VISION)


@pytest.fixture
def setup(voc_folder, tmp_path):
    """A private copy of the VOC folder (its files get touched), its split, a model with
    ``refine: sazs`` and the val split's feature cache."""
    root = tmp_path / "voc"
    shutil.copytree(voc_folder, root)
    config = _config(root, tmp_path)
    torch.manual_seed(0)
    model = FusionerModel.from_config(config).eval()
    split = build_split(config)
    cache = FeatureCache(tmp_path / "cache", cache_key(model.vision, SIZE, "voc", split.val.vocabulary))
    fill_cache(cache, model.vision, split.val, SIZE, progress=False)
    return model, split, cache


def _solves(monkeypatch) -> list[int]:
    """Counts the eigen-solver's calls from methods/sazs.py."""
    calls: list[int] = []
    real = sazs_module.laplacian_eigenvectors
    monkeypatch.setattr(sazs_module, "laplacian_eigenvectors", lambda *a: calls.append(1) or real(*a))
    return calls


def _evaluate(model, split, cache) -> str:
    metrics = evaluate(
        model,
        split.val,
        seen=split.seen,
        unseen=split.unseen,
        settings=EvalSettings(SIZE),
        cache=cache,
        progress=False,
    )
    return json.dumps(metrics, sort_keys=True)  # NaN compares equal as text


def test_stored_eigen_masks_equal_the_ones_solved_from_the_same_tokens(setup):
    model, split, cache = setup
    refiner = model.refiner
    store = prepare_refine_store(cache, refiner, split.val, SIZE, progress=False)
    assert store is not None and len(store) == len(split.val) == len(cache)
    for i in range(len(split.val)):
        item_id = split.val.item_id(i)
        tokens = cache.read(item_id).tokens
        fresh = binary_eigen_masks(tokens.flatten(0, 1)[None].float(), tuple(tokens.shape[:2]), 3)[0]
        stored = store.read(item_id)
        assert stored.dtype == torch.bool and stored.shape == (6, 8, 8)  # 2K masks on the grid
        assert torch.equal(stored, fresh)
    # Reopened from disk: the same masks, nothing to compute.
    again = RefineStore(cache, refiner)
    assert again.fill(split.val, SIZE, progress=False) == 0
    assert torch.equal(again.read(split.val.item_id(0)), store.read(split.val.item_id(0)))


def test_evaluation_with_a_cache_solves_once_per_image_then_only_reads(setup, monkeypatch):
    model, split, cache = setup
    solves = _solves(monkeypatch)
    first = _evaluate(model, split, cache)
    assert len(solves) == len(split.val)  # precomputed, one solve per image; scoring reads them
    solves.clear()
    assert _evaluate(model, split, cache) == first
    assert solves == []  # a second evaluation (another process, another run) solves nothing


def test_other_graph_settings_or_changed_features_compute_the_masks_again(setup, tiny_clip, monkeypatch):
    model, split, cache = setup
    n = len(split.val)
    base = SAZSRefiner(eigs=3)
    first = RefineStore(cache, base)
    assert first.fill(split.val, SIZE, progress=False) == n
    others = [
        SAZSRefiner(eigs=4),
        SAZSRefiner(eigs=3, knn=4),
        SAZSRefiner(eigs=3, vision=tiny_clip, vision_name="clip_vitb16"),
    ]
    dirs = {first.dir}
    for refiner in others:
        store = RefineStore(cache, refiner)
        assert store.dir not in dirs and len(store) == 0
        assert store.fill(split.val, SIZE, progress=False) == n
        dirs.add(store.dir)
    with torch.no_grad():  # the refine backbone's weights are part of the key
        next(tiny_clip.parameters()).add_(1.0)
    tiny_clip._fingerprint = None
    assert RefineStore(cache, others[-1]).dir not in dirs
    # min_iou only decides how the masks are used: the same store.
    assert RefineStore(cache, SAZSRefiner(min_iou=0.9, eigs=3)).dir == first.dir

    # Back to the first settings: found, nothing solved.
    solves = _solves(monkeypatch)
    assert RefineStore(cache, base).fill(split.val, SIZE, progress=False) == 0 and solves == []

    # An image edited after caching: the feature cache encodes it again, and its masks follow.
    image = next((split.val.root / "images").glob(f"{split.val.item_id(0)}.*"))
    os.utime(image, (image.stat().st_atime, image.stat().st_mtime + 10))
    assert fill_cache(cache, model.vision, split.val, SIZE, progress=False) == 1
    outdated = RefineStore(cache, base)
    assert isinstance(outdated.serving(split.val.item_id(0)), nullcontext)  # never served as current
    assert outdated.fill(split.val, SIZE, progress=False) == 1 and len(solves) == 1


@pytest.mark.parametrize("own_backbone", [False, True], ids=["run_tokens", "refine_vision"])
def test_evaluation_gives_the_same_metrics_with_and_without_the_stored_masks(
    setup, tiny_clip, monkeypatch, own_backbone
):
    model, split, cache = setup
    if own_backbone:
        model.refiner = SAZSRefiner(min_iou=0.0, eigs=3, vision=tiny_clip, vision_name="clip_vitb16")
    solves = _solves(monkeypatch)
    stored = _evaluate(model, split, cache)
    assert len(solves) == len(split.val)

    monkeypatch.setattr(evaluate_module, "prepare_refine_store", lambda *a, **k: None)
    solves.clear()
    on_the_fly = _evaluate(model, split, cache)
    assert len(solves) == len(split.val)  # the refiner solved for itself, once per image
    assert on_the_fly == stored

    model.refiner = None  # and the masks matter: without the refiner the figures differ
    assert _evaluate(model, split, cache) != stored


def test_the_refiner_never_serves_one_images_masks_for_another():
    """Tokens of the next image may take the address of the last one's: the per-view memo holds
    the tensor it was computed for, so it cannot match a new one."""
    refiner = SAZSRefiner(eigs=3)
    for seed in range(4):
        tokens = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(seed)).half().float()
        assert torch.equal(refiner.graph_masks(tokens, (8, 8)), binary_eigen_masks(tokens, (8, 8), 3))
        del tokens


def test_inside_precomputed_the_refiner_uses_the_given_masks_and_solves_nothing(monkeypatch):
    solves = _solves(monkeypatch)
    refiner = SAZSRefiner(min_iou=0.0, eigs=1)
    masks = torch.zeros(2, 2, 2, dtype=torch.bool)
    masks[0, 0] = True  # the top row, and its complement
    masks[1] = ~masks[0]
    logits = torch.tensor([[[[2.0, 1.0], [-1.0, -3.0]]]])  # predicts the top row
    with refiner.precomputed(masks):
        out = refiner(logits, torch.randn(1, 4, 8), (2, 2))
    assert solves == [] and torch.equal(out, logits)
    refiner(logits, torch.randn(1, 4, 8), (2, 2))
    assert len(solves) == 1  # outside, it solves again
