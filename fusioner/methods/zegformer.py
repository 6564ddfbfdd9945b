"""ZegFormer (``method: zegformer``): class-agnostic segments, each named twice and the two fused.

ZegFormer (Ding et al., "Decoupling Zero-Shot Semantic Segmentation", CVPR 2022; official code
dingjiansw101/ZegFormer: ``mask_former/modeling/transformer/transformer_zeroshot_predictor.py``,
``mask_former/modeling/criterion.py``, ``mask_former/mask_former_model.py``) as that code builds it:

- *grouping*: N learned queries read the patch tokens (cross-attention) and give N independent
  sigmoid masks (mask embedding . per-pixel features);
- *segment-level classification*: each query's embedding, projected to the text width and unit
  normed, against the unit name embeddings and a learned no-object embedding, over a temperature;
  trained with cross-entropy (no-object weight 0.1) on Hungarian matches (``scipy``'s
  ``linear_sum_assignment``) of cost ``class + 20 x focal + 1 x dice``, then focal x 20 + dice x 1
  on the matched masks (:func:`set_loss`);
- *image-level classification*: each segment classified by the frozen CLIP. Here from the cached
  CLIP dense tokens (``ln_post`` + projection, MaskCLIP-style) mask-pooled under the binarised
  segment, instead of CLIP re-run on a masked crop; scored at CLIP's logit scale 100 and the
  segment's own no-object logit appended, as the official code does;
- *fusion* (:func:`fuse`): softmaxes without no-object, CLIP's seen-name scores replaced by their
  mean, then ``p_seg^l p_clip^(1-l)`` for seen names and ``p_seg^(1-l) p_clip^l`` for unseen ones,
  ``l = 2/3``; a name is seen when its embedding is one the head was trained with (``seen_text``);
- *semantic inference*: ``sum_s p(s, name) x sigmoid(mask_s)`` (MaskFormer), returned as logits.

Scores are softmaxes over the names asked together, as published: unlike the other heads, a name's
map depends on the other names in the pass (fusioner/inference.py asks up to 64 at once). The image-
level branch needs tokens in the text space (a CLIP pair); with another pair it is off and the
segment-level score is the whole score. ``grouping: spectral`` (``zegformer+spectral-groups``) is a
training-free hybrid, not ZegFormer: the eigen-segments of methods/spectral.py stand in for the
queries' masks and each segment's pooled feature for its query embedding; its classifier trains on
each segment's majority label (:func:`majority_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from einops import einsum, rearrange
from scipy.optimize import linear_sum_assignment
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.methods.layers import CrossBlock, logit_scale, to_size
from fusioner.methods.registry import Method, register_method
from fusioner.methods.spectral import spectral_segments
from fusioner.methods.zegclip import sigmoid_focal, smoothed_dice

GROUPINGS = ("queries", "spectral")
CLIP_SCALE = 100.0  # CLIP's own logit scale, used for the image-level scores
NO_OBJECT_WEIGHT = 0.1  # MaskFormer's eos_coef
MASK_WEIGHT, DICE_WEIGHT = 20.0, 1.0  # MaskFormer / ZegFormer defaults (matcher costs and losses)


@dataclass(frozen=True)
class ZegFormerConfig:
    vision_dim: int
    text_dim: int
    dim: int = 256
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    temperature: float = 0.07
    learn_temperature: bool = False
    upsample: int = 4
    grouping: str = "queries"  # queries | spectral
    queries: int = 16  # mask queries, or spectral segments with grouping=spectral
    balance: float = 2 / 3  # lambda of the seen / unseen fusion
    image_branch: bool = True  # tokens share the text space (a CLIP pair): CLIP names the segments too
    spectral_eigs: int = 4
    seed: int = 0
    seen_names: int = 0  # how many training names ``seen_text`` holds (set when training starts)


def _config(config: Any, vision: Any, text: Any) -> ZegFormerConfig:
    return ZegFormerConfig(
        vision_dim=vision.embed_dim,
        text_dim=text.embed_dim,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        temperature=config.temperature,
        learn_temperature=config.learn_temperature,
        grouping=config.zegformer_grouping,
        queries=config.zegformer_queries,
        balance=config.zegformer_lambda,
        image_branch=vision.embed_dim == text.embed_dim,
        spectral_eigs=config.spectral_eigs,
        seed=config.seed,
    )


def mask_pooled(tokens: Tensor, masks: Tensor) -> Tensor:
    """Tokens ``b n c``, mask logits ``b s n`` -> each segment's mean token over its binarised mask
    (``sigmoid > 0.5``; the soft mask where nothing passes), ``b s c``."""
    hard = (masks > 0).to(tokens.dtype)
    soft = masks.sigmoid().to(tokens.dtype)
    weights = torch.where(hard.sum(-1, keepdim=True) > 0, hard, soft)
    return einsum(weights, tokens, "b s n, b n c -> b s c") / weights.sum(-1, keepdim=True).clamp(min=1e-6)


def fuse(segment: Tensor, image: Tensor, seen: Tensor, balance: float) -> Tensor:
    """ZegFormer's ensemble. ``segment`` / ``image``: logits ``b s (k + 1)`` (last = no-object);
    ``seen`` bool ``b k`` -> probabilities ``b s k``.

    Both are softmaxed and lose the no-object column; CLIP's scores of the seen names are replaced
    by their mean (CLIP then does not reorder seen names); seen names take ``p_seg^l p_clip^(1-l)``,
    unseen names ``p_seg^(1-l) p_clip^l``.
    """
    p_seg = segment.softmax(-1)[..., :-1]
    p_img = image.softmax(-1)[..., :-1]
    mask = seen[:, None].to(p_img.dtype)  # b 1 k
    seen_mean = (p_img * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    p_img = torch.where(seen[:, None], seen_mean, p_img)
    own = torch.where(seen[:, None], balance, 1 - balance)  # exponent of the segment-level score
    return p_seg.pow(own) * p_img.pow(1 - own)


def semantic_map(probs: Tensor, masks: Tensor) -> Tensor:
    """MaskFormer's semantic inference: name probabilities ``b s k``, mask logits ``b s n`` ->
    ``b k n``: ``sum_s p(s, k) sigmoid(mask_s)``."""
    return einsum(probs, masks.sigmoid(), "b s k, b s n -> b k n")


class ZegFormerHead(nn.Module):
    """tokens ``b n cv``, names ``b k ct`` -> logits ``b k h w``; ``return_aux`` adds masks and classes."""

    def __init__(self, config: ZegFormerConfig) -> None:
        super().__init__()
        if config.grouping not in GROUPINGS:
            raise ValueError(
                f"zegformer grouping must be one of {', '.join(GROUPINGS)}, got {config.grouping!r}"
            )
        self.config = config
        d = config.dim
        self.visual_in = nn.Sequential(nn.LayerNorm(config.vision_dim), nn.Linear(config.vision_dim, d))
        # The per-pixel features the masks are read from (MaskFormer's pixel decoder's place).
        self.patch_blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio, qkv_bias=True) for _ in range(config.depth)
        )
        self.dense = nn.Identity()
        if config.grouping == "queries":
            self.queries = nn.Parameter(torch.zeros(config.queries, d))
            nn.init.trunc_normal_(self.queries, std=0.02)
            self.query_blocks = nn.ModuleList(
                CrossBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth)
            )
            self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.projection = nn.Linear(d, config.text_dim)  # query embedding -> text space
        self.no_object = nn.Parameter(torch.empty(1, config.text_dim))
        nn.init.normal_(self.no_object, std=config.text_dim**-0.5)
        # The names the head was trained with (set by the objective): they take the "seen" fusion.
        self.register_buffer("seen_text", torch.zeros(config.seen_names, config.text_dim))
        scale = logit_scale(config.temperature, config.learn_temperature)
        if isinstance(scale, nn.Parameter):
            self.logit_scale = scale
        else:
            self.register_buffer("logit_scale", scale, persistent=False)

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def remember_seen(self, text: Tensor) -> None:
        """Record the training names (``v ct``); saved with the head, their count in its config."""
        if self.seen_text.shape == text.shape:
            self.seen_text.copy_(F.normalize(text.detach().float(), dim=-1))
            return
        self.seen_text = F.normalize(text.detach().float(), dim=-1).to(self.no_object.device)
        self.config = replace(self.config, seen_names=text.shape[0])

    def seen_flags(self, names: Tensor) -> Tensor:
        """Unit names ``b k ct`` -> bool ``b k``: the name is one the head was trained with."""
        if self.seen_text.numel() == 0:
            return torch.zeros(names.shape[:2], dtype=torch.bool, device=names.device)
        sim = einsum(names.float(), self.seen_text.to(names.device), "b k c, v c -> b k v")
        return sim.max(-1).values > 1 - 1e-4

    def group(self, tokens: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """-> (segment embeddings ``b s d``, mask logits ``b s n``)."""
        if self.config.grouping == "spectral":
            seg = spectral_segments(
                tokens.detach(),
                eigs=self.config.spectral_eigs,
                segments=self.config.queries,
                seed=self.config.seed,
            )
            onehot = rearrange(F.one_hot(seg, self.config.queries).to(patches.dtype), "b n s -> b s n")
            pooled = einsum(onehot, patches, "b s n, b n d -> b s d") / onehot.sum(-1, keepdim=True).clamp(
                min=1
            )
            return pooled, (onehot * 2 - 1) * 20  # a hard segment as mask logits of +-20
        q = self.queries.expand(patches.shape[0], -1, -1)
        for block in self.query_blocks:
            q = block(q, patches)
        masks = einsum(self.mask_embed(q), patches, "b s d, b n d -> b s n") / patches.shape[-1] ** 0.5
        return q, masks

    def classify(self, embeddings: Tensor, names: Tensor) -> Tensor:
        """Segment embeddings ``b s d``, unit names ``b k ct`` -> logits ``b s (k + 1)``, last = no-object."""
        x = F.normalize(self.projection(embeddings), dim=-1)
        named = einsum(x, names, "b s c, b k c -> b s k")
        empty = einsum(x, self.no_object.to(x.dtype), "b s c, o c -> b s o")
        return torch.cat([named, empty], dim=-1) * self.scale

    def forward(
        self,
        tokens: Tensor,
        grid: tuple[int, int],
        text: Tensor,
        size: tuple[int, int] | None = None,
        *,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if text.ndim == 2:
            text = text.expand(tokens.shape[0], -1, -1)
        patches = self.visual_in(tokens)
        for block in self.patch_blocks:
            patches = block(patches)
        patches = self.dense(patches)  # b n d
        names = F.normalize(text.to(patches.dtype), dim=-1)
        embeddings, masks = self.group(tokens, patches)
        classes = self.classify(embeddings, names)  # b s (k + 1)
        if self.config.image_branch and not self.training:
            clip = F.normalize(mask_pooled(tokens.detach(), masks.detach()), dim=-1)
            image = torch.cat(
                [einsum(clip, names, "b s c, b k c -> b s k") * CLIP_SCALE, classes[..., -1:]], -1
            )
            probs = fuse(classes, image, self.seen_flags(names), self.config.balance)
        else:
            probs = classes.softmax(-1)[..., :-1]
        semantic = semantic_map(probs, masks).clamp(1e-6, 1 - 1e-6)
        logits = rearrange(torch.logit(semantic), "b k (gh gw) -> b k gh gw", gh=grid[0], gw=grid[1])
        logits = to_size(logits, grid, self.config.upsample, size)
        if not return_aux:
            return logits
        aux = {
            "classes": classes,
            "masks": rearrange(masks, "b s (gh gw) -> b s gh gw", gh=grid[0], gw=grid[1]),
        }
        return logits, aux

    def aux_loss(self, aux: dict[str, Tensor], target: Tensor, dice_weight: float = DICE_WEIGHT) -> Tensor:
        """The set criterion on ``target`` (``b h w``: 0 background, j + 1 = name j of the pass, -1 ignore);
        with spectral groups (fixed, nothing to match) cross-entropy of each segment's majority label."""
        if self.config.grouping == "spectral":
            return majority_loss(aux["classes"], aux["masks"] > 0, target)
        return set_loss(aux["classes"], aux["masks"], target, dice_weight)


