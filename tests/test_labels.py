"""fusioner/labels.py: full-size best names from decoder-resolution logits, exactly."""

import pytest
import torch
from torch.nn import functional as F

from fusioner import labels as labels_module
from fusioner.labels import best_name, upsample

SIZES = [
    ((14, 14), (56, 56)),
    ((28, 28), (224, 224)),
    ((13, 17), (100, 71)),
    ((20, 30), (11, 13)),
    ((7, 9), (7, 9)),
]


@pytest.mark.parametrize(("low", "full"), SIZES)
def test_upsample_is_bilinear_and_per_name(low, full):
    torch.manual_seed(0)
    logits = torch.randn(37, *low) * 5
    ours = upsample(logits, full)
    # Bilinear with half-pixel centres, as F.interpolate, to float rounding.
    reference = F.interpolate(logits[None], size=full, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    # A name's resized logits do not depend on the names resized with it (bit for bit).
    for rows in ([0], [3, 4, 5], list(range(1, 37, 3))):
        assert torch.equal(upsample(logits[rows], full), ours[rows])


def _reference(logits, size, bias):
    return (upsample(logits, size) - bias[:, None, None]).max(0)


def _cases():
    g = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.randn(1, 50, 4, 4, generator=g), size=(14, 14), mode="bilinear")[0] * 8
    ties = torch.randint(-2, 3, (30, 9, 11), generator=g).float()  # integer logits: ties everywhere
    ties[7] = ties[3]  # two names with the very same map
    flat = torch.zeros(40, 6, 6)  # every name ties everywhere
    rough = torch.randn(200, 12, 10, generator=g) * 14
    near = rough[:1].repeat(20, 1, 1) + torch.randn(20, 12, 10, generator=g) * 1e-6  # near-ties
    return [smooth, ties, flat, rough, near]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("size", [(56, 56), (37, 23), (5, 4)])
@pytest.mark.parametrize("biased", [False, True])
def test_best_name_equals_the_full_computation(case, size, biased, monkeypatch):
    monkeypatch.setattr(labels_module, "PAIRS_PER_STEP", 50)  # several bands of rows
    logits = _cases()[case]
    k = logits.shape[0]
    bias = (torch.arange(k) % 3 == 0).float() * 1.0 if biased else torch.zeros(k)
    value, index = best_name(logits, size, bias if biased else None)
    ref_value, ref_index = _reference(logits, size, bias)
    assert torch.equal(value, ref_value)
    assert torch.equal(index, ref_index)
    # ties go to the first name, as argmax over all k names
    assert torch.equal(index, (upsample(logits, size) - bias[:, None, None]).argmax(0))


def test_best_name_at_full_size_and_non_finite():
    logits = torch.randn(5, 8, 8)
    assert torch.equal(best_name(logits, (8, 8))[1], logits.argmax(0))
    logits[2, 3, 3] = torch.inf
    assert torch.equal(best_name(logits, (16, 16))[1], upsample(logits, (16, 16)).argmax(0))


def test_best_name_resizes_few_names(monkeypatch):
    """Smooth logits leave a handful of candidate names per block, not all of them."""
    seen = []
    original = labels_module._candidates
    monkeypatch.setattr(labels_module, "_candidates", lambda *a: seen.append(original(*a)) or seen[-1])
    logits = _cases()[0]
    best_name(logits, (56, 56))
    names, count = seen[0]
    assert count.min() >= 1 and count.float().mean() < logits.shape[0] / 5


@pytest.fixture(scope="module")
def tiny_model():
    """An untrained tiny decoupled head over the real offline backbones."""
    from fusioner.config import load_config
    from fusioner.model import FusionerModel

    torch.manual_seed(0)
    model = FusionerModel.from_config(load_config(None, preset="tiny", image_size=64)).eval()
    assert model.head.config.fusion_attention == "decoupled"
    return model


@torch.no_grad()
def test_decoupled_head_runs_its_patch_path_once(tiny_model):
    from fusioner import inference

    model = tiny_model
    calls = []
    hook = model.head.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        image, text = torch.rand(3, 40, 70), F.normalize(torch.randn(150, 384), dim=-1)
        low = inference.decoder_logits(model, image, text, 64)
    finally:
        hook.remove()
    assert len(calls) == 1 and low.shape[0] == 150  # 150 names > NAMES_PER_PASS, one decoder pass
    # the same numbers as one pass per chunk of names, to float rounding
    out = model.vision(inference.square_view(image, 64))
    chunks = torch.cat([model.head(out.tokens, out.grid, part[None]) for part in text.split(64)], dim=1)[0]
    torch.testing.assert_close(low, chunks, rtol=0, atol=1e-4)


@torch.no_grad()
def test_evaluation_scores_equal_the_full_computation(tiny_model):
    from fusioner.inference import decoder_logits, image_logits, labels_from_logits
    from fusioner.labels import ImageScores

    torch.manual_seed(2)
    image, text = torch.rand(3, 50, 90), F.normalize(torch.randn(40, 384), dim=-1)
    low = decoder_logits(tiny_model, image, text, 64)
    scores = ImageScores(low, (50, 90))
    full = upsample(low, (50, 90))
    seen = torch.arange(40) < 25
    for bias in (0.0, 0.3):
        expected = labels_from_logits(full[None], 0.5, seen_bias=bias, seen=seen)[0]
        assert torch.equal(scores.labels(0.5, seen_bias=bias, seen=seen), expected)
    assert torch.equal(scores.of([3, 17]), full[[3, 17]])
    value, index = scores.best(slice(25, None))
    assert torch.equal(index, full[25:].argmax(0)) and torch.equal(value, full[25:].amax(0))
    # and what predict computes (F.interpolate), up to float ties
    agree = (
        scores.labels(0.5) == labels_from_logits(image_logits(tiny_model, image, text, size=64)[None], 0.5)[0]
    )
    assert agree.float().mean() > 0.999
