"""CLIP-ZSS's defining operations (arXiv 2310.02296; no public code), each on a hand-built or random
case whose expected numbers come from the formula the module documents (methods/clip_zss.py,
methods/pseudo_labels.py, methods/teacher.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from fusioner.methods.clip_zss import (
    GlobalLearning,
    Synthesizer,
    anchor_loss,
    bank_infonce,
    class_centroids,
    seen_and_pseudo_loss,
)
from fusioner.methods.pseudo_labels import (
    clip_zss_pseudo_labels,
    merge_similar,
    seeded_kmeans,
    window_seeds,
)


# -- pixel learning: pseudo-labels from the teacher's dense tokens ----------------------------------
def test_window_seeds_are_the_mean_unit_token_of_each_window():
    units = F.normalize(torch.randn(4 * 5, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    eligible = torch.ones(20, dtype=torch.bool)
    eligible[0] = False  # left out of its window's mean
    seeds = window_seeds(units, (4, 5), eligible, 2)
    grid = units.view(4, 5, 3)
    # 2 x 3 windows (the last column of windows is one token wide), row-major.
    expected = []
    for r in range(0, 4, 2):
        for c in range(0, 5, 2):
            block = [
                grid[i, j]
                for i in range(r, min(r + 2, 4))
                for j in range(c, min(c + 2, 5))
                if (i, j) != (0, 0)
            ]
            expected.append(F.normalize(torch.stack(block).mean(0), dim=0))
    torch.testing.assert_close(seeds, torch.stack(expected))


def test_seeded_kmeans_returns_the_summed_points_and_sizes_of_its_clusters():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    points = F.normalize(torch.stack([a, a + 0.1 * b, b, b + 0.2 * a, b]), dim=-1)
    seeds = torch.stack([a, b, F.normalize(a + b, dim=0) * 0 + torch.tensor([-1.0, 0.0])])  # third never wins
    sums, sizes = seeded_kmeans(points, seeds)
    torch.testing.assert_close(sizes, torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(sums, torch.stack([points[:2].sum(0), points[2:].sum(0)]))


def test_merging_joins_the_most_similar_clusters_into_their_size_weighted_direction():
    units = torch.tensor([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0]])  # cos(0, 1) = 0.96, the rest <= 0.28
    sizes = torch.tensor([3.0, 1.0, 2.0])
    sums = units * sizes[:, None]
    merged = merge_similar(sums, sizes, threshold=0.9, most=8)
    expected = torch.stack([F.normalize(3 * units[0] + 1 * units[1], dim=0), units[2]])
    torch.testing.assert_close(merged, expected)
    assert len(merge_similar(sums, sizes, threshold=0.99, most=8)) == 3  # nothing that similar
    assert len(merge_similar(sums, sizes, threshold=0.99, most=1)) == 1  # the cap merges the rest


def _regions(directions: int, gh: int = 8, gw: int = 8, c: int = 6) -> torch.Tensor:
    """Teacher tokens ``1 n c``: ``directions`` vertical stripes, each its own direction (+ noise)."""
    g = torch.Generator().manual_seed(1)
    basis = torch.eye(c)[:directions]
    stripe = torch.arange(gw) * directions // gw
    tokens = basis[stripe].expand(gh, gw, c) + 0.05 * torch.randn(gh, gw, c, generator=g)
    return tokens.reshape(1, gh * gw, c)


@pytest.mark.parametrize("directions", [2, 3])
def test_the_number_of_pseudo_classes_follows_the_image_not_a_fixed_k(directions):
    tokens = _regions(directions)
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[0, :8, :8] = 5  # annotated
    target[0, 60:, 60:] = -1  # ignored
    labels, counts = clip_zss_pseudo_labels(tokens, (8, 8), target, clusters=8, scales=(2, 4), merge=0.85)
    assert counts.tolist() == [directions]
    assert (labels[target != 0] == -1).all()
    # Each stripe is one pseudo-class: pixels of a stripe share their label, stripes differ.
    stripe = (torch.arange(64) // 8) * directions // 8  # the token stripe under each pixel
    ids = [labels[0, 20:56, stripe == s].unique().tolist() for s in range(directions)]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == directions


def test_pseudo_classes_never_exceed_the_cap():
    tokens = _regions(4)
    labels, counts = clip_zss_pseudo_labels(
        tokens, (8, 8), torch.zeros(1, 32, 32, dtype=torch.long), clusters=2
    )
    assert counts.tolist() == [2] and set(labels.unique().tolist()) == {0, 1}


# -- pixel learning: centroids, synthesizer, losses ---------------------------------------------------
def test_class_centroids_average_the_student_tokens_under_each_label():
    tokens = torch.arange(8.0).view(1, 4, 2)  # a 2 x 2 grid, token i = (2i, 2i+1)
    labels = torch.tensor([[[1, 1], [2, 0]]])  # one pixel per token
    centroids, present = class_centroids(tokens, (2, 2), labels, torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(centroids[0, 0], (tokens[0, 0] + tokens[0, 1]) / 2)
    torch.testing.assert_close(centroids[0, 1], tokens[0, 2])
    assert present.tolist() == [[True, True, False]] and centroids[0, 2].abs().sum() == 0


def test_the_synthesizer_attends_to_the_clip_cls_and_ignores_absent_slots():
    torch.manual_seed(0)
    synth = Synthesizer(vision_dim=6, clip_dim=5, text_dim=4, width=16, heads=2).eval()
    centroids, cls = torch.randn(1, 3, 6), torch.randn(1, 5)
    present = torch.tensor([[True, True, False]])
    out = synth(centroids, cls, present)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1, 3))
    assert not torch.allclose(synth(centroids, -cls, present), out)  # the CLS is read
    moved = centroids.clone()
    moved[0, 2] += 10  # an absent slot is not attended to
    torch.testing.assert_close(synth(moved, cls, present)[:, :2], out[:, :2])


def test_anchor_loss_is_one_minus_cosine_over_present_seen_slots():
    synthesized = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    text = torch.tensor([[[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]])
    present = torch.tensor([[True, True, False]])
    torch.testing.assert_close(anchor_loss(synthesized, text, present), torch.tensor(((1 - 0.6) + 0) / 2))


def test_seen_and_pseudo_loss_is_cross_entropy_over_seen_then_pseudo_names():
    # One image of 1 x 3 pixels: a seen pixel (label 4 = class_idx 3, slot 1), a pseudo pixel (id 0),
    # and a background pixel with no pseudo-class (left out). k = 2 seen slots, p = 2 pseudo slots,
    # the second absent from this image.
    logits = torch.tensor([[0.5, 2.0, 1.0], [1.5, 0.0, 3.0], [0.2, 1.0, 0.0], [9.0, 9.0, 9.0]])
    logits = logits.view(1, 4, 1, 3)
    labels = torch.tensor([[[4, 0, 0]]])
    class_idx = torch.tensor([[1, 3]])
    pseudo = torch.tensor([[[-1, 0, -1]]])
    present = torch.tensor([[True, False]])
    seen_pixel = -torch.log_softmax(torch.tensor([0.5, 1.5, 0.2]), 0)[1]
    pseudo_pixel = -torch.log_softmax(torch.tensor([2.0, 0.0, 1.0]), 0)[2]
    expected = (seen_pixel + pseudo_pixel) / 2
    torch.testing.assert_close(seen_and_pseudo_loss(logits, labels, class_idx, pseudo, present), expected)


# -- global learning ------------------------------------------------------------------------------------
def test_cls_query_attention_pooling_is_softmax_of_cls_against_the_dense_features():
    d = 4
    glm = GlobalLearning(dense_dim=d, clip_dim=d, bank=0)
    with torch.no_grad():
        for layer in (glm.query, glm.key, glm.value, glm.out):
            layer.weight.copy_(torch.eye(d))
            layer.bias.zero_()
    g = torch.Generator().manual_seed(0)
    dense, cls = torch.randn(2, 5, d, generator=g), torch.randn(2, d, generator=g)
    for i in range(2):
        weights = torch.softmax(torch.stack([cls[i] @ f / math.sqrt(d) for f in dense[i]]), 0)
        torch.testing.assert_close(glm.pool(dense, cls)[i], (weights[:, None] * dense[i]).sum(0))


def test_bank_infonce_takes_the_batch_and_the_bank_as_negatives():
    g = torch.Generator().manual_seed(0)
    pooled, cls, bank = (
        torch.randn(3, 4, generator=g),
        torch.randn(3, 4, generator=g),
        torch.randn(5, 4, generator=g),
    )
    keys = torch.cat([cls, bank])
    total = 0.0
    for i in range(3):
        sims = torch.stack([F.cosine_similarity(pooled[i], key, dim=0) for key in keys]) / 0.07
        total += -(sims[i] - torch.logsumexp(sims, 0))
    torch.testing.assert_close(bank_infonce(pooled, cls, bank), total / 3)


def test_the_cls_bank_is_first_in_first_out_and_feeds_the_next_batch():
    glm = GlobalLearning(dense_dim=2, clip_dim=2, bank=3)
    first, second = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[3.0, 0.0], [4.0, 0.0]])
    glm(torch.randn(2, 4, 2), first)
    assert int(glm.filled) == 2
    dense = torch.randn(2, 4, 2)
    expected = bank_infonce(glm.pool(dense, second), second, first)  # the first batch is the bank
    torch.testing.assert_close(glm(dense, second), expected)
    assert int(glm.filled) == 3 and int(glm.cursor) == 1
    torch.testing.assert_close(glm.bank[:, 0], torch.tensor([4.0, 2.0, 3.0]))  # 1 left first


def _config(**kw):
    base = dict(
        dice_weight=1.0, ce_weight=0.0, spectral_weight=0.0, spectral_eigs=2, spectral_segments=2,
        spectral_knn=0, seed=0, pseudo_labels="clip-zss", pseudo_weight=0.5, pseudo_clusters=4,
        pseudo_scales=["2", "4"], pseudo_merge=0.85, global_loss_weight=1.0, global_bank=8,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_a_student_without_cls_trains_both_terms_from_the_teachers_view():
    from fusioner.config import load_config
    from fusioner.methods.build import build_head
    from fusioner.methods.objective import Objective
    from fusioner.methods.teacher import TeacherOutput

    student = SimpleNamespace(embed_dim=12, has_cls=False, name="no-cls")
    text = SimpleNamespace(embed_dim=8)
    head = build_head(load_config(None, preset="tiny"), student, text)
    with pytest.raises(Exception, match="no CLS token"):
        Objective(_config(), head, student, 8)  # no teacher: nothing to query with
    teacher = SimpleNamespace(embed_dim=5)
    objective = Objective(_config(), head, student, 8, teacher)
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, :, :10] = 1
    view = TeacherOutput(
        _regions(2).expand(2, -1, -1)[..., :5].contiguous(), (8, 8), torch.randn(2, 5, generator=g)
    )
    loss = objective(
        head, torch.randn(2, 16, 12, generator=g), (4, 4), F.normalize(torch.randn(3, 8), dim=-1),
        torch.tensor([[0, 2], [0, 1]]), target, cls=None, teacher=view,
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss)
    assert objective.global_term.query.weight.grad is not None  # the global term trained
    assert objective.synthesizer.memory.weight.grad is not None  # the synthesizer read the CLS


# -- the teacher: a second frozen backbone, cached under its own key ---------------------------------
@pytest.fixture
def tiny_clip_teacher(monkeypatch):
    """The teacher factory (methods/teacher.py goes through ``fusioner.adapters``) builds CLIP at a
    tiny random-init width: the same open_clip adapter code as the real weights."""
    from functools import partial

    from test_methods_published import TINY_VISION

    import fusioner.adapters as adapters

    def tiny(create, name, weights=None, **kwargs):
        assert name == "clip_vitb16" and weights == "random"
        return create(name, weights, **{**TINY_VISION, **kwargs})

    monkeypatch.setattr(adapters, "create_vision", partial(tiny, adapters.create_vision))


def test_a_clip_teacher_beside_a_student_without_cls_is_cached_apart_and_also_runs_uncached(
    voc_folder, tmp_path, tiny_clip_teacher
):
    import dataclasses
    import json

    from fusioner.config import load_config
    from fusioner.engine.cache import FeatureCache
    from fusioner.engine.train import train

    config = load_config(
        None, dataset="folder", data_path=str(voc_folder), unseen_classes=["cow", "sheep"],
        vision="efficientnet_lite0", text="minilm_l6", preset="tiny", image_size=64, batch_size=2,
        epochs=1, max_steps=1, warmup_steps=0, num_negatives=2, pseudo_labels="clip-zss",
        global_loss_weight=1.0, teacher_vision="clip_vitb16", teacher_weights="random",
        out_dir=str(tmp_path / "cached"), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert train(config).steps == 1
    folders = {
        json.loads((d / "index.json").read_text())["key"]["vision"]: d for d in (tmp_path / "cache").iterdir()
    }
    assert set(folders) == {"efficientnet_lite0", "clip_vitb16"}  # the student's cache and the teacher's
    index = json.loads((folders["clip_vitb16"] / "index.json").read_text())
    teacher_cache = FeatureCache(tmp_path / "cache", index["key"])
    some = next(iter(index["items"]))
    assert teacher_cache.read(some).cls is not None  # the teacher's CLS is stored per item
    uncached = dataclasses.replace(config, use_cache=False, out_dir=str(tmp_path / "uncached"))
    assert train(uncached).steps == 1  # the teacher runs on the batch's images instead
