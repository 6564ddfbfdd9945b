"""open_clip towers: dense patch tokens from the image tower, class embeddings from the text tower.

Named entries (``clip_vitb16``, ``siglip2_vitb16``, ...) and the family
``open_clip:<architecture>/<pretrained tag>`` (``open_clip:ViT-B-16-SigLIP2/webli``) take one road:
the architecture's open_clip config, the tag's preprocessing and default weights (its Hub repo or
URL), one checkpoint for both towers, each adapter keeping its half. Keyword overrides are merged
into open_clip's model config (nested dicts merge key by key, e.g. ``vision_cfg=dict(layers=1)``);
``trunk=dict(...)`` overrides the architecture of a timm image tower, which open_clip's config
cannot resize. That is how the tests build tiny models. Building the model and loading its
checkpoint is :mod:`fusioner.adapters.open_clip_load`'s; this module wraps the towers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import open_clip
import torch
from einops import rearrange
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.layers import AttentionPoolLatent, resample_abs_pos_embed
from torch import Tensor, nn

from fusioner.adapters.base import TextAdapter, VisionAdapter, VisionOutput
from fusioner.adapters.open_clip_load import clip_preprocessing, clip_tokenizer, create_clip, parse_model_id
from fusioner.adapters.prompts import resolve_templates
from fusioner.adapters.registry import register_text, register_vision
from fusioner.errors import ConfigError

CLIP_ARCHS = {"clip_vitb16": "ViT-B-16", "clip_vitb32": "ViT-B-32", "clip_vitl14": "ViT-L-14"}
# Every named entry: name -> (open_clip architecture, pretrained tag). Each has a vision and a
# ``_text`` entry.
OPEN_CLIP_MODELS: dict[str, tuple[str, str]] = {
    **{name: (arch, "openai") for name, arch in CLIP_ARCHS.items()},
    "siglip2_vitb16": ("ViT-B-16-SigLIP2", "webli"),
}
_TEXT_BATCH = 256  # texts per forward pass; the 80-template ensemble of a large vocabulary is 10k+


class OpenClipVision(VisionAdapter):
    """The image tower of an open_clip ViT, returning every patch token in the joint image-text space.

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


def dense_attention_pool(pool: AttentionPoolLatent, x: Tensor) -> Tensor:
    """``b n c`` tokens -> ``b n d``: each token through ``pool`` as if it were the only token.

    With a single key the latent query's softmax is 1, so the pool's output for one token is that
    token's value, then the out projection and the pool's residual MLP (position-wise, so it applies
    per token unchanged). The query and keys, which only decide how tokens are mixed, drop out. This
    is MaskCLIP's recipe for CLIP's attention pool (value + out projection per token, Zhou et al.,
    ECCV 2022) carried to SigLIP's MAP head; keeping the MLP residual leaves the tokens in the space
    the pooled image embedding (and so the text embeddings) live in. An image of one repeated token
    pools to exactly that token's dense output.
    """
    value = pool.kv(x)[..., pool.kv.out_features // 2 :]  # b n c: kv is [keys | values], heads inside
    x = pool.proj_drop(pool.proj(value))
    if pool.mlp is not None:
        x = x + pool.mlp(pool.norm(x))
    return x


class OpenClipTimmVision(VisionAdapter):
    """An open_clip image tower with a timm ViT trunk (SigLIP, SigLIP2, EVA, ...) giving dense tokens.

    The trunk's final tokens minus its prefix (class / register) tokens go through the tower's head
    one token at a time: the MAP attention pool as :func:`dense_attention_pool`, then the trunk's
    ``fc_norm`` and ``head`` and open_clip's projection, so the tokens live where the pooled image
    embedding does. ``cls`` is that pooled embedding (open_clip's ``encode_image`` before
    normalisation). CNN trunks (ConvNeXt, FastViT) are refused.
    """

    def __init__(
        self, name: str, visual: TimmModel, embed_dim: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        trunk = visual.trunk
        if not all(hasattr(trunk, a) for a in ("patch_embed", "num_prefix_tokens", "fc_norm", "head")):
            raise ConfigError(
                f"{name}: dense tokens need a ViT-like timm image tower; {type(trunk).__name__} is not one"
            )
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None and not (
            isinstance(pool, AttentionPoolLatent) and pool.latent_len == 1 and pool.pos_embed is None
        ):
            raise ConfigError(f"{name}: no dense form for the attention pool {type(pool).__name__}")
        super().__init__(name, embed_dim, trunk.patch_embed.patch_size[0], mean, std)
        self.visual = visual

    def dense_head(self, tokens: Tensor) -> Tensor:
        """Patch tokens ``b n c`` of the trunk -> ``b n d`` in the joint space."""
        trunk = self.visual.trunk
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None:
            tokens = dense_attention_pool(pool, tokens)
        return self.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(tokens))))

    def encode(self, x: Tensor) -> VisionOutput:
        trunk = self.visual.trunk
        gh, gw = self.grid(*x.shape[-2:])
        features = trunk.forward_features(x)  # b (p n) c, final norm applied
        tokens = self.dense_head(features[:, trunk.num_prefix_tokens :])
        cls = self.visual.head(trunk.forward_head(features))  # b d
        return VisionOutput(tokens=tokens, grid=(gh, gw), cls=cls)


