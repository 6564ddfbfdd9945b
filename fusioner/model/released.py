"""The released Fusioner head (chaofanma/Fusioner) as a :class:`FusionHead`, from its state dict.

The released ``FullModel`` names its trainable parts ``fusion.*`` (model/fusion.py ``Fusion``) and
``decoder.*`` (model/decoder.py ``Decoder``); its ``Head`` has no parameters. Every width and depth
is read from the tensors; only the attention heads (not visible in any shape) and the temperature
(not a parameter) are arguments. The head is the released configuration of ours (``RELEASED`` in
model/head.py): joint attention, the released decoder, LayerNorm eps 1e-5, bias-free output
projections, the patch tokens L2-normalised inside the head.

Released name -> ours (the only differences are names, a transpose and a reshape):

- ``fusion.visual_proj.{0,1,2}`` -> ``fusion.visual_in.{0,1,2}``; ``fusion.text_proj.{0,1}`` ->
  ``fusion.text_in.{0,1}``; ``fusion.blocks.*`` and ``fusion.norm.*`` keep their names.
- ``fusion.cls_emb`` ``(1, d)`` -> ``fusion.class_embed`` ``(d,)``.
- ``fusion.proj_patch`` / ``fusion.proj_classes`` ``(d, d)``, applied as ``x @ P`` -> the weight
  ``P.T`` of the bias-free ``fusion.visual_out`` / ``fusion.class_out``.
- ``decoder.conv_{0..3}`` -> ``decoder.stages.{i}.0``; ``decoder.conv_4`` -> ``decoder.out``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from fusioner.errors import DataError, FusionerError
from fusioner.model.decoder import RELEASED_STAGES
from fusioner.model.head import RELEASED, FusionHead, HeadConfig

PREFIXES = ("fusion.", "decoder.")


def _same(t: Tensor) -> Tensor:
    return t


def _transpose(t: Tensor) -> Tensor:
    return t.t()


# (released name pattern, our name, released tensor -> ours), and the same way back. First match
# wins. The decoder's released names depend on the stage number (conv_4 is our ``out``): _our_key.
_TO_OURS: list[tuple[str, str, Callable[[Tensor], Tensor]]] = [
    (r"fusion\.visual_proj\.(\d+)\.(weight|bias)", r"fusion.visual_in.\1.\2", _same),
    (r"fusion\.text_proj\.(\d+)\.(weight|bias)", r"fusion.text_in.\1.\2", _same),
    (r"fusion\.cls_emb", "fusion.class_embed", lambda t: t.reshape(-1)),
    (r"fusion\.proj_patch", "fusion.visual_out.weight", _transpose),
    (r"fusion\.proj_classes", "fusion.class_out.weight", _transpose),
    (r"fusion\.(blocks\.\d+\..+|norm\.(?:weight|bias))", r"fusion.\1", _same),
]
_TO_RELEASED: list[tuple[str, str, Callable[[Tensor], Tensor]]] = [
    (r"fusion\.visual_in\.(\d+)\.(weight|bias)", r"fusion.visual_proj.\1.\2", _same),
    (r"fusion\.text_in\.(\d+)\.(weight|bias)", r"fusion.text_proj.\1.\2", _same),
    (r"fusion\.class_embed", "fusion.cls_emb", lambda t: t[None]),
    (r"fusion\.visual_out\.weight", "fusion.proj_patch", _transpose),
    (r"fusion\.class_out\.weight", "fusion.proj_classes", _transpose),
    (r"fusion\.(blocks\.\d+\..+|norm\.(?:weight|bias))", r"fusion.\1", _same),
    (r"decoder\.stages\.(\d+)\.0\.(weight|bias)", r"decoder.conv_\1.\2", _same),
    (r"decoder\.out\.(weight|bias)", rf"decoder.conv_{RELEASED_STAGES}.\1", _same),
]


def _apply(rules: list[tuple[str, str, Callable[[Tensor], Tensor]]], key: str) -> tuple[str, Callable] | None:
    for pattern, name, convert in rules:
        if match := re.fullmatch(pattern, key):
            return match.expand(name), convert
    return None


def _our_key(key: str) -> tuple[str, Callable[[Tensor], Tensor]]:
    """Our name of a released key that :func:`head_from_released` has already checked."""
    stage = re.fullmatch(r"decoder\.conv_(\d+)\.(weight|bias)", key)
    if stage:  # the last conv (1x1) is our ``out``, the others our stages
        i, kind = int(stage[1]), stage[2]
        return (f"decoder.out.{kind}" if i == RELEASED_STAGES else f"decoder.stages.{i}.0.{kind}"), _same
    return _apply(_TO_OURS, key)  # type: ignore[return-value]


def released_state_dict(head: FusionHead) -> dict[str, Tensor]:
    """The weights of a head with the released layout, under the released names and shapes."""
    out = {}
    for key, value in head.state_dict().items():
        mapped = _apply(_TO_RELEASED, key)
        if mapped is None:
            raise FusionerError(f"head tensor {key!r} has no released name: not the released layout")
        name, convert = mapped
        out[name] = convert(value)
    return out


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _need(state: Mapping[str, Tensor], key: str, ndim: int, where: str) -> Tensor:
    if key not in state:
        raise FusionerError(f"{where}: key {key!r} missing; not a released Fusioner state dict?")
    value = state[key]
    if not isinstance(value, Tensor) or value.ndim != ndim:
        got = _shape(value) if isinstance(value, Tensor) else type(value).__name__
        raise FusionerError(f"{where}: {key} is {got}, expected a tensor with {ndim} dimension(s)")
    return value


def released_config(
    state_dict: Mapping[str, Tensor], *, heads: int, temperature: float = 0.07, where: str = "state dict"
) -> HeadConfig:
    """The :class:`HeadConfig` of the released head these tensors fill: widths and depth read off them."""
    dim = _need(state_dict, "fusion.norm.weight", 1, where).shape[0]
    vision_dim = _need(state_dict, "fusion.visual_proj.1.weight", 2, where).shape[1]
    text_dim = _need(state_dict, "fusion.text_proj.1.weight", 2, where).shape[1]
    depth = len({m[1] for k in state_dict if (m := re.match(r"fusion\.blocks\.(\d+)\.", k))})
    if depth == 0:
        raise FusionerError(f"{where}: no fusion.blocks.* keys; not a released Fusioner state dict?")
    d_ff = _need(state_dict, "fusion.blocks.0.mlp.fc1.weight", 2, where).shape[0]
    if heads < 1 or dim % heads:
        raise FusionerError(f"{where}: d_model {dim} (fusion.norm.weight) is not divisible by heads={heads}")
    if int(dim * (d_ff / dim)) != d_ff:
        raise FusionerError(f"{where}: fusion.blocks.0.mlp.fc1.weight width {d_ff} is no ratio of {dim}")
    settings = {**RELEASED, "mlp_ratio": d_ff / dim, "temperature": temperature}
    return HeadConfig(vision_dim, text_dim, dim=dim, depth=depth, heads=heads, **settings)


def head_from_released(
    state_dict: Mapping[str, Tensor], *, heads: int, temperature: float = 0.07, where: str = "state dict"
) -> FusionHead:
    """A :class:`FusionHead` configured as the released head and holding ``state_dict``'s weights.

    Keys outside ``fusion.*`` / ``decoder.*`` (the CLIP towers of a whole ``FullModel``, fixture
    inputs) are ignored. A tensor that does not fit is refused with one line naming the key and
    both shapes (``where`` names the file in messages). ``head(tokens, grid, text, size=(H, W))``
    then gives the released logits, one one-name pass per name.
    """
    released = {k: v for k, v in state_dict.items() if k.startswith(PREFIXES)}
    config = released_config(released, heads=heads, temperature=temperature, where=where)
    head = FusionHead(config)
    expected = released_state_dict(head)
    for key, value in released.items():
        if not isinstance(value, Tensor):
            raise FusionerError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
        if key not in expected:
            raise FusionerError(
                f"{where}: unexpected key {key!r} {_shape(value)}: the released head of d_model "
                f"{config.dim}, {config.depth} block(s) has no such tensor"
            )
        if _shape(value) != _shape(expected[key]):
            raise FusionerError(
                f"{where}: {key} is {_shape(value)}, the released head of d_model {config.dim}, "
                f"{config.depth} block(s) (read off the other tensors) needs {_shape(expected[key])}"
            )
    if missing := [k for k in expected if k not in released]:
        raise FusionerError(
            f"{where}: key {missing[0]!r} {_shape(expected[missing[0]])} missing "
            f"({len(missing)} missing in all)"
        )
    ours = {}
    for key, value in released.items():
        name, to_ours = _our_key(key)
        ours[name] = to_ours(value.detach()).to(torch.float32).contiguous()
    head.load_state_dict(ours, strict=True)
    return head.eval()


def head_differences(fixture: str | Path, *, tokens: str = "input.visual") -> dict[str, float]:
    """Max abs difference of this library's released head to a reference-parity fixture folder.

    ``fixture`` holds ``head.safetensors`` (released weights, ``input.*``, ``output.*``) and
    ``config.json`` (heads, grid, target sizes, temperature), as ../shared/data/reference-parity.
    Returns ``{"logits", "logits_odd", "logits3"}``: one name at ``target_size``, one name at
    ``odd_target_size``, three names (three one-name passes) at ``target_size``. ``tokens`` picks
    the input: ``input.visual`` (what the released fusion receives) or ``input.raw_visual``.
    """
    from safetensors.torch import load_file

    folder = Path(fixture)
    settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "head.safetensors"))
    head = head_from_released(
        tensors, heads=int(settings["n_heads"]), temperature=float(settings["temperature"]),
        where=str(folder / "head.safetensors"),
    )  # fmt: skip
    grid = (int(settings["grid"][0]), int(settings["grid"][1]))
    size, odd = tuple(settings["target_size"]), tuple(settings["odd_target_size"])
    cases = {
        "logits": ("input.text", size),
        "logits_odd": ("input.text", odd),
        "logits3": ("input.text3", size),
    }
    source = folder / "head.safetensors"

    def tensor(key: str) -> Tensor:
        if key not in tensors:
            raise DataError(f"fixture file {source}: tensor {key!r} is missing")
        return tensors[key].float()

    out = {}
    with torch.no_grad():
        for name, (text, at) in cases.items():
            got, expected = head(tensor(tokens), grid, tensor(text), size=at), tensor(f"output.{name}")
            if got.shape != expected.shape:
                raise DataError(
                    f"the released head gave {name} of shape {tuple(got.shape)}; {source}'s "
                    f"output.{name} is {tuple(expected.shape)}"
                )
            out[name] = (got - expected).abs().max().item()
    return out
