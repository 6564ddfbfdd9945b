"""CLIP towers from open_clip: dense patch tokens from the image tower, class embeddings from the text tower.

Both towers of one entry load the same open_clip checkpoint (OpenAI's weights by default) and keep
only their half. Keyword overrides are merged into open_clip's model config (nested dicts merge
key by key, e.g. ``vision_cfg=dict(layers=1)``), which is how tests build tiny CLIPs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import open_clip
import torch
from einops import rearrange
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from fusioner.adapters import weights as W
from fusioner.adapters.base import TextAdapter, VisionAdapter, VisionOutput
from fusioner.adapters.prompts import resolve_templates
from fusioner.adapters.registry import register_text, register_vision
from fusioner.errors import ConfigError

CLIP_ARCHS = {"clip_vitb16": "ViT-B-16", "clip_vitb32": "ViT-B-32", "clip_vitl14": "ViT-L-14"}
_TAG = "openai"
# open_clip's Hub file names, safetensors first.
_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TEXT_BATCH = 256  # texts per forward pass; the 80-template ensemble of a large vocabulary is 10k+


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def create_clip(
    name: str, arch: str, weights: str | None, overrides: Mapping[str, Any]
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The open_clip model of ``arch`` with ``overrides`` and its weights; also its config and tag config."""
    tag_cfg = open_clip.get_pretrained_cfg(arch, _TAG)
    # OpenAI's CLIPs were trained with QuickGELU; open_clip's plain configs use nn.GELU.
    cfg = _merge(
        {**open_clip.get_model_config(arch), "quick_gelu": tag_cfg.get("quick_gelu", False)}, overrides
    )
    if weights == W.RANDOM:
        return open_clip.create_model(arch, pretrained=None, **cfg).eval(), cfg, tag_cfg
    source = weights or f"hf-hub:{tag_cfg['hf_hub'].strip('/')}"
    path = W.resolve_file(name, source, names=_CLIP_FILES)
    try:
        # pretrained=<file> goes through open_clip's own loader: format conversions, position
        # embedding resizing, strict loading.
        model = open_clip.create_model(arch, pretrained=str(path), **cfg)
    except RuntimeError as e:
        if W.is_load_error(e):
            raise W.load_error(name, path, f"open_clip {arch} with the given overrides", e) from e
        raise
    return model.eval(), cfg, tag_cfg


class OpenClipVision(VisionAdapter):
    """The image tower of a CLIP ViT, returning every patch token in the joint image-text space.

    Patch tokens get the same ``ln_post`` and projection as the class token (MaskCLIP-style dense
    features), so they compare with text embeddings just like the pooled image embedding, which
    is returned as ``cls``. The position embedding is resampled to each input's grid.
    """

    def __init__(
        self, name: str, visual: VisionTransformer, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        supported = (
            isinstance(visual, VisionTransformer)
            and visual.attn_pool is None
            and visual.pool_type == "tok"
            and not visual.final_ln_after_pool
            and visual.proj is not None
        )
        if not supported:
            raise ConfigError(
                f"{name}: only CLIP ViTs pooling their class token (no attentional pool) give dense tokens"
            )
        super().__init__(name, visual.output_dim, visual.patch_size[0], mean, std)
        self.visual = visual

    def encode(self, x: Tensor) -> VisionOutput:
        v = self.visual
        x = v.conv1(x)  # b c gh gw
        gh, gw = x.shape[-2:]
        x = rearrange(x, "b c h w -> b (h w) c")
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # b 1 c
        pos = resample_abs_pos_embed(
            v.positional_embedding[None], new_size=[gh, gw], old_size=list(v.grid_size), num_prefix_tokens=1
        )  # 1 (1 n) c
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        x = v.transformer(x)  # b (1 n) c, batch first
        x = v.ln_post(x) @ v.proj  # b (1 n) d
        return VisionOutput(tokens=x[:, 1:], grid=(gh, gw), cls=x[:, 0])


class OpenClipText(TextAdapter):
    """The text tower of a CLIP: ``encode_text`` on open_clip's tokenizer output."""

    def __init__(
        self, name: str, model: nn.Module, tokenizer: Any, embed_dim: int, templates: Sequence[str]
    ) -> None:
        super().__init__(name, embed_dim, templates)
        self.model = model
        self.tokenizer = tokenizer

    def encode(self, texts: list[str]) -> Tensor:
        chunks = []
        for i in range(0, len(texts), _TEXT_BATCH):
            tokens = self.tokenizer(texts[i : i + _TEXT_BATCH]).to(self.device)
            chunks.append(self.model.encode_text(tokens))
        return torch.cat(chunks)  # t c


def build_vision(name: str, arch: str, weights: str | None = None, **kwargs: Any) -> OpenClipVision:
    model, _, tag_cfg = create_clip(name, arch, weights, kwargs)
    return OpenClipVision(name, model.visual, tag_cfg["mean"], tag_cfg["std"])


def build_text(
    name: str,
    arch: str,
    weights: str | None = None,
    templates: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> OpenClipText:
    model, cfg, _ = create_clip(name, arch, weights, kwargs)
    # The image tower is most of the memory and a text adapter never runs it.
    model.visual = nn.Identity()
    context_length = cfg["text_cfg"].get("context_length")
    tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
    return OpenClipText(name, model, tokenizer, cfg["embed_dim"], resolve_templates(templates or "clip"))


def _source(arch: str) -> str:
    hub = open_clip.get_pretrained_cfg(arch, _TAG)["hf_hub"].strip("/")
    return f"open_clip {arch} pretrained={_TAG} (hub: {hub})"


for _name, _arch in CLIP_ARCHS.items():
    register_vision(_name, weights=_source(_arch))(partial(build_vision, _name, _arch))
    register_text(f"{_name}_text", weights=_source(_arch))(partial(build_text, f"{_name}_text", _arch))
