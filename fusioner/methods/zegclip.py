"""ZegCLIP (``method: zegclip``): names read CLIP's patch tokens, their attention logits are the masks.

ZegCLIP (Zhou et al., "ZegCLIP: Towards Adapting CLIP for Zero-shot Semantic Segmentation", CVPR
2023; official code ZiqinZhou66/ZegCLIP, ``models/decode_heads/decode_seg.py`` and
``models/losses/criterion.py``) as that code builds it:

- *relationship descriptor*: each name's CLIP text embedding ``t`` (unit norm, not projected) and the
  image's CLIP embedding ``g`` (the class token after ``ln_post`` and the projection, unit norm: the
  ``cls`` of :class:`fusioner.adapters.open_clip.OpenClipVision`, also stored in the feature cache)
  give the query ``q_proj([t * g ; t])``;
- *decoder*: three layers in which the queries read the patch tokens by cross-attention only (no
  self-attention: a name's mask never depends on the other names asked), post-norm, ReLU MLP,
  dropout 0.1; the patch tokens get a linear projection and a LayerNorm and nothing more;
- *masks*: the last layer's pre-softmax attention logits (``q . k / sqrt(d_head)``, averaged over
  the heads) are each name's mask logits, one independent sigmoid per name;
- *loss* (:func:`zegclip_loss`): every seen name scored on every image, sigmoid focal loss
  (alpha 0.25, gamma 2) x 100 over all of them + dice x 1 over the names present, both divided by
  the number of present names in the batch;
- *deep prompt tuning* (``deep_prompts: N``): on a CLIP ViT as ZegCLIP does it (prompt projection,
  dropout, final prompt norm: methods/clip_prompts.py); on a timm ViT plain VPT-deep,
  :class:`PromptedViT` (an extension);
- *transductive setting* (``zegclip_self_training: true``, from optimizer step ``zegclip_st_start``):
  ZegCLIP's ``self_training=True`` (``configs/*/*_st.py``; ``models/segmentor/zegclip.py``
  ``_visiable_mask_st`` and ``models/decode_heads/decode_seg.py`` ``forward_train``): training is
  given the unseen names (never their labels); each pixel of an unseen class takes the unseen name
  whose detached sigmoid score is highest there, every such pixel (no threshold, no top-k), and
  trains every name, seen and unseen (methods/zegclip_st.py). Where ours differs: one run with a
  start step stands for ZegCLIP's inductive run + ``--load-from`` self-training run (optimizer and
  schedule carry on), and the labels are taken at the decoder's resolution, not the image's.

For a backbone without a class token (EfficientNet-Lite0 in the offline sweep) ``global_token`` is
``"mean"``: the mean of the frozen tokens stands in for ``g``, an extension, not ZegCLIP. When the
image and text widths differ (any pair but CLIP's own) a learned linear map takes ``g`` to the text
width; with CLIP's two towers it is the identity, as published.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, rearrange, repeat
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.adapters.base import VisionAdapter, VisionOutput
from fusioner.errors import FusionerError
from fusioner.methods.clip_prompts import ClipPrompts, PromptedCLIP, is_clip_tower
from fusioner.methods.layers import logit_scale, to_size
from fusioner.methods.registry import Method, register_method

LAYERS = 3  # ZegCLIP's decoder depth (num_layers=3 in every released config)
FOCAL_WEIGHT, DICE_WEIGHT = 100.0, 1.0  # mask_weight / dice_weight of the released configs
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
GLOBAL_TOKENS = ("cls", "mean")


@dataclass(frozen=True)
class ZegCLIPConfig:
    vision_dim: int
    text_dim: int
    dim: int = 256
    depth: int = LAYERS
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    global_token: str = "cls"  # cls: the backbone's class token | mean: mean of the tokens
    # Only the unit of the seen-bias grid (engine/evaluate.py): ZegCLIP's logits are attention logits.
    temperature: float = 0.07
    upsample: int = 4
    deep_prompts: int = 0  # prompt tokens per ViT block; 0 = frozen backbone untouched
    prompt_blocks: int = 0  # the ViT's block count (set from the backbone when prompts are asked)
    prompt_width: int = 0
    # vpt: plain prompts in a timm ViT (PromptedViT); zegclip: ZegCLIP's projected, normed prompts in
    # an open_clip CLIP ViT (methods/clip_prompts.py).
    prompt_style: str = "vpt"
    prompt_patch: int = 16


def _config(config: Any, vision: Any, text: Any) -> ZegCLIPConfig:
    blocks, style, width = 0, "vpt", vision.embed_dim
    if config.deep_prompts and is_clip_tower(vision):
        style, blocks = "zegclip", len(vision.visual.transformer.resblocks)
        width = vision.visual.conv1.out_channels
    elif config.deep_prompts:
        model = getattr(vision, "model", None)
        if model is None or not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise FusionerError(
                f"config key 'deep_prompts': needs a CLIP or timm ViT backbone (blocks of tokens); "
                f"vision {config.vision!r} is not one"
            )
        blocks = len(model.blocks)
    return ZegCLIPConfig(
        vision_dim=vision.embed_dim,
        text_dim=text.embed_dim,
        dim=config.dim,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        global_token="cls" if getattr(vision, "has_cls", True) else "mean",
        temperature=config.temperature,
        deep_prompts=config.deep_prompts,
        prompt_blocks=blocks,
        prompt_width=width if config.deep_prompts else 0,
        prompt_style=style,
        prompt_patch=vision.patch_size,
    )


def relationship_descriptor(text: Tensor, image: Tensor) -> Tensor:
    """Names ``b k c`` and the image embedding ``b c`` (both unit norm) -> ``b k 2c``: ``[t * g ; t]``."""
    return torch.cat([text * image[:, None], text], dim=-1)


class AttentionMaskLayer(nn.Module):
    """One ZegCLIP decoder layer: queries ``b k d`` read patches ``b n d`` (cross-attention, post-norm,
    then a ReLU MLP); returns the new queries and the head-averaged attention logits ``b k n``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"zegclip: width {dim} is not a multiple of {heads} heads")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.drop_attn, self.drop_mlp = (nn.Dropout(dropout) for _ in range(3))
        self.norm_attn, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, queries: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        q = rearrange(self.q(queries), "b k (h e) -> b h k e", h=self.heads)
        k = rearrange(self.k(patches), "b n (h e) -> b h n e", h=self.heads)
        v = rearrange(self.v(patches), "b n (h e) -> b h n e", h=self.heads)
        logits = einsum(q, k, "b h k e, b h n e -> b h k n") * q.shape[-1] ** -0.5
        attn = self.attn_drop(logits.softmax(-1))
        out = rearrange(einsum(attn, v, "b h k n, b h n e -> b h k e"), "b h k e -> b k (h e)")
        queries = self.norm_attn(queries + self.drop_attn(self.proj(out)))
        queries = self.norm_mlp(queries + self.drop_mlp(self.mlp(queries)))
        return queries, logits.mean(1)


