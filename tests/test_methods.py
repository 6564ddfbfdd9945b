"""The field's designs as methods (issue 12): hand-built cases for each idea, save/load round trips
and one tiny training run per method on the real VOC samples."""

from __future__ import annotations

import json
import math

import pytest
import torch
from einops import rearrange

from fusioner.config import load_config
from fusioner.errors import ConfigError, FusionerError
from fusioner.inference import image_logits
from fusioner.methods import METHODS, build_refiner
from fusioner.methods.pseudo_labels import global_contrastive, kmeans_pseudo_labels
from fusioner.methods.spectral import SpectralRefiner, blend, segment_map, spectral_segments
from fusioner.model import FusionerModel


def _two_regions(gh: int = 6, gw: int = 8, c: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``1 (gh gw) c``: the left half near one vector, the right half near an orthogonal one."""
    g = torch.Generator().manual_seed(seed)
    left = torch.zeros(gh, gw, dtype=torch.bool)
    left[:, : gw // 2] = True
    a, b = torch.eye(c)[0], torch.eye(c)[1]
    tokens = torch.where(left[..., None], a, b) + 0.05 * torch.randn(gh, gw, c, generator=g)
    return rearrange(tokens, "gh gw c -> 1 (gh gw) c"), left.flatten()


# -- (a) spectral refinement --------------------------------------------------------------------
def test_spectral_segments_of_two_regions_separate_them():
    tokens, left = _two_regions()
    seg = spectral_segments(tokens, eigs=2, segments=2, seed=0)[0]
    assert set(seg[left].tolist()) == {seg[left][0].item()}
    assert set(seg[~left].tolist()) == {seg[~left][0].item()}
    assert seg[left][0] != seg[~left][0]


def test_spectral_segments_are_seeded_and_follow_regions_with_more_segments():
    tokens, left = _two_regions(seed=1)
    one = spectral_segments(tokens, eigs=3, segments=3, knn=8, seed=5)
    assert torch.equal(one, spectral_segments(tokens, eigs=3, segments=3, knn=8, seed=5))
    seg = one[0]
    assert not set(seg[left].tolist()) & set(seg[~left].tolist())  # no segment straddles the two


def test_refinement_with_weight_zero_equals_the_raw_logits_exactly():
    tokens, _ = _two_regions()
    logits = torch.randn(1, 3, 48, 64)
    refiner = SpectralRefiner(weight=0.0, eigs=2, segments=2)
    assert torch.equal(refiner(logits, tokens, (6, 8)), logits)
    seg = segment_map(spectral_segments(tokens, eigs=2, segments=2), (6, 8), (48, 64))
    assert torch.equal(blend(logits, seg, 2, 0.0), logits)


def test_full_refinement_makes_each_segment_constant_at_its_mean_probability():
    tokens, left = _two_regions()
    logits = torch.randn(1, 2, 6, 8)
    out = SpectralRefiner(weight=1.0, eigs=2, segments=2)(logits, tokens, (6, 8))
    flat, raw = out.sigmoid().flatten(2)[0], logits.sigmoid().flatten(2)[0]
    for region in (left, ~left):
        mean = raw[:, region].mean(-1, keepdim=True).expand(-1, int(region.sum()))
        assert torch.allclose(flat[:, region], mean, atol=1e-6)


def test_a_small_confident_object_survives_refinement_at_the_default_weight():
    # One segment, 10% of it a confident object: a logit-space mean (about -10) would erase it.
    tokens, _ = _two_regions()
    logits = torch.full((1, 1, 6, 8), -12.0)
    logits[0, 0, 0, :5] = 7.0
    out = SpectralRefiner(eigs=2, segments=1)(logits, tokens, (6, 8))
    assert (out[0, 0, 0, :5] > 0).all() and (out[0, 0, 1:] < 0).all()


def test_the_refiner_runs_inside_the_one_inference_path(voc_folder):
    config = load_config(None, preset="tiny", image_size=64, refine="spectral", refine_weight=1.0)
    model = FusionerModel.from_config(config).eval()
    assert model.refiner is not None
    image = torch.rand(3, 64, 64)
    text = model.text(["cat", "dog"])
    refined = image_logits(model, image, text, size=64)
    model.refiner = build_refiner({"refine": "none"})
    raw = image_logits(model, image, text, size=64)
    assert not torch.allclose(refined, raw)
    model.refiner = build_refiner({"refine": "spectral", "refine_weight": 0.0})
    assert torch.equal(image_logits(model, image, text, size=64), raw)


# -- (b) ZegCLIP --------------------------------------------------------------------------------
def _prompted(deep_prompts: int = 2) -> FusionerModel:
    torch.manual_seed(0)
    config = load_config(
        None, method="zegclip", vision="timm:vit_tiny_patch16_224", vision_weights="random",
        text="glove_50d", preset="tiny", image_size=32, deep_prompts=deep_prompts, use_cache=False,
    )  # fmt: skip
    return FusionerModel.from_config(config)


def test_deep_prompts_change_the_output_and_leave_the_backbone_bit_identical():
    model = _prompted()
    backbone = {k: v.clone() for k, v in model.vision.inner.state_dict().items()}
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.vision.inner(images).tokens
    out = model.vision(images)
    assert out.tokens.shape == plain.shape and not torch.allclose(out.tokens, plain)
    assert all(not p.requires_grad for p in model.vision.parameters())
    trained = list(model.head.parameters())
    assert any(p is model.head.prompts for p in trained)
    optimizer = torch.optim.SGD(trained, lr=1.0)
    before = model.head.prompts.detach().clone()
    model.head(out.tokens, out.grid, model.text(["cat", "dog"]), cls=out.cls).sum().backward()
    optimizer.step()
    assert model.head.prompts.grad is not None and not torch.equal(model.head.prompts, before)
    for key, value in model.vision.inner.state_dict().items():
        assert torch.equal(value, backbone[key]), key
    assert all(p.grad is None for p in model.vision.parameters())
    # Cached tokens are keyed on the fingerprint: other prompts, another key.
    before_fp = model.vision.fingerprint()
    with torch.no_grad():
        model.head.prompts.add_(1.0)
    assert model.vision.fingerprint() != before_fp != model.vision.inner.fingerprint()


def test_deep_prompts_refuse_the_cache_and_non_vit_backbones():
    with pytest.raises(ConfigError, match="deep_prompts.*cache cannot be used; set use_cache=false"):
        load_config(None, method="zegclip", deep_prompts=4)
    with pytest.raises(ConfigError, match="deep_prompts.*zegclip option"):
        load_config(None, method="fusioner", deep_prompts=4, use_cache=False)
    config = load_config(
        None, method="zegclip", deep_prompts=4, use_cache=False, preset="tiny", image_size=64
    )
    with pytest.raises(FusionerError, match="needs a CLIP or timm ViT backbone"):
        FusionerModel.from_config(config)


def test_zegclip_masks_are_independent_of_the_other_names_asked():
    config = load_config(None, method="zegclip", preset="tiny", image_size=64)
    model = FusionerModel.from_config(config).eval()
    tokens, grid = torch.randn(1, 16, model.vision.embed_dim), (4, 4)
    text = model.text(["cat", "dog", "bird"])
    with torch.no_grad():
        together = model.head(tokens, grid, text)
        alone = model.head(tokens, grid, text[1:2])
    assert together.shape == (1, 3, 16, 16)
    assert torch.allclose(together[:, 1:2], alone, atol=1e-5)


# -- (c) ZegFormer ------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", ["queries", "spectral"])
def test_zegformer_trains_its_groups_and_segment_classifier(grouping):
    config = load_config(None, method="zegformer", preset="tiny", image_size=64, zegformer_grouping=grouping)
    model = FusionerModel.from_config(config)
    tokens, grid = torch.randn(2, 16, model.vision.embed_dim), (4, 4)
    logits, aux = model.head(tokens, grid, model.text(["cat", "dog", "cow"]), return_aux=True)
    assert logits.shape == (2, 3, 16, 16) and torch.isfinite(logits).all()
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, :8] = 3
    loss = model.head.aux_loss(aux, target)
    loss.backward()
    assert loss > 0 and model.head.projection.weight.grad is not None  # the segment classifier trains
    if grouping == "queries":
        assert model.head.queries.grad is not None


# -- (d) CLIP-ZSS -------------------------------------------------------------------------------
def test_kmeans_pseudo_labels_never_cover_an_annotated_pixel():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 8 * 8, 12, generator=g)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[0, 5:37, 3:29] = 4  # an object whose edges cut through token cells
    target[1, 40:, :] = 2
    target[1, :3, :5] = -1  # ignore
    labels, protos = kmeans_pseudo_labels(tokens, (8, 8), target, clusters=3, scales=(1, 3), seed=0)
    assert labels.shape == target.shape and protos.shape == (2, 3, 12)
    assert (labels[target != 0] == -1).all()
    assert (labels >= 0).any() and set(labels.unique().tolist()) <= {-1, 0, 1, 2}


def test_global_term_prefers_each_image_its_own_cls():
    cls = torch.eye(4, 8)
    assert global_contrastive(cls.clone(), cls) < global_contrastive(cls.roll(1, 0), cls)


def test_global_loss_refuses_backbones_without_cls(voc_folder, tmp_path):
    load_config(None, global_loss_weight=0.1)  # the cache stores each image's CLS token (format 3)
    config = _train_config(voc_folder, tmp_path, "fusioner", global_loss_weight=0.1, use_cache=False)
    from fusioner.engine.train import train

    with pytest.raises(FusionerError, match="efficientnet_lite0.*has no CLS token"):
        train(config)


# -- plugging in: save / load, training on cached tokens, evaluation, predict ------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_round_trips_through_save_and_load(method, tmp_path):
    config = load_config(
        None, method=method, preset="tiny", image_size=64, refine="spectral", refine_weight=0.3
    )
    model = FusionerModel.from_config(config).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "m")
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    assert record["method"] == method and record["refine"]["refine"] == "spectral"
    loaded = FusionerModel.from_pretrained(tmp_path / "m").eval()
    assert type(loaded.head) is type(model.head) and loaded.refiner.weight == 0.3
    images = torch.rand(1, 3, 64, 64)
    assert torch.allclose(
        loaded.logits(images, ["cat", "dog"]), model.logits(images, ["cat", "dog"]), atol=1e-5
    )


def test_deep_prompts_round_trip_through_save_and_load(tmp_path):
    model = _prompted().eval()
    with torch.no_grad():
        model.head.prompts.add_(1.0)
    model.save_pretrained(tmp_path / "m")
    torch.manual_seed(0)  # the random ViT is rebuilt from the same seed; the prompts come from the file
    loaded = FusionerModel.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded.head.prompts, model.head.prompts)
    images = torch.rand(1, 3, 32, 32)
    assert torch.allclose(loaded.logits(images, ["cat"]), model.logits(images, ["cat"]), atol=1e-5)


def _train_config(voc_folder, tmp_path, method, **kw):
    base = dict(
        method=method, dataset="folder", data_path=str(voc_folder), unseen_classes=["cow", "sheep"],
        vision="efficientnet_lite0", text="minilm_l6", preset="tiny", image_size=64, batch_size=4,
        epochs=2, max_steps=3, lr=2e-3, warmup_steps=1, num_negatives=2,
        out_dir=str(tmp_path / f"{method}-{len(kw)}"), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    return load_config(None, **{**base, **kw})


@pytest.mark.parametrize(
    "method, extra",
    [
        ("zegclip", {}),
        ("zegformer", {}),
        ("fusioner", {"pseudo_labels": "kmeans", "spectral_weight": 0.5, "refine": "spectral"}),
    ],
)
def test_each_method_trains_on_cached_tokens_evaluates_and_predicts(voc_folder, tmp_path, method, extra):
    from fusioner.cli import main
    from fusioner.engine.train import train

    config = _train_config(voc_folder, tmp_path, method, **extra)
    result = train(config)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    run = tmp_path / f"{method}-{len(extra)}"
    assert main(["eval", "--model", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    hiou = metrics["gzss_calibrated"]["hiou"]  # NaN where the 3 val images show no seen name
    assert math.isnan(hiou) or 0.0 <= hiou <= 1.0
    image = next((voc_folder / "images").iterdir())
    assert (
        main(
            ["predict", str(image), "--model", str(run), "--classes", "cat,dog", "--out", str(tmp_path / "p")]
        )
        == 0
    )


def test_zegclip_with_deep_prompts_trains_without_the_cache(voc_folder, tmp_path):
    from fusioner.engine.train import train

    config = _train_config(
        voc_folder, tmp_path, "zegclip", vision="timm:vit_tiny_patch16_224", vision_weights="random",
        deep_prompts=2, use_cache=False, max_steps=2, global_loss_weight=0.1,
    )  # fmt: skip
    result = train(config)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_a_killed_run_with_an_objective_resumes_to_the_same_weights(voc_folder, tmp_path, monkeypatch):
    from fusioner.engine.train import train
    from fusioner.methods import objective as objective_module

    extra = {"pseudo_labels": "kmeans", "max_steps": 4, "checkpoint_every": 2}
    uninterrupted = train(_train_config(voc_folder, tmp_path / "a", "fusioner", **extra))
    real_loss, calls = objective_module.mask_loss, {"n": 0}

    def dies_late(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # step 4's first call: steps 1-3 made 2 calls each (names, pseudo-classes)
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(objective_module, "mask_loss", dies_late)
    config = _train_config(voc_folder, tmp_path / "b", "fusioner", **extra)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(objective_module, "mask_loss", real_loss)
    resumed = train(config, resume=True)
    assert resumed.steps == 4
    a, b = uninterrupted.model.head.state_dict(), resumed.model.head.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
