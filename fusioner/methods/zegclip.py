"""ZegCLIP-style one-stage head (``method: zegclip``), with optional deep prompt tuning.

ZegCLIP (Zhou et al., "ZegCLIP: Towards Adapting CLIP for Zero-shot Semantic Segmentation", CVPR
2023) scores every pixel against every name in one stage: per-pixel logits are the cosine between
projected patch embeddings and name queries. Its two additions kept here:

- the *relationship descriptor*: each name embedding ``t`` is combined with the image's global
  token ``g`` as ``[t * g ; t]`` and projected, so a name's query already knows the image;
- a light decoder where the name queries read the patch tokens (cross-attention), then independent
  sigmoid masks per name (BCE + dice, the library's mask loss), no softmax across names;
- *deep prompt tuning* (``deep_prompts: N``, VPT-deep): N learnable tokens inserted before every
  block of a frozen timm ViT, replaced at each block; only the prompts (and the head) train.

The cache holds no CLS token, so the global token is the mean of the projected patch tokens (for
a CNN such as EfficientNet-Lite0 the pooled feature is what a CLS token would be).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from einops import repeat
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from fusioner.adapters.base import VisionAdapter, VisionOutput
from fusioner.errors import FusionerError
from fusioner.methods.layers import CrossBlock, cosine_maps, logit_scale, to_size
from fusioner.methods.registry import Method, register_method


@dataclass(frozen=True)
class ZegCLIPConfig:
    vision_dim: int
    text_dim: int
    dim: int = 256
    depth: int = 2  # cross-attention decoder blocks (and one patch self-attention block)
    heads: int = 4
    mlp_ratio: float = 4.0
    temperature: float = 0.07
    learn_temperature: bool = False
    upsample: int = 4
    deep_prompts: int = 0  # prompt tokens per ViT block; 0 = frozen backbone untouched
    prompt_blocks: int = 0  # the ViT's block count (set from the backbone when prompts are asked)
    prompt_width: int = 0


def _config(config: Any, vision: Any, text: Any) -> ZegCLIPConfig:
    blocks = 0
    if config.deep_prompts:
        model = getattr(vision, "model", None)
        if model is None or not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise FusionerError(
                f"config key 'deep_prompts': needs a timm ViT backbone (blocks of tokens); "
                f"vision {config.vision!r} is not one"
            )
        blocks = len(model.blocks)
    return ZegCLIPConfig(
        vision_dim=vision.embed_dim,
        text_dim=text.embed_dim,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        temperature=config.temperature,
        learn_temperature=config.learn_temperature,
        deep_prompts=config.deep_prompts,
        prompt_blocks=blocks,
        prompt_width=vision.embed_dim if config.deep_prompts else 0,
    )


class ZegCLIPHead(nn.Module):
    """tokens ``b n cv``, names ``b k ct`` -> logits ``b k h w`` (cosine / temperature)."""

    def __init__(self, config: ZegCLIPConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.visual_in = nn.Sequential(nn.LayerNorm(config.vision_dim), nn.Linear(config.vision_dim, d))
        self.patch_block = Block(d, config.heads, config.mlp_ratio, qkv_bias=True)
        self.dense = nn.Identity()  # names the dense features for the global term (objective.py)
        self.text_in = nn.Linear(config.text_dim, d)
        self.relation = nn.Sequential(nn.Linear(2 * d, d), nn.LayerNorm(d))
        self.decoder = nn.ModuleList(
            CrossBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.query_out = nn.Linear(d, d)
        scale = logit_scale(config.temperature, config.learn_temperature)
        if isinstance(scale, nn.Parameter):
            self.logit_scale = scale
        else:
            self.register_buffer("logit_scale", scale, persistent=False)
        if config.deep_prompts:
            shape = (config.prompt_blocks, config.deep_prompts, config.prompt_width)
            self.prompts = nn.Parameter(torch.zeros(shape))
            nn.init.trunc_normal_(self.prompts, std=0.02)

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def attach(self, vision: VisionAdapter) -> VisionAdapter:
        """With deep prompts, the backbone runs with this head's prompts inside it."""
        return PromptedViT(vision, self) if self.config.deep_prompts else vision

    def forward(
        self, tokens: Tensor, grid: tuple[int, int], text: Tensor, size: tuple[int, int] | None = None
    ) -> Tensor:
        if text.ndim == 2:
            text = text.expand(tokens.shape[0], -1, -1)
        patches = self.dense(self.patch_block(self.visual_in(tokens)))  # b n d
        names = self.text_in(text.to(patches.dtype))  # b k d
        glob = patches.mean(1, keepdim=True)  # b 1 d: the image's global token
        queries = self.relation(torch.cat([names * glob, names], dim=-1))  # relationship descriptor
        for block in self.decoder:
            queries = block(queries, patches)
        logits = cosine_maps(self.query_out(queries), patches, grid) * self.scale
        return to_size(logits, grid, self.config.upsample, size)