def _native_vision(
    name: str, visual: VisionTransformer, embed_dim: int, mean: Sequence[float], std: Sequence[float]
) -> OpenClipVision:
    return OpenClipVision(name, visual, mean, std)  # its width is the tower's own output_dim


# How each kind of open_clip image tower gives dense tokens: (name, tower, joint width, mean, std).
_DENSE_VISION: dict[type, Callable[..., VisionAdapter]] = {
    VisionTransformer: _native_vision,
    TimmModel: OpenClipTimmVision,
}


class OpenClipText(TextAdapter):
    """The text tower of an open_clip model: ``encode_text`` on its tokenizer's output."""

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


def build_vision(
    name: str,
    arch: str,
    tag: str,
    weights: str | None = None,
    *,
    trunk: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> VisionAdapter:
    model, cfg, _ = create_clip(name, arch, tag, weights, kwargs, trunk=trunk or {})
    make = _DENSE_VISION.get(type(model.visual))
    if make is None:
        raise ConfigError(
            f"{name}: no dense tokens from an open_clip {type(model.visual).__name__} image tower; "
            f"supported: {', '.join(t.__name__ for t in _DENSE_VISION)}"
        )
    return make(name, model.visual, cfg["embed_dim"], *clip_preprocessing(arch, tag))


def build_text(
    name: str,
    arch: str,
    tag: str,
    weights: str | None = None,
    templates: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> OpenClipText:
    model, cfg, path = create_clip(name, arch, tag, weights, kwargs, text_only=True)
    model.visual = nn.Identity()  # also when a big_vision file needed it for loading
    tokenizer = clip_tokenizer(name, arch, cfg, path)
    return OpenClipText(name, model, tokenizer, cfg["embed_dim"], resolve_templates(templates or "clip"))


def _source(arch: str, tag: str) -> str:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    where = f"hub: {cfg['hf_hub'].strip('/')}" if cfg.get("hf_hub") else cfg.get("url", "")
    return f"open_clip {arch} pretrained={tag} ({where})"


for _name, (_arch, _tag) in OPEN_CLIP_MODELS.items():
    register_vision(_name, weights=_source(_arch, _tag))(partial(build_vision, _name, _arch, _tag))
    register_text(f"{_name}_text", weights=_source(_arch, _tag))(
        partial(build_text, f"{_name}_text", _arch, _tag)
    )


def _accepts(model_id: str) -> bool:
    parse_model_id(model_id)  # raises, naming the valid architectures or tags
    return True


_FAMILY_WEIGHTS = "open_clip: the tag's weights (open_clip.list_pretrained())"


@register_vision("open_clip", weights=_FAMILY_WEIGHTS, family=True, accepts=_accepts)
def build_open_clip_vision(model_id: str, weights: str | None = None, **kwargs: Any) -> VisionAdapter:
    """``open_clip:<architecture>/<tag>``'s image tower, e.g. ``open_clip:ViT-B-16-SigLIP2/webli``."""
    return build_vision(f"open_clip:{model_id}", *parse_model_id(model_id), weights, **kwargs)


@register_text("open_clip", weights=_FAMILY_WEIGHTS, family=True, accepts=_accepts)
def build_open_clip_text(
    model_id: str,
    weights: str | None = None,
    templates: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> OpenClipText:
    """``open_clip:<architecture>/<tag>``'s text tower, e.g. ``open_clip:ViT-B-16-SigLIP2/webli``."""
    return build_text(f"open_clip:{model_id}", *parse_model_id(model_id), weights, templates, **kwargs)
