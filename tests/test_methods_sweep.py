"""configs/sweeps/methods.yaml runs every design on the CLIP pair it names: each row built on
``clip_vitb16`` + ``clip_vitb16_text`` with random weights at a tiny width (the same open_clip
adapter code as the real weights, only the width overridden), one training step and one evaluation."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
from test_methods_published import TINY_TEXT, TINY_VISION

from fusioner.sweep.expand import load_sweep

SWEEP = Path(__file__).parents[1] / "configs" / "sweeps" / "methods.yaml"


def _tiny(create, extra, name, weights=None, **kwargs):
    assert weights == "random", "the test runs on random weights only"
    return create(name, weights, **{**extra, **kwargs})


@pytest.fixture
def tiny_clip_adapters(monkeypatch):
    import fusioner.model.model as model_module

    monkeypatch.setattr(
        model_module, "create_vision", partial(_tiny, model_module.create_vision, TINY_VISION)
    )
    monkeypatch.setattr(model_module, "create_text", partial(_tiny, model_module.create_text, TINY_TEXT))
    # CLIP-ZSS's teacher (methods/teacher.py) is built through the adapters package
    import fusioner.adapters as adapters

    monkeypatch.setattr(adapters, "create_vision", partial(_tiny, adapters.create_vision, TINY_VISION))


def test_the_methods_sweep_names_the_clip_pair_and_every_design():
    sweep = load_sweep(SWEEP, [])
    assert {(r.config.vision, r.config.text) for r in sweep.runs} == {("clip_vitb16", "clip_vitb16_text")}
    offline = load_sweep(SWEEP.with_name("methods-efficientnet.yaml"), [])
    assert {r.config.vision for r in offline.runs} == {"efficientnet_lite0"}
    names = lambda s: sorted(r.labels["method"] for r in s.runs)  # noqa: E731
    assert names(sweep) == names(offline)


def test_every_design_of_the_methods_sweep_trains_a_step_and_evaluates_on_tiny_clip(
    voc_folder, tmp_path, tiny_clip_adapters
):
    from fusioner.cli import main
    from fusioner.engine.train import train

    overrides = [
        f"data_path={voc_folder}", "unseen_classes=[cow, sheep]", "image_size=64", "batch_size=2",
        "epochs=1", "max_steps=1", "warmup_steps=0", "num_negatives=2", "shuffle_names=false",
        "eval_split=val", "vision_weights=random", "text_weights=random", f"cache_dir={tmp_path / 'cache'}",
        "teacher_weights=random",
    ]  # fmt: skip
    sweep = load_sweep(SWEEP, overrides, out=tmp_path / "sweep")
    assert len(sweep.runs) == 9  # one per design (shuffled baselines overridden away)
    for run in sweep.runs:
        result = train(run.config)
        assert result.steps == 1, run.name
        assert main(["eval", "--model", str(run.config.out_dir)]) == 0, run.name
        metrics = json.loads((Path(run.config.out_dir) / "metrics.json").read_text())
        assert "gzss" in metrics, run.name


def test_zegclip_with_its_clip_prompts_trains_uncached_and_saves_them(
    voc_folder, tmp_path, tiny_clip_adapters
):
    import dataclasses

    import torch

    from fusioner.engine.train import train
    from fusioner.model import FusionerModel

    overrides = [
        f"data_path={voc_folder}", "unseen_classes=[cow, sheep]", "image_size=64", "batch_size=2",
        "epochs=1", "max_steps=2", "warmup_steps=0", "num_negatives=2", "shuffle_names=false",
        "eval_split=val", "vision_weights=random", "text_weights=random", "method=zegclip",
    ]  # fmt: skip
    run = load_sweep(SWEEP, overrides, out=tmp_path / "sweep").runs[0]
    config = dataclasses.replace(run.config, deep_prompts=2, use_cache=False)
    result = train(config)
    assert result.steps == 2
    prompts = result.model.head.clip_prompts.prompts
    loaded = FusionerModel.from_pretrained(Path(config.out_dir) / "model")
    assert torch.equal(loaded.head.clip_prompts.prompts, prompts.detach().cpu())