class ZegCLIPHead(nn.Module):
    """tokens ``b n cv``, names ``b k ct``, ``cls`` ``b cv`` -> mask logits ``b k h w``."""

    def __init__(self, config: ZegCLIPConfig) -> None:
        super().__init__()
        if config.global_token not in GLOBAL_TOKENS:
            raise ValueError(
                f"zegclip global_token must be one of {GLOBAL_TOKENS}, got {config.global_token!r}"
            )
        self.config = config
        d = config.dim
        # use_proj=True of the released head: a linear map then a LayerNorm, no patch block.
        self.visual_in = nn.Sequential(nn.Linear(config.vision_dim, d), nn.LayerNorm(d))
        self.dense = nn.Identity()  # names the dense features for the global term (objective.py)
        # CLIP's two towers share one width: g multiplies t as it is. Other pairs need a map.
        same = config.vision_dim == config.text_dim
        self.global_in = nn.Identity() if same else nn.Linear(config.vision_dim, config.text_dim)
        self.q_proj = nn.Linear(2 * config.text_dim, d)
        self.decoder = nn.ModuleList(
            AttentionMaskLayer(d, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth)
        )
        self.register_buffer("logit_scale", logit_scale(config.temperature, False), persistent=False)
        if config.deep_prompts and config.prompt_style == "zegclip":
            self.clip_prompts = ClipPrompts(
                config.prompt_blocks, config.deep_prompts, config.prompt_width, config.prompt_patch
            )
        elif config.deep_prompts:
            shape = (config.prompt_blocks, config.deep_prompts, config.prompt_width)
            self.prompts = nn.Parameter(torch.zeros(shape))
            nn.init.trunc_normal_(self.prompts, std=0.02)

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp()

    def attach(self, vision: VisionAdapter) -> VisionAdapter:
        """With deep prompts, the backbone runs with this head's prompts inside it."""
        if not self.config.deep_prompts:
            return vision
        if self.config.prompt_style == "zegclip":
            return PromptedCLIP(vision, self.clip_prompts)
        return PromptedViT(vision, self)

    def image_embedding(self, tokens: Tensor, cls: Tensor | None) -> Tensor:
        """``g``: the unit-norm CLS (or token mean, ``global_token: mean``), at the text width."""
        if self.config.global_token == "mean":
            g = tokens.mean(1)
        elif cls is None:
            raise FusionerError(
                "zegclip reads the backbone's CLS token (its image embedding); this call passed none "
                "(a cache written before CLS tokens were stored is rebuilt by a new run)"
            )
        else:
            g = cls
        return F.normalize(self.global_in(F.normalize(g.to(tokens.dtype), dim=-1)), dim=-1)

    def forward(
        self,
        tokens: Tensor,
        grid: tuple[int, int],
        text: Tensor,
        size: tuple[int, int] | None = None,
        *,
        cls: Tensor | None = None,
    ) -> Tensor:
        if text.ndim == 2:
            text = text.expand(tokens.shape[0], -1, -1)
        patches = self.dense(self.visual_in(tokens))  # b n d
        names = F.normalize(text.to(patches.dtype), dim=-1)
        queries = self.q_proj(relationship_descriptor(names, self.image_embedding(tokens, cls)))
        masks = None
        for layer in self.decoder:
            queries, masks = layer(queries, patches)
        logits = rearrange(masks, "b k (gh gw) -> b k gh gw", gh=grid[0], gw=grid[1])
        return to_size(logits, grid, self.config.upsample, size)


