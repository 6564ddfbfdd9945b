import pytest
import torch

from fusioner.inference import labels_from_logits
from fusioner.model import FusionHead, HeadConfig


def _head(**kw):
    torch.manual_seed(0)
    return FusionHead(HeadConfig(vision_dim=24, text_dim=20, dim=32, depth=2, heads=4, **kw))


@pytest.mark.parametrize("decoder", ["default", "paper"])
def test_head_shapes_for_any_grid_and_k(decoder):
    head = _head(decoder=decoder)
    tokens = torch.randn(2, 3 * 5, 24)
    for k in (1, 7):
        logits = head(tokens, (3, 5), torch.randn(2, k, 20), (48, 80))
        assert logits.shape == (2, k, 48, 80)
    shared = head(tokens, (3, 5), torch.randn(4, 20), (48, 80))  # "k ct" shared by the batch
    assert shared.shape == (2, 4, 48, 80)


def test_paper_decoder_keeps_full_width_default_halves():
    paper, default = _head(decoder="paper"), _head()
    assert paper.decoder.out_dim == 32 and default.decoder.out_dim == 16
    assert sum(p.numel() for p in paper.parameters()) > sum(p.numel() for p in default.parameters())


def test_logits_are_bounded_cosines_over_temperature():
    head = _head(temperature=0.1)
    logits = head(torch.randn(1, 4, 24), (2, 2), torch.randn(1, 3, 20), (16, 16))
    assert logits.abs().max() <= 1 / 0.1 + 1e-4


def test_labels_from_logits_threshold_and_argmax():
    logits = torch.tensor([[[[5.0, -5.0, 0.1]]], [[[1.0, -5.0, 3.0]]]]).permute(1, 0, 2, 3)  # 1 2 1 3
    labels = labels_from_logits(logits, threshold=0.6)
    # pixel 0: class 1 wins (p=.99); pixel 1: both below threshold -> background; pixel 2: class 2 (p=.95)
    assert labels.tolist() == [[[1, 0, 2]]]


def test_each_class_token_gets_its_own_mask():
    """Swapping two class names in the query swaps their masks: K classes really are independent outputs."""
    head = _head().eval()
    tokens, text = torch.randn(1, 9, 24), torch.randn(1, 3, 20)
    a = head(tokens, (3, 3), text, (24, 24))
    b = head(tokens, (3, 3), text[:, [2, 1, 0]], (24, 24))
    torch.testing.assert_close(a[:, [2, 1, 0]], b, atol=1e-5, rtol=1e-5)


def test_fusion_mask_lets_names_read_patches_and_themselves_only():
    from fusioner.model.fusion import fusion_mask

    mask = fusion_mask(3, 2, torch.device("cpu"))
    assert mask[:3, :3].all() and not mask[:3, 3:].any()  # patches: patches only
    assert mask[3:, :3].all() and mask[3, 3] and mask[4, 4] and not mask[3, 4] and not mask[4, 3]


def test_mask_loss_ignores_void_and_balances_present_masks():
    from fusioner.model.losses import mask_loss

    targets = torch.zeros(1, 2, 4, 4)
    targets[0, 0, :2, :2] = 1  # class 0 present on 4 pixels, class 1 absent
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    perfect = torch.where(targets > 0, 20.0, -20.0)
    assert mask_loss(perfect, targets, valid).item() < 1e-3
    # A confident mistake on an ignored pixel costs nothing.
    wrong_void = perfect.clone()
    wrong_void[0, 1, 3, 3] = 20.0
    void = valid.clone()
    void[0, 3, 3] = False
    assert mask_loss(wrong_void, targets, void).item() < 1e-3
    assert mask_loss(wrong_void, targets, valid).item() > 0.5
    # Dice counts present masks only: the absent class adds BCE, not a dice term of ~1.
    empty = torch.full_like(perfect, -20.0)
    no_dice = mask_loss(empty, targets, valid, dice_weight=0.0)
    # 1 - (0 + 1) / (0 + 4 + 1) for the one present mask, nothing for the absent one.
    assert mask_loss(empty, targets, valid).item() == pytest.approx(no_dice.item() + 0.8, abs=1e-3)


def test_rank_loss_prefers_the_right_name_over_a_close_one():
    from fusioner.model.losses import rank_loss

    targets = torch.zeros(1, 2, 2, 2)
    targets[0, 0, 0] = 1  # top row: name 0; bottom row: background
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    right = torch.stack([torch.tensor([[9.0, 9.0], [-9.0, -9.0]]), torch.full((2, 2), -9.0)])[None]
    swapped = right[:, [1, 0]]
    # Both names above threshold on the top row: BCE alone would only push name 1 down, CE ranks them.
    tie = right.clone()
    tie[0, 1, 0] = 9.0
    assert rank_loss(right, targets, valid) < 1e-3
    assert rank_loss(tie, targets, valid) > 0.3
    assert rank_loss(swapped, targets, valid) > 5
    # Pixels left out of valid (a class that was not queried) cost nothing.
    valid[0, 0] = False
    assert rank_loss(swapped, targets, valid) < 1e-3


def test_hard_negatives_put_the_closest_absent_names_first():
    from fusioner.engine.train_data import TrainView

    class Source:
        cached = True

        def __len__(self):
            return 1

        def __getitem__(self, i):
            mask = torch.zeros(4, 4, dtype=torch.long)
            mask[:2] = 1  # label 1 = "a"
            return torch.zeros(2, 2, 8), mask, ("a",)

        def cls(self, i):  # a cached source hands out each item's CLS; this backbone has none
            return None

    seen = ["a", "b", "c", "d"]
    similarity = torch.tensor(
        [[1.0, 0.1, 0.9, 0.5], [0.1, 1.0, 0.0, 0.0], [0.9, 0.0, 1.0, 0.0], [0.5, 0.0, 0.0, 1.0]]
    )
    hard = TrainView(Source(), seen, augment=[], seed=0, similarity=similarity)[0]
    assert hard["present"] == [0] and hard["absent"] == [2, 3, 1]
    plain = TrainView(Source(), seen, augment=[], seed=0)[0]
    assert sorted(plain["absent"]) == [1, 2, 3]