def match(
    classes: Tensor, masks: Tensor, labels: Tensor, truth: Tensor, dice_weight: float
) -> tuple[Tensor, Tensor]:
    """One image: class logits ``s (k + 1)``, mask logits ``s p``, region names ``r``, region masks
    ``r p`` -> (query, region) index pairs minimising ``-p(name) + 20 focal + dice_weight dice``."""
    with torch.no_grad():
        cost_class = -classes.softmax(-1)[:, labels]  # s r
        p = masks.float().sigmoid()
        bce_pos = F.binary_cross_entropy_with_logits(masks.float(), torch.ones_like(p), reduction="none")
        bce_neg = F.binary_cross_entropy_with_logits(masks.float(), torch.zeros_like(p), reduction="none")
        pos = 0.25 * (1 - p) ** 2 * bce_pos
        neg = 0.75 * p**2 * bce_neg
        cost_focal = (pos @ truth.T + neg @ (1 - truth).T) / truth.shape[-1]
        cost_dice = 1 - (2 * p @ truth.T + 1) / (p.sum(-1)[:, None] + truth.sum(-1)[None] + 1)
        cost = cost_class + MASK_WEIGHT * cost_focal + dice_weight * cost_dice
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, device=masks.device), torch.as_tensor(cols, device=masks.device)


