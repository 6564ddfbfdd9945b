"""Training, resuming, the feature cache and evaluation on the real VOC samples with the real
frozen EfficientNet-Lite0 + MiniLM pair that pip installs."""

from __future__ import annotations

import json

import pytest
import torch

from fusioner.cli import main
from fusioner.config import load_config
from fusioner.engine import train as train_module
from fusioner.engine.cache import CorruptShardError, FeatureCache, cache_key, fill_cache
from fusioner.engine.train import train
from fusioner.errors import FusionerError


def _config(voc_folder, tmp_path, name, **kw):
    base = dict(
        dataset="folder",
        data_path=str(voc_folder),
        unseen_classes=["cow", "sheep"],
        vision="efficientnet_lite0",
        text="minilm_l6",
        preset="tiny",
        image_size=128,
        batch_size=4,
        epochs=20,
        lr=2e-3,
        warmup_steps=2,
        num_negatives=2,
        out_dir=str(tmp_path / name),
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return load_config(None, **base)


def test_train_then_eval_end_to_end(voc_folder, tmp_path):
    config = _config(voc_folder, tmp_path, "run", max_steps=24)
    result = train(config)
    assert result.steps == 24
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.8 * first, result.losses
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()

    assert main(["eval", "--model", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["one_way"]["per_class"]) == {"cow", "sheep"}
    for value in (metrics["one_way"]["miou"], metrics["one_way"]["fbiou"], metrics["gzss"]["hiou"]):
        assert 0.0 <= value <= 1.0


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    voc_folder, tmp_path, monkeypatch
):
    real_loss, calls = train_module.mask_loss, {"n": 0}

    def nan_on_step_three(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "mask_loss", nan_on_step_three)
    out = tmp_path / "diverged"
    message = r"the loss is nan at step 3; last good checkpoint: .*step-00000002"
    with pytest.raises(FusionerError, match=message):
        train(_config(voc_folder, tmp_path, "diverged", max_steps=6, checkpoint_every=2))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (out / "model").exists()  # no model is written from a diverged run


def test_an_update_beyond_float32_stops_training_as_divergence(voc_folder, tmp_path):
    # lr=1e38 is a valid float32, but Adam's first step (lr / its bias correction 0.1) is not.
    message = r"the update at step 1 overflows float32 \(lr 1e\+38\); last good checkpoint: none yet"
    with pytest.raises(FusionerError, match=message):
        train(_config(voc_folder, tmp_path, "overflow", max_steps=2, warmup_steps=0, lr=1e38))
    assert not (tmp_path / "overflow" / "model").exists()


def test_resume_after_a_kill_ends_with_the_same_weights(voc_folder, tmp_path, monkeypatch):
    uninterrupted = train(_config(voc_folder, tmp_path, "a", max_steps=6, checkpoint_every=3))

    real_loss, calls = train_module.mask_loss, {"n": 0}

    def dies_on_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "mask_loss", dies_on_step_five)
    config = _config(voc_folder, tmp_path, "b", max_steps=6, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-00000003"]
    monkeypatch.setattr(train_module, "mask_loss", real_loss)
    with pytest.raises(Exception, match="--resume"):
        train(config)  # refuses to silently start over a run that has checkpoints
    resumed = train(config, resume=True)

    assert resumed.steps == 6
    a, b = uninterrupted.model.head.state_dict(), resumed.model.head.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_cached_and_uncached_training_give_the_same_losses(voc_folder, tmp_path):
    # Cached tokens are fp16 (each rounded by up to 2^-11 relative), tokens on the fly fp32. The first
    # loss agrees to 1e-4; over five AdamW steps the rounding compounds, so later ones agree to 0.5%.
    # A real mismatch (tokens of another image, a flipped grid) moves the loss by far more.
    kw = dict(max_steps=5, augment=[])
    cached = torch.tensor(train(_config(voc_folder, tmp_path, "cached", use_cache=True, **kw)).losses)
    uncached = torch.tensor(train(_config(voc_folder, tmp_path, "uncached", use_cache=False, **kw)).losses)
    torch.testing.assert_close(cached[0], uncached[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached, uncached, rtol=5e-3, atol=1e-4)


def test_cache_keys_follow_backbone_and_preprocessing(voc_folder, tmp_path):
    from fusioner.adapters import create_vision
    from fusioner.data import build_split

    config = _config(voc_folder, tmp_path, "unused")
    vision = create_vision("efficientnet_lite0")
    split = build_split(config)
    cache = FeatureCache(tmp_path / "c", cache_key(vision, 64, "voc"))
    assert fill_cache(cache, vision, split.train, 64, progress=False) == len(split.train)
    assert fill_cache(cache, vision, split.train, 64, progress=False) == 0  # all there already

    other_size = FeatureCache(tmp_path / "c", cache_key(vision, 96, "voc"))
    assert other_size.dir != cache.dir and len(other_size) == 0
    with torch.no_grad():
        next(vision.parameters()).add_(1.0)
    vision._fingerprint = None
    changed = FeatureCache(tmp_path / "c", cache_key(vision, 64, "voc"))
    assert changed.dir != cache.dir and len(changed) == 0


def test_corrupted_shard_is_reported_and_rebuilt(voc_folder, tmp_path, caplog):
    from fusioner.adapters import create_vision
    from fusioner.data import build_split

    vision = create_vision("efficientnet_lite0")
    split = build_split(_config(voc_folder, tmp_path, "unused"))
    key = cache_key(vision, 64, "voc")
    cache = FeatureCache(tmp_path / "c", key)
    fill_cache(cache, vision, split.train, 64, progress=False)
    first_id = split.train.item_id(0)
    expected = cache.read(first_id).tokens.clone()
    shard = next(cache.dir.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated

    reopened = FeatureCache(tmp_path / "c", key)
    with pytest.raises(CorruptShardError, match=str(shard)):
        reopened.read(first_id)
    with caplog.at_level("WARNING"):
        assert fill_cache(reopened, vision, split.train, 64, progress=False) == len(split.train)
    assert str(shard) in caplog.text
    torch.testing.assert_close(FeatureCache(tmp_path / "c", key).read(first_id).tokens, expected)


def test_sliding_windows_cover_the_original_resolution(voc_folder, tmp_path):
    from fusioner.data import build_split
    from fusioner.engine.evaluate import EvalSettings, evaluate
    from fusioner.inference import fixed_logits, sliding_logits
    from fusioner.model import FusionerModel

    config = _config(voc_folder, tmp_path, "unused", image_size=64)
    model = FusionerModel.from_config(config).eval()
    text = model.text(["cow", "sheep", "person"])
    with torch.no_grad():
        square = torch.rand(3, 64, 64)
        # One window exactly the image: the same logits as the fixed-size path.
        torch.testing.assert_close(
            sliding_logits(model, square, text, 64), fixed_logits(model, square, text, 64)
        )
        wide = torch.rand(3, 100, 150)
        logits = sliding_logits(model, wide, text, 64)
        assert logits.shape == (3, 100, 150) and torch.isfinite(logits).all()
        # Windows overlap: a pixel's logit is the mean over the windows that cover it, so it differs
        # from what the single top-left window alone predicts there (tokens see other context).
        single = fixed_logits(model, wide[:, :64, :64], text, 64)
        assert not torch.allclose(logits[..., 40:64, 40:64], single[..., 40:64, 40:64])

    split = build_split(config)
    metrics = evaluate(
        model,
        split.val,
        seen=split.seen,
        unseen=split.unseen,
        settings=EvalSettings(64, "sliding"),
        progress=False,
    )
    assert set(metrics["one_way"]["per_class"]) == {"cow", "sheep"}


def test_gradient_accumulation_counts_optimizer_steps(voc_folder, tmp_path):
    result = train(_config(voc_folder, tmp_path, "accum", batch_size=2, grad_accum=2, max_steps=3))
    assert result.steps == 3 and len(result.losses) == 3
    state = json.loads((tmp_path / "accum" / "train_state.json").read_text())
    assert state == {"steps": 3, "total_steps": 3, "finished": True}


def test_pixel_augmentations_refuse_the_cache_and_train_without_it(voc_folder, tmp_path):
    from fusioner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\['crop', 'jitter'\] change the pixels.*use_cache=false"):
        train(_config(voc_folder, tmp_path, "cached_crop", augment=["hflip", "crop", "jitter"], max_steps=1))
    result = train(
        _config(
            voc_folder, tmp_path, "crop", augment=["hflip", "crop", "jitter"], use_cache=False, max_steps=2
        )
    )
    assert result.steps == 2