def sigmoid_focal(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Per-mask focal loss ``b k``: mean over the valid pixels of ``alpha_t (1 - p_t)^gamma BCE``."""
    t = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
    p = logits.float().sigmoid()
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = FOCAL_ALPHA * t + (1 - FOCAL_ALPHA) * (1 - t)
    per_pixel = alpha_t * (1 - p_t) ** FOCAL_GAMMA * bce * valid[:, None]
    return per_pixel.flatten(2).sum(-1) / valid.flatten(1).sum(-1).clamp(min=1)[:, None]


def smoothed_dice(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Per-mask dice loss ``b k``: ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` over valid pixels."""
    p = logits.float().sigmoid() * valid[:, None]
    t = targets.float() * valid[:, None]
    return 1 - (2 * (p * t).flatten(2).sum(-1) + 1) / (p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)


def zegclip_loss(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """ZegCLIP's criterion: logits / targets ``b k h w`` over every seen name, valid ``b h w``.

    ``100 x sum(focal over every (image, name)) + 1 x sum(dice over present (image, name))``, both
    over the number of present names in the batch (at least 1). Ignored pixels (label -1) take no
    part; the released criterion counts its ignored pixels as negatives of every name.
    """
    present = targets.flatten(2).any(-1)  # b k
    count = present.sum().clamp(min=1)
    focal = sigmoid_focal(logits, targets, valid).sum()
    dice = (smoothed_dice(logits, targets, valid) * present).sum()
    return (FOCAL_WEIGHT * focal + DICE_WEIGHT * dice) / count


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
        # Autograd stays on (the base adapter's forward is no-grad): gradients reach the prompts.
        return self.encode(self.normalized(images))

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
        takes_cls=True,
        all_seen=True,
        loss=zegclip_loss,
    )
)

__all__ = [
    "AttentionMaskLayer",
    "PromptedViT",
    "ZegCLIPConfig",
    "ZegCLIPHead",
    "relationship_descriptor",
    "zegclip_loss",
]
