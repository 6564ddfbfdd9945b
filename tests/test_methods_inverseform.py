"""InverseForm's boundary distance, SAZS's third edge term (Qualcomm-AI-research/InverseForm
``models/loss/utils.py`` InverseTransform2D, ``models/InverseForm.py`` InverseNet; the same code in
Liuxinyv/SAZS ``utils.py``). No released regressor is available offline: the distance is checked
with hand-built regressors whose output follows from their weights, and the loading path with a
random-init regressor written to a file, as a user's copy of the released one would be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from fusioner.config import load_config
from fusioner.errors import ConfigError, FusionerError
from fusioner.methods.inverseform import InverseNet, inverseform_distance, load_inverseform, tiles
from fusioner.methods.sazs_edges import INVERSE_WEIGHT, EdgeHead, edge_map, inverseform_input, sazs_edge_loss
from fusioner.model.losses import resize_labels

SIDE = 4  # tests' tile side (the released regressor's is 224): maps are resized to 12 x 24


def _difference_net(bias: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)) -> InverseNet:
    """Outputs ``(relu(S1 - S2), relu(S2 - S1), 0, 0) + bias`` per tile, S = a tile's pixel sum:
    with no bias, its distance is |S1 - S2|, and 0 for identical tiles."""
    net = InverseNet(SIDE)
    n = SIDE * SIDE
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        first, second, last = net.fc[0], net.fc[2], net.fc[4]
        first.weight[0, :n], first.weight[0, n:] = 1.0, -1.0
        first.weight[1, :n], first.weight[1, n:] = -1.0, 1.0
        second.weight[0, 0] = second.weight[1, 1] = 1.0
        last.weight[0, 0] = last.weight[1, 1] = 1.0
        last.bias.copy_(torch.tensor(bias))
    return net.requires_grad_(False)


def test_the_released_layout_is_an_mlp_over_two_224_maps_to_4_parameters():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in InverseNet().state_dict().items()}
    assert shapes == {
        "fc.0.weight": (1000, 2 * 224 * 224), "fc.0.bias": (1000,), "fc.2.weight": (32, 1000),
        "fc.2.bias": (32,), "fc.4.weight": (4, 32), "fc.4.bias": (4,),
    }  # fmt: skip


def test_identical_maps_are_at_distance_zero():
    maps = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(0))
    distance = inverseform_distance(_difference_net(), maps, maps.clone())
    torch.testing.assert_close(distance, torch.tensor(0.0), atol=1e-5, rtol=0)  # float32 sums


def test_the_distance_is_the_mean_over_all_tiles_of_the_outputs_norm():
    # Maps already 3 x 6 tiles of SIDE: the resize keeps them. Image 0 differs by one full tile of
    # ones (S1 - S2 = 16), image 1 by a half tile on the other side (S2 - S1 = 8); 36 tiles in all.
    predicted, target = torch.zeros(2, 1, 3 * SIDE, 6 * SIDE), torch.zeros(2, 1, 3 * SIDE, 6 * SIDE)
    predicted[0, 0, SIDE : 2 * SIDE, 5 * SIDE :] = 1.0
    target[1, 0, :SIDE, : SIDE // 2] = 1.0
    distance = inverseform_distance(_difference_net(), predicted, target)
    torch.testing.assert_close(distance, torch.tensor((16.0 + 8.0) / 36))
    # A constant output of (3, 4, 0, 0) adds its norm, 5, on identical tiles.
    torch.testing.assert_close(
        inverseform_distance(_difference_net((3.0, 4.0, 0, 0)), target, target), torch.tensor(5.0)
    )


def test_maps_are_resized_bilinearly_to_three_by_six_tiles_whatever_their_aspect():
    maps = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    cut = tiles(maps, SIDE)
    assert cut.shape == (18, SIDE, SIDE)
    big = F.interpolate(maps, size=(3 * SIDE, 6 * SIDE), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(cut[1 * 6 + 4], big[SIDE : 2 * SIDE, 4 * SIDE : 5 * SIDE])  # tile (1, 4)


def _save(net: InverseNet, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_a_saved_regressor_loads_frozen_with_the_official_names_or_a_wrapper_prefix(tmp_path):
    torch.manual_seed(0)
    net = InverseNet(SIDE)
    for prefix in ("", "module."):
        loaded = load_inverseform(_save(net, tmp_path / f"r{prefix}.safetensors", prefix))
        assert loaded.side == SIDE and not loaded.training
        assert all(not p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(loaded.state_dict(), net.state_dict())
    torch.save(net.state_dict(), tmp_path / "regressor.pth")  # the released file's format
    torch.testing.assert_close(load_inverseform(tmp_path / "regressor.pth").fc[4].bias, net.fc[4].bias)


def test_a_missing_file_or_other_keys_name_the_config_key_and_the_expected_file(tmp_path):
    with pytest.raises(FusionerError, match=r"'inverseform_weights'.*distance_measures_regressor\.pth"):
        load_inverseform(tmp_path / "nope.pth")
    state = {k.replace("fc.2", "fc.3"): v for k, v in InverseNet(SIDE).state_dict().items()}
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        FusionerError, match=r"'inverseform_weights'.*missing \['fc.2.bias'.*distance_measures"
    ):
        load_inverseform(tmp_path / "bad.safetensors")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(FusionerError, match=r"'inverseform_weights'.*cannot read"):
        load_inverseform(tmp_path / "junk.pth")


def test_the_term_is_the_distance_from_the_official_zero_map_to_the_label_edges():
    # SAZS's edge branch has one channel: log_softmax over it is 0, and the term has no gradient.
    torch.manual_seed(0)
    head, net = EdgeHead(6), InverseNet(SIDE).requires_grad_(False)
    features, named = torch.randn(2 * 2, 6, 8, 8), torch.randn(2, 2, 8, 8)
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 4:20, 10:30] = 1
    class_idx = torch.tensor([[0, 1]] * 2)
    logits = head(features, 2)
    assert inverseform_input(logits).abs().max() == 0
    edges = resize_labels(edge_map(target).long(), (8, 8)).float()[:, None]
    expected = INVERSE_WEIGHT * inverseform_distance(net, torch.zeros_like(edges), edges)
    with_term = sazs_edge_loss(head, features, named, target, class_idx, net)
    without = sazs_edge_loss(head, features, named, target, class_idx)
    torch.testing.assert_close(with_term - without, expected)
    (grad_with,) = torch.autograd.grad(with_term, head.proj.weight)
    (grad_without,) = torch.autograd.grad(without, head.proj.weight)
    torch.testing.assert_close(grad_with, grad_without)


def test_a_training_step_with_a_saved_regressor_runs(tmp_path, edge_objective_step):
    torch.manual_seed(0)
    path = _save(InverseNet(SIDE), tmp_path / "regressor.safetensors")
    objective, loss = edge_objective_step(inverseform_weights=str(path))
    assert not any(k.startswith("inverse") for k in objective.state_dict())  # never checkpointed
    assert torch.isfinite(loss) and objective.edge_head.proj.weight.grad.abs().sum() > 0
    assert objective.inverse_net[0].fc[0].weight.grad is None


def test_inverseform_weights_needs_the_edge_objective():
    with pytest.raises(ConfigError, match=r"'inverseform_weights'.*sazs_edge_weight"):
        load_config(None, inverseform_weights="distance_measures_regressor.pth")


@pytest.mark.parametrize("key", ["inverseform_weights", "teacher_weights"])
def test_relative_weights_paths_resolve_like_vision_weights(tmp_path, monkeypatch, key):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "regressor.pth").write_bytes(b"")
    (folder / "c.yaml").write_text(f"sazs_edge_weight: 1\n{key}: regressor.pth\n")
    monkeypatch.chdir(tmp_path)
    assert Path(getattr(load_config(folder / "c.yaml"), key)) == folder / "regressor.pth"
    (tmp_path / "here.pth").write_bytes(b"")
    assert (
        Path(getattr(load_config(None, [f"{key}=here.pth", "sazs_edge_weight=1"]), key))
        == tmp_path / "here.pth"
    )
    # Not a file here (a Hub id, say): kept as written.
    assert getattr(load_config(None, [f"{key}=org/name", "sazs_edge_weight=1"]), key) == "org/name"
