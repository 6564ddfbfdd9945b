"""ZegCLIP's transductive setting (``zegclip_self_training``, methods/zegclip_st.py) against the
official rule (ZiqinZhou66/ZegCLIP ``models/decode_heads/decode_seg.py`` ``forward_train``): every
pixel of an unseen class takes the unseen name of highest detached sigmoid score, seen / background /
ignored pixels keep their labels, nothing changes before the start step."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from fusioner.config import load_config
from fusioner.engine.train_data import TrainView
from fusioner.errors import ConfigError, FusionerError
from fusioner.methods.objective import Objective
from fusioner.methods.zegclip import ZegCLIPConfig, ZegCLIPHead
from fusioner.methods.zegclip_st import UNSEEN, pseudo_label, self_training_on

U = UNSEEN


def test_pseudo_labels_are_the_unseen_name_of_highest_sigmoid_on_unseen_pixels_only():
    # 3 seen names (labels 1..3), 2 unseen names: unseen name j answers label 4 + j.
    labels = torch.tensor([[[U, U, 1, U], [0, -1, U, 2]]])
    unseen_logits = torch.tensor(
        [
            [[2.0, -3.0, 9.0, 40.0], [9.0, 9.0, 0.0, 9.0]],  # name 0
            [[-1.0, 0.5, -9.0, 50.0], [-9.0, -9.0, 0.0, -9.0]],  # name 1
        ]
    )[None]
    # By hand: (0,0) 2 > -1 -> name 0 -> 4; (0,1) 0.5 > -3 -> name 1 -> 5; (0,3) sigmoid(40) and
    # sigmoid(50) are both 1.0 in float32, a tie -> the first name -> 4; (1,2) 0 = 0, a tie -> 4.
    # (0,2) seen 1, (1,0) background, (1,1) ignored, (1,3) seen 2: kept, however high name 0 scores.
    expected = torch.tensor([[[4, 5, 1, 4], [0, -1, 4, 2]]])
    assert torch.equal(pseudo_label(unseen_logits, labels, first=4), expected)
    assert torch.equal(labels, torch.tensor([[[U, U, 1, U], [0, -1, U, 2]]]))  # the input is untouched


def test_pseudo_labels_refuse_logits_of_another_size():
    with pytest.raises(ValueError, match="pseudo_label"):
        pseudo_label(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 2, dtype=torch.long), first=1)


def test_the_start_step_and_the_switch():
    on = SimpleNamespace(zegclip_self_training=True, zegclip_st_start=3)
    assert [self_training_on(on, s) for s in (0, 2, 3, 10)] == [False, False, True, True]
    assert self_training_on(on, None)
    off = SimpleNamespace(zegclip_self_training=False, zegclip_st_start=0)
    assert not self_training_on(off, 5)


class _Source:
    cached = False

    def __getitem__(self, index):
        # dataset labels: 1 cat (seen), 2 cow (unseen), 3 sheep (unseen), 255 ignore, 0 background
        mask = torch.tensor([[1, 2, 3], [0, 255, 2]], dtype=torch.long)
        return torch.zeros(3, 2, 3), mask, ("cat", "cow", "sheep")

    def __len__(self):
        return 1


def test_train_view_marks_unseen_pixels_only_in_the_transductive_setting():
    inductive = TrainView(_Source(), ["cat"], augment=[], seed=0)[0]["target"]
    assert inductive.tolist() == [[1, 0, 0], [0, -1, 0]]  # unseen pixels are background
    transductive = TrainView(_Source(), ["cat"], augment=[], seed=0, unseen=["cow", "sheep"])[0]["target"]
    assert transductive.tolist() == [[1, U, U], [0, -1, U]]


def _objective(start: int, unseen: torch.Tensor | None):
    torch.manual_seed(0)
    head = ZegCLIPHead(ZegCLIPConfig(vision_dim=16, text_dim=16, dim=16, heads=2, upsample=1)).eval()
    config = SimpleNamespace(
        dice_weight=1.0, ce_weight=0.0, spectral_weight=0.0, spectral_eigs=2, spectral_segments=2,
        spectral_knn=0, seed=0, pseudo_labels="none", pseudo_weight=0.0, pseudo_clusters=2,
        pseudo_scales=["1"], global_loss_weight=0.0, zegclip_self_training=True, zegclip_st_start=start,
    )  # fmt: skip
    objective = Objective(config, head, SimpleNamespace(embed_dim=16, has_cls=True), 16, unseen=unseen)
    calls = []
    loss = objective.method.loss

    def spy(logits, targets, valid):
        calls.append((logits.detach(), targets, valid))
        return loss(logits, targets, valid)

    objective.method = dataclasses.replace(objective.method, loss=spy)
    return head, objective, calls


def test_objective_scores_unseen_names_and_trains_them_on_their_pseudo_labels_from_the_start_step():
    vocab = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    unseen = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    head, objective, calls = _objective(start=2, unseen=unseen)
    target = torch.tensor([[[1, U, U, 0], [2, U, -1, 3], [0, 0, U, 3], [U, 1, 1, -1]]])  # b 4 4, grid 4x4
    tokens, cls = torch.randn(1, 16, 16), torch.randn(1, 16)
    args = (head, tokens, (4, 4), vocab, torch.tensor([[0]]), target)

    # Before the start step: ZegCLIP's inductive phase, seen names only, unseen pixels ignored.
    loss = objective(*args, cls=cls, step=1)
    logits, targets, valid = calls[-1]
    assert logits.shape[1] == 3 and torch.isfinite(loss)
    assert torch.equal(valid, target >= 0)
    for j in range(3):
        assert torch.equal(targets[:, j].bool(), target == j + 1)

    # From it on: 3 + 2 names; each unseen pixel is named by the head's own best unseen score.
    loss = objective(*args, cls=cls, step=2)
    logits, targets, valid = calls[-1]
    assert logits.shape[1] == 5 and torch.isfinite(loss)
    with torch.no_grad():
        direct = head(tokens, (4, 4), torch.cat([vocab, unseen])[None], cls=cls)
    torch.testing.assert_close(logits, direct)  # the unseen names are the given ones, after the seen
    best = logits[:, 3:].sigmoid().argmax(1)
    assert torch.equal(valid, target != -1)  # every unseen pixel now takes part, ignored ones do not
    for j in range(3):  # seen-labelled pixels never change
        assert torch.equal(targets[:, j].bool(), target == j + 1)
    for j in range(2):
        assert torch.equal(targets[:, 3 + j].bool(), (target == U) & (best == j))
    assert targets.sum(1)[target == U].eq(1).all()


def test_objective_needs_the_unseen_names():
    with pytest.raises(FusionerError, match="unseen names"):
        _objective(start=0, unseen=None)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"method": "fusioner"}, "zegclip option"),
        ({"drop_unseen_images": True}, "drop_unseen_images"),
        ({"pseudo_labels": "kmeans"}, "use one of them"),
        ({"zegclip_st_start": -1}, "zegclip_st_start"),
    ],
)
def test_config_refuses_what_the_transductive_setting_cannot_run(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, **{"method": "zegclip", "zegclip_self_training": True, **extra})
    assert (
        load_config(
            None, method="zegclip", zegclip_self_training="true", zegclip_st_start="5"
        ).zegclip_st_start
        == 5
    )


def test_a_tiny_transductive_training_runs_and_pseudo_labels_after_the_start(
    voc_folder, tmp_path, monkeypatch
):
    import fusioner.methods.objective as objective_module
    from fusioner.engine.train import train

    named = []

    def spy(unseen_logits, labels, first):
        out = pseudo_label(unseen_logits, labels, first)
        named.append(((labels == U).sum().item(), unseen_logits.shape[1], first))
        assert torch.equal(out[labels != U], labels[labels != U])
        return out

    monkeypatch.setattr(objective_module, "pseudo_label", spy)
    # person is unseen and shows in two training images beside seen names (car, motorbike); all 11
    # training images in one batch, two steps: step 0 inductive, step 1 self-training.
    config = load_config(
        None, method="zegclip", dataset="folder", data_path=str(voc_folder),
        unseen_classes=["cow", "sheep", "person"], vision="efficientnet_lite0", text="minilm_l6",
        preset="tiny", image_size=64, batch_size=11, epochs=2, lr=2e-3, warmup_steps=1,
        zegclip_self_training=True, zegclip_st_start=1,
        out_dir=str(tmp_path / "st"), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    result = train(config)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(named) == 1  # step 1 only
    pixels, u, first = named[0]
    assert pixels > 0 and u == 3 and first == VOC_SEEN + 1


VOC_SEEN = 20 - 3  # the folder's 20 names (background is label 0), less cow, sheep and person