class PromptedViT(VisionAdapter):
    """A frozen timm ViT adapter run with learnable prompt tokens before every block (VPT-deep).

    The prompts belong to the head (they train, save and load with it); this adapter only reads
    them. Its ``forward`` keeps autograd on so gradients reach the prompts; the backbone's own
    weights keep ``requires_grad=False`` and are never in any optimizer.
    """

    def __init__(self, inner: VisionAdapter, head: ZegCLIPHead) -> None:
        super().__init__(
            inner.name,
            inner.embed_dim,
            inner.patch_size,
            inner.mean.flatten().tolist(),
            inner.std.flatten().tolist(),
        )
        self.inner = inner
        self.has_cls = getattr(inner, "has_cls", False)
        # A tuple, not an attribute module: registering the head here would make freeze() freeze
        # the prompts and put the head's weights in the adapter's state.
        self._head = (head,)
        self.freeze()

    @property
    def preprocessing(self) -> dict[str, object]:
        return self.inner.preprocessing

    def fingerprint(self) -> str:
        """The backbone's digest and the prompts': tokens cached under it (an evaluation of a saved
        model) can never be read for other prompts, nor for the bare backbone."""
        h = hashlib.sha1(self.inner.fingerprint().encode())
        h.update(self._head[0].prompts.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def forward(self, images: Tensor) -> VisionOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise FusionerError(f"{self.name}: expected images 'b 3 h w', got shape {tuple(images.shape)}")
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        return self.encode(x.to(self.dtype))

    def encode(self, x: Tensor) -> VisionOutput:
        vit = self.inner.model
        prompts = self._head[0].prompts.to(x.dtype)  # blocks t c
        gh, gw = self.grid(*x.shape[-2:])
        prefix, t = int(getattr(vit, "num_prefix_tokens", 0)), prompts.shape[1]
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for i, block in enumerate(vit.blocks):
            own = repeat(prompts[i], "t c -> b t c", b=h.shape[0])
            rest = h[:, prefix:] if i == 0 else h[:, prefix + t :]  # the previous block's prompts go
            h = block(torch.cat([h[:, :prefix], own, rest], dim=1))
        h = vit.norm(h)
        cls = h[:, 0] if self.has_cls else None
        tokens = h[:, prefix + t :]
        if tokens.shape[1] != gh * gw:
            raise FusionerError(f"{self.name}: expected {gh}x{gw} tokens, got {tokens.shape[1]}")
        return VisionOutput(tokens=tokens, grid=(gh, gw), cls=cls)


ZEGCLIP = register_method(
    Method(
        name="zegclip",
        config_cls=ZegCLIPConfig,
        head_cls=ZegCLIPHead,
        from_config=_config,
        dense_module="dense",
    )
)

__all__ = ["PromptedViT", "ZegCLIPConfig", "ZegCLIPHead"]
