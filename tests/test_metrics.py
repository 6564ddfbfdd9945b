"""Metrics: hand-computed cases that catch wrong unions, forgotten ignores and wrong means."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import BinaryJaccardIndex, MulticlassJaccardIndex

from fusioner.engine.metrics import GZSS_PROTOCOLS, GZSSMeter, OneWayMeter, one_way_foreground
from fusioner.run import Metrics


def b(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# One-way (HSNet).


def test_one_way_union_is_pred_or_target():
    meter = OneWayMeter(["cat"])
    # fg: intersection {0}, union {0, 1, 2, 3} -> 1/4 (pred-only union: 1/2, target-only: 1/3)
    # bg: intersection {4}, union {1, 2, 3, 4} -> 1/4
    meter.update("cat", pred=b(1, 1, 0, 0, 0), target=b(1, 0, 1, 1, 0), valid=b(1, 1, 1, 1, 1))
    out = meter.compute()
    assert out["miou"] == pytest.approx(0.25) and out["per_class"] == {"cat": pytest.approx(0.25)}
    assert out["fbiou"] == pytest.approx(0.25)


def test_one_way_excludes_ignore_pixels():
    meter = OneWayMeter(["cat"])
    # Pixels 2 and 3 are ignore: fg 1/2 ({0} over {0, 1}), bg 1/2 ({4} over {1, 4}).
    meter.update("cat", pred=b(1, 1, 0, 0, 0), target=b(1, 0, 1, 1, 0), valid=b(1, 1, 0, 0, 1))
    out = meter.compute()
    assert out["miou"] == pytest.approx(0.5) and out["fbiou"] == pytest.approx(0.5)


def test_one_way_accumulates_over_the_test_set():
    meter = OneWayMeter(["cat"])
    meter.update("cat", pred=b(1, 1, 1, 0), target=b(1, 1, 1, 0))  # fg 3/3
    meter.update("cat", pred=b(1, 0, 0, 0), target=b(0, 0, 0, 0))  # fg 0/1
    # Summed counts give 3/4; a mean of per-pair IoUs would give 1/2.
    assert meter.compute()["miou"] == pytest.approx(0.75)
    assert meter.pairs.tolist() == [2] and meter.compute()["episodes"] == {"cat": 2}


def test_one_way_foreground_is_strictly_above_the_threshold():
    # The released code: a logit of exactly 0 is background. Decided on logits: sigmoid(+-1e-9)
    # rounds to exactly 0.5, so a rule on sigmoid outputs would call all three foreground.
    logits = torch.tensor([0.0, 1e-9, -1e-9, 2.0, -2.0])
    assert one_way_foreground(logits, 0.5).tolist() == [False, True, False, True, False]
    at = math.log(0.8 / 0.2)  # the logit of the threshold itself is background too
    assert one_way_foreground(torch.tensor([at, at + 1e-3]), 0.8).tolist() == [False, True]
    with pytest.raises(ValueError, match="threshold 1.0"):
        one_way_foreground(logits, 1.0)


def test_one_way_means_over_the_given_classes():
    fold = ["cat", "dog", "cow"]
    meter = OneWayMeter(fold)
    meter.update("cat", pred=b(1, 1, 0, 0), target=b(1, 1, 0, 0))  # fg 2/2, bg 2/2
    meter.update("dog", pred=b(1, 1, 0, 0), target=b(1, 0, 0, 0))  # fg 1/2, bg 2/3
    out = meter.compute()
    # HSNet: a class of the fold that was never evaluated scores 0 (union clamped to 1).
    assert out["per_class"] == {"cat": 1.0, "dog": 0.5, "cow": 0.0}
    assert out["miou"] == pytest.approx(0.5)
    # FB-IoU sums over classes before dividing: fg 3/4, bg 4/5 -> mean 0.775 (not a mean of means).
    assert out["fbiou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    two = OneWayMeter(["cat", "dog"])
    two.update("cat", pred=b(1, 1, 0, 0), target=b(1, 1, 0, 0))
    two.update("dog", pred=b(1, 1, 0, 0), target=b(1, 0, 0, 0))
    assert two.compute()["miou"] == pytest.approx(0.75)
    with pytest.raises(KeyError, match="'horse' is not one of"):
        two.update("horse", pred=b(1), target=b(1))  # a class outside the fold never enters a mean


def test_one_way_refuses_bad_input():
    meter = OneWayMeter(["cat"])
    with pytest.raises(ValueError, match="shapes differ"):
        meter.update("cat", pred=b(1, 0), target=b(1, 0, 0))
    with pytest.raises(TypeError, match="bool"):
        meter.update("cat", pred=torch.tensor([1, 0]), target=b(1, 0))
    with pytest.raises(ValueError, match="repeat"):
        OneWayMeter(["cat", "cat"])
    nothing_held_out = OneWayMeter([]).compute()  # a folder split without unseen classes
    assert math.isnan(nothing_held_out["miou"]) and nothing_held_out["per_class"] == {}
    never_present = OneWayMeter(["cat"]).compute()  # held out, but no image holds it: undefined, not 0
    assert math.isnan(never_present["miou"]) and math.isnan(never_present["per_class"]["cat"])


def test_one_way_agrees_with_torchmetrics():
    g = torch.Generator().manual_seed(0)
    meter, fg = OneWayMeter(["cat"]), BinaryJaccardIndex(ignore_index=255)
    fb = MulticlassJaccardIndex(num_classes=2, average="macro", ignore_index=255)
    for _ in range(5):
        pred = torch.rand(2, 16, 16, generator=g) > 0.5
        target = torch.rand(2, 16, 16, generator=g) > 0.6
        valid = torch.rand(2, 16, 16, generator=g) > 0.2
        meter.update("cat", pred, target, valid)
        labels = torch.where(valid, target.long(), torch.full_like(target, 255, dtype=torch.long))
        fg.update(pred.long(), labels)
        fb.update(pred.long(), labels)
    out = meter.compute()
    assert out["miou"] == pytest.approx(fg.compute().item(), abs=1e-6)
    # With one class, FB-IoU is the mean of the background and foreground IoUs.
    assert out["fbiou"] == pytest.approx(fb.compute().item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Generalized (ZegFormer / ZegCLIP).

NAMES = ["cat", "dog", "car"]


def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 255, 255])
    pred = torch.tensor([0, 1, 1, 1, 2, 3, 3, 0, 3, 1])
    return pred, target


def test_gzss_hand_computed():
    meter = GZSSMeter(NAMES, unseen={"car"})
    meter.update(*hand_case())
    out = meter.compute()
    # IoU = tp / (target + pred - tp): bg 1/3, cat 2/3, dog 1/2, car 1/3 (ignore pixels skipped).
    expected = {"background": 1 / 3, "cat": 2 / 3, "dog": 1 / 2, "car": 1 / 3}
    assert out["per_class"] == pytest.approx(expected)
    assert out["miou_seen"] == pytest.approx(7 / 12)  # cat, dog: background is not a seen class
    assert out["miou_unseen"] == pytest.approx(1 / 3)
    assert out["hiou"] == pytest.approx(14 / 33)  # 2 * 7/12 * 1/3 / (7/12 + 1/3)
    assert out["miou"] == pytest.approx(0.5)  # the three names


def test_gzss_zegclip_voc_ignores_target_background():
    meter = GZSSMeter(NAMES, unseen={"car"}, protocol="zegclip_voc")
    meter.update(*hand_case())
    out = meter.compute()
    # Target-background pixels 0, 1 leave every count: pixel 1's "cat" is no false positive, so cat
    # is 2/2; pixel 7 (car predicted background) is still a miss of car: car 1 / (2 + 2 - 1).
    assert out["protocol"] == "zegclip_voc"
    assert math.isnan(out["per_class"]["background"]) and list(out["per_class"])[0] == "background"
    assert [out["per_class"][n] for n in NAMES] == pytest.approx([1.0, 1 / 2, 1 / 3])
    assert out["miou_seen"] == pytest.approx(3 / 4) and out["miou_unseen"] == pytest.approx(1 / 3)
    assert out["hiou"] == pytest.approx(2 * 3 / 4 * 1 / 3 / (3 / 4 + 1 / 3))
    # The same confusion matrix gives the other protocol: every protocol is in report().
    report = meter.report()
    assert set(report["protocols"]) == set(GZSS_PROTOCOLS) and report["hiou"] == out["hiou"]
    assert report["protocols"]["background_as_class"]["hiou"] == pytest.approx(14 / 33)


def test_gzss_protocols_differ_where_background_is_predicted():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    names_everywhere = torch.tensor([1, 1, 2, 1, 1, 2])  # never predicts background
    background_everywhere = torch.zeros(6, dtype=torch.long)
    meter = GZSSMeter(["cat", "dog"], unseen={"dog"})
    meter.update(names_everywhere, target)
    zeg, bg = meter.compute("zegclip_voc"), meter.compute("background_as_class")
    assert zeg["miou_seen"] == 1.0 and zeg["miou_unseen"] == 1.0  # no cost for painting background
    assert bg["per_class"]["cat"] == pytest.approx(2 / 4) and bg["per_class"]["dog"] == pytest.approx(1 / 2)
    meter.reset()
    meter.update(background_everywhere, target)
    assert meter.compute("zegclip_voc")["per_class"]["cat"] == 0.0  # a predicted background is a miss
    with pytest.raises(
        ValueError, match="GZSS protocol 'voc' is not one of zegclip_voc, background_as_class"
    ):
        meter.compute("voc")


def test_eval_line_names_each_gzss_protocol():
    meter = GZSSMeter(NAMES, unseen={"car"}, protocol="zegclip_voc")
    meter.update(*hand_case())
    one_way = {"miou": 0.5, "fbiou": 0.6}
    line = Metrics({"one_way": one_way, "gzss": meter.report()}).line()
    zeg, bg = meter.compute("zegclip_voc"), meter.compute("background_as_class")
    assert f"GZSS [zegclip_voc] seen {zeg['miou_seen']:.4f} unseen {zeg['miou_unseen']:.4f}" in line
    assert f"; [background_as_class] seen {bg['miou_seen']:.4f}" in line
    assert line.index("[zegclip_voc]") < line.index("[background_as_class]")  # the headline's first


def test_gzss_ignore_pixels_change_nothing():
    pred, target = hand_case()
    with_ignore, without = GZSSMeter(NAMES, {"car"}), GZSSMeter(NAMES, {"car"})
    with_ignore.update(pred, target)
    without.update(pred[:8], target[:8])
    assert torch.equal(with_ignore.confusion, without.confusion)
    assert with_ignore.confusion.sum() == 8


def test_gzss_absent_classes_are_left_out():
    meter = GZSSMeter(NAMES, unseen={"car"})
    meter.update(torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 0, 3]))
    out = meter.compute()
    assert math.isnan(out["per_class"]["dog"])  # never in target nor prediction
    assert out["miou_seen"] == pytest.approx(1 / 2)  # cat only
    assert out["miou"] == pytest.approx((1 / 2 + 1) / 2)


def test_gzss_agrees_with_torchmetrics():
    g = torch.Generator().manual_seed(0)
    meter = GZSSMeter(NAMES, unseen={"dog"})
    reference = MulticlassJaccardIndex(num_classes=4, average="none", ignore_index=255)
    for _ in range(4):
        target = torch.randint(0, 4, (2, 12, 12), generator=g)
        target[torch.rand(2, 12, 12, generator=g) > 0.8] = 255
        noise = torch.randint(0, 4, (2, 12, 12), generator=g)
        pred = torch.where(torch.rand(2, 12, 12, generator=g) > 0.4, target.clamp(max=3), noise)
        meter.update(pred, target)
        reference.update(pred, target)
    out, iou = meter.compute(), reference.compute()
    assert list(out["per_class"].values()) == pytest.approx(iou.tolist(), abs=1e-6)
    assert out["miou"] == pytest.approx(iou[1:].mean().item(), abs=1e-6)
    assert out["miou_unseen"] == pytest.approx(iou[2].item(), abs=1e-6)


def test_gzss_refuses_bad_input():
    with pytest.raises(ValueError, match="unseen classes \\['horse'\\]"):
        GZSSMeter(NAMES, unseen={"horse"})
    with pytest.raises(ValueError, match="background"):
        GZSSMeter(["background", "cat"], unseen=set())
    meter = GZSSMeter(NAMES, unseen={"car"})
    with pytest.raises(ValueError, match="pred holds labels outside 0..3"):
        meter.update(torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target holds labels outside 0..3"):
        meter.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="integer"):
        meter.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert meter.confusion.sum() == 0  # refused updates leave no trace
