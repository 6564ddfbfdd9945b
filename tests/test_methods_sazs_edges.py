"""SAZS's boundary / edge constraint (Liuxinyv/SAZS ``utils.py`` JointEdgeSegLoss, ``fewshot_data/data/
pascal.py`` onehot_to_binary_edges), each term on a hand-built or random case whose expected numbers
come from the official formula, written out here pixel by pixel."""

from __future__ import annotations

import math

import torch

from fusioner.methods.sazs_edges import EdgeHead, balanced_edge_bce, edge_attention_loss, edge_map


def _brute_edges(labels: torch.Tensor, radius: float = 2.0) -> torch.Tensor:
    """The official rule by explicit distances: per class present, a class pixel is an edge when a
    non-class pixel or the one-pixel pad around the image lies within ``radius``; a non-class pixel
    when a class pixel does."""
    h, w = labels.shape
    inside = [(i, j) for i in range(-1, h + 1) for j in range(-1, w + 1)]
    out = torch.zeros(h, w, dtype=torch.bool)
    for c in labels[labels >= 0].unique().tolist():
        member = {(i, j) for i in range(h) for j in range(w) if labels[i, j] == c}
        others = [p for p in inside if p not in member]  # the pad ring is no class
        for i in range(h):
            for j in range(w):
                pool = others if (i, j) in member else member
                d = min(math.dist((i, j), p) for p in pool)
                out[i, j] |= 0 < d <= radius
    return out


def test_edges_are_the_pixels_within_two_of_a_class_boundary_and_the_image_border():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(9, 11, dtype=torch.long)
    labels[2:6, 3:8] = 3
    labels[7:, :4] = 1
    labels[0, 10] = -1  # ignore belongs to no class
    labels[4, 9] = int(torch.randint(4, 6, (1,), generator=g))
    torch.testing.assert_close(edge_map(labels[None])[0], _brute_edges(labels))


def test_an_image_of_one_class_has_edges_only_along_its_border():
    edges = edge_map(torch.zeros(1, 7, 7, dtype=torch.long))[0]
    assert edges[:2].all() and edges[-2:].all() and edges[:, :2].all() and edges[:, -2:].all()
    assert not edges[2:5, 2:5].any()  # distance 3 and more from the pad ring


def test_balanced_bce_weights_edges_by_the_non_edge_share_and_the_other_way_round():
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    edges = torch.tensor([[[True, False], [False, False]]])
    bce = lambda x, y: (
        -(
            y * math.log(torch.sigmoid(torch.tensor(x)))
            + (1 - y) * math.log(1 - torch.sigmoid(torch.tensor(x)))
        )
    )  # noqa: E731
    expected = (0.75 * bce(2.0, 1) + 0.25 * (bce(-1.0, 0) + bce(0.5, 0) + bce(-3.0, 0))) / 4
    torch.testing.assert_close(balanced_edge_bce(logits, edges), torch.tensor(float(expected)))


def test_edge_attention_is_weighted_cross_entropy_on_pixels_above_the_edge_logit():
    scores = torch.tensor(
        [[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 0.5]], [[0.2, 0.3, 0.1]]]]
    )  # 1 x 3 classes x 1 x 3
    target = torch.tensor([[[0, 2, 1]]])
    edge_logits = torch.tensor([[[0.9, 0.5, 1.2]]])  # pixel 1 (0.5 <= 0.8) is left out
    # Kept classes 0 and 1, one pixel each: weights 1 + (1 - 1/2) = 1.5; class 2 absent: weight 1.
    nll0 = -torch.log_softmax(scores[0, :, 0, 0], 0)[0]
    nll2 = -torch.log_softmax(scores[0, :, 0, 2], 0)[1]
    expected = (1.5 * nll0 + 1.5 * nll2) / (1.5 + 1.5)
    torch.testing.assert_close(edge_attention_loss(scores, target, edge_logits), expected)


def test_the_edge_head_takes_the_maximum_over_each_images_names():
    head = EdgeHead(3)
    features = torch.randn(2 * 4, 3, 5, 5)
    per_name = head.proj(features)[:, 0].view(2, 4, 5, 5)
    torch.testing.assert_close(head(features, 2), per_name.max(1).values)


def test_the_objective_trains_the_edge_branch_with_the_head(edge_objective_step):
    objective, loss = edge_objective_step()
    assert torch.isfinite(loss) and objective.edge_head.proj.weight.grad.abs().sum() > 0