def set_loss(classes: Tensor, masks: Tensor, target: Tensor, dice_weight: float = DICE_WEIGHT) -> Tensor:
    """MaskFormer's criterion: class logits ``b s (k + 1)``, mask logits ``b s gh gw``, labels ``b h w``.

    Every named region (``j + 1``) of an image is a target; Hungarian matching (:func:`match`); cross-
    entropy over ``k + 1`` classes on every query (unmatched = no-object, weight 0.1); focal x 20 +
    ``dice_weight`` x dice on the matched masks, over the number of regions in the batch.
    """
    b, s, k1 = classes.shape
    masks = F.interpolate(masks.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    wanted = torch.full((b, s), k1 - 1, dtype=torch.long, device=classes.device)
    focal, dice, count = masks.new_zeros(()), masks.new_zeros(()), 0
    for i in range(b):
        labels = target[i]
        regions = [r for r in labels.unique().tolist() if r > 0]
        if not regions:
            continue
        keep = (labels >= 0).flatten()  # ignored pixels take no part
        truth = torch.stack([labels == r for r in regions]).flatten(1)[:, keep].float()  # r p
        names = torch.tensor(regions, device=classes.device) - 1
        pred = masks[i].flatten(1)[:, keep]  # s p
        rows, cols = match(classes[i], pred, names, truth, dice_weight)
        wanted[i, rows] = names[cols]
        picked, want = pred[rows][None, ..., None], truth[cols][None, ..., None]  # 1 m p 1
        everywhere = torch.ones(1, pred.shape[-1], 1, dtype=torch.bool, device=pred.device)
        focal = focal + sigmoid_focal(picked, want, everywhere).sum()
        dice = dice + smoothed_dice(picked, want, everywhere).sum()
        count += len(regions)
    weight = torch.ones(k1, device=classes.device)
    weight[-1] = NO_OBJECT_WEIGHT
    ce = F.cross_entropy(rearrange(classes.float(), "b s c -> b c s"), wanted, weight)
    return ce + (MASK_WEIGHT * focal + dice_weight * dice) / max(count, 1)


def majority_loss(classes: Tensor, segments: Tensor, target: Tensor) -> Tensor:
    """The spectral hybrid's classifier loss: class logits ``b s (k + 1)``, bool segments ``b s gh gw``,
    labels ``b h w`` -> cross-entropy against each segment's most frequent label (background or
    ignored majority = no-object, weight 0.1)."""
    b, s, k1 = classes.shape
    labels = F.interpolate(target[:, None].float(), size=segments.shape[-2:], mode="nearest")[:, 0].long()
    onehot = F.one_hot(
        (labels.clamp(min=-1) + 1).clamp(max=k1), k1 + 1
    ).float()  # b gh gw (ignore, bg, names)
    counts = einsum(segments.float(), onehot, "b s h w, b h w c -> b s c")
    best = counts.argmax(-1)  # 0 ignore, 1 background, j + 2 name j
    wanted = torch.where(best >= 2, best - 2, torch.full_like(best, k1 - 1))
    weight = torch.ones(k1, device=classes.device)
    weight[-1] = NO_OBJECT_WEIGHT
    return F.cross_entropy(rearrange(classes.float(), "b s c -> b c s"), wanted, weight)


ZEGFORMER = register_method(
    Method(
        name="zegformer",
        config_cls=ZegFormerConfig,
        head_cls=ZegFormerHead,
        from_config=_config,
        dense_module="dense",
        all_seen=True,
        pixel_loss=False,
    )
)

__all__ = ["ZegFormerConfig", "ZegFormerHead", "fuse", "mask_pooled", "semantic_map", "set_loss"]
