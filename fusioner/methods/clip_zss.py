"""CLIP-ZSS's two training modules around a frozen CLIP teacher (the pseudo-labels: pseudo_labels.py).

CLIP-ZSS (arXiv 2310.02296) trains a closed-set *student* segmenter with a frozen CLIP *teacher* that
is not needed at test time. No code is public; this follows the paper's text, and where the text
gives no formula the choice made here is stated.

*Global Learning Module* (:class:`GlobalLearning`): the teacher's CLS token (the only token CLIP's
training aligns with text) is the query of an attention over the student's dense features; the
pooled vector, projected to the CLIP width, must match its own image's CLS against the other images'
CLS tokens and a bank of CLS tokens from earlier batches (InfoNCE, temperature 0.07). Because the
query is the teacher's CLS, a student without a CLS of its own trains the same way, and a cached
teacher CLS serves as well as a fresh one. Choices: one attention head, keys / values / query /
output are single linear maps, the bank is a first-in first-out queue of ``global_bank`` CLS tokens.

*Pixel Learning Module*: each image's student features are averaged over every seen class present
and every pseudo-class (:func:`class_centroids`); a small transformer decoder, the
:class:`Synthesizer`, reads those centroids (self-attention) and the image's CLIP CLS
(cross-attention) and writes one text-space embedding per centroid. Seen ones are anchored to their
CLIP text embedding (:func:`anchor_loss`, 1 - cosine); pseudo ones are used as the pseudo-classes'
names, and every pixel that is a seen class or a pseudo-class is classified over the seen names and
the pseudo names together (:func:`seen_and_pseudo_loss`, cross-entropy).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.model.losses import resize_labels


# -- global learning ---------------------------------------------------------------------------------
def bank_infonce(pooled: Tensor, cls: Tensor, bank: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE: row i of ``pooled`` ``b c`` against every CLS of the batch ``b c`` and the ``bank``
    ``m c`` (cosines / temperature); the positive is its own image's CLS."""
    keys = F.normalize(torch.cat([cls.float(), bank.float()]), dim=-1)
    logits = F.normalize(pooled.float(), dim=-1) @ keys.T / temperature
    return F.cross_entropy(logits, torch.arange(len(pooled), device=pooled.device))


class GlobalLearning(nn.Module):
    """CLS-query attention pooling of the student's dense features + the CLS-bank contrastive term."""

    def __init__(self, dense_dim: int, clip_dim: int, bank: int = 256, temperature: float = 0.07) -> None:
        super().__init__()
        self.query = nn.Linear(clip_dim, dense_dim)
        self.key = nn.Linear(dense_dim, dense_dim)
        self.value = nn.Linear(dense_dim, dense_dim)
        self.out = nn.Linear(dense_dim, clip_dim)
        self.temperature = temperature
        # The bank is state of the run (checkpointed with the objective, so a resumed run sees the
        # negatives an uninterrupted one would), not a parameter.
        self.register_buffer("bank", torch.zeros(bank, clip_dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))

    def pool(self, dense: Tensor, cls: Tensor) -> Tensor:
        """Student features ``b n d``, teacher CLS ``b c`` -> ``b c``: softmax(q k^T / sqrt(d)) v, out."""
        q = self.query(cls.float())[:, None]  # b 1 d
        weights = torch.softmax(q @ self.key(dense).transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out((weights @ self.value(dense))[:, 0])

    @torch.no_grad()
    def push(self, cls: Tensor) -> None:
        """Add this batch's CLS tokens to the bank (the oldest leave first)."""
        size = len(self.bank)
        if size == 0:
            return
        for row in cls.detach().float()[-size:]:
            self.bank[self.cursor] = row
            self.cursor.fill_((int(self.cursor) + 1) % size)
            self.filled.fill_(min(int(self.filled) + 1, size))

    def forward(self, dense: Tensor, cls: Tensor) -> Tensor:
        loss = bank_infonce(self.pool(dense, cls), cls, self.bank[: int(self.filled)], self.temperature)
        self.push(cls)
        return loss


def dense_tokens(features: Tensor, batch: int) -> Tensor:
    """A head's dense features, ``(b q) d h w`` (per image and name) or ``b n d`` -> ``b n d``."""
    if features.ndim == 4:
        return rearrange(features.float(), "(b q) d h w -> b (q h w) d", b=batch)
    return features.float()


# -- pixel learning ----------------------------------------------------------------------------------
def class_centroids(
    tokens: Tensor, grid: tuple[int, int], labels: Tensor, ids: Tensor
) -> tuple[Tensor, Tensor]:
    """Student tokens ``b n c``, labels ``b h w``, the label of each slot ``b m`` -> (mean token of
    each slot's label ``b m c``, present ``b m``). Labels are read at each token's centre."""
    at_tokens = rearrange(resize_labels(labels, grid), "b gh gw -> b (gh gw)")
    member = (at_tokens[:, None] == ids[:, :, None]).to(tokens.dtype)  # b m n
    count = member.sum(-1)
    return member @ tokens / count.clamp(min=1)[..., None], count > 0


class Synthesizer(nn.Module):
    """Centroids ``b m c`` (+ the image's CLIP CLS ``b e``) -> text-space embeddings ``b m t`` (unit).

    One decoder layer: self-attention among the image's centroids (padding masked), cross-attention
    to the CLS, an MLP; pre-norm residuals; a linear map to the text width.
    """

    def __init__(
        self, vision_dim: int, clip_dim: int, text_dim: int, width: int = 256, heads: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, width))
        self.memory = nn.Linear(clip_dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.out = nn.Linear(width, text_dim)

    def forward(self, centroids: Tensor, cls: Tensor | None, present: Tensor) -> Tensor:
        x = self.embed(centroids.float())
        h = self.norms[0](x)
        # An image with no present slot attends to all of them (all-masked rows would be NaN).
        pad = ~present & present.any(-1, keepdim=True)
        x = x + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        if cls is not None:  # a student that is its own teacher and has no CLS: no CLIP to attend to
            memory = self.memory(cls.float())[:, None]  # b 1 w
            x = x + self.cross_attn(self.norms[1](x), memory, memory, need_weights=False)[0]
        x = x + self.mlp(self.norms[2](x))
        return F.normalize(self.out(self.norms[3](x)), dim=-1)


def anchor_loss(synthesized: Tensor, text: Tensor, present: Tensor) -> Tensor:
    """Mean ``1 - cos`` between each present seen slot's synthesized embedding and its CLIP text."""
    cos = F.cosine_similarity(synthesized.float(), text.float(), dim=-1)
    return ((1 - cos) * present).sum() / present.sum().clamp(min=1)


def seen_and_pseudo_loss(
    logits: Tensor, labels: Tensor, class_idx: Tensor, pseudo: Tensor, pseudo_present: Tensor
) -> Tensor:
    """Per-pixel cross-entropy over the ``k`` seen names then the ``p`` pseudo names.

    logits ``b (k+p) h w``; labels ``b h w`` (``j + 1`` = seen[j], 0 background, < 0 ignore);
    class_idx ``b k``; pseudo ``b h w`` (pseudo id or -1); pseudo_present ``b p``. A seen pixel's
    class is the slot naming its label, a pseudo pixel's is ``k +`` its id; other pixels are left
    out; pseudo slots an image does not have are no option for its pixels.
    """
    k = class_idx.shape[1]
    slot = (labels[:, None] == class_idx[:, :, None, None] + 1).float().argmax(1)  # b h w
    named = (labels[:, None] == class_idx[:, :, None, None] + 1).any(1)
    target = torch.where(named, slot, torch.where(pseudo >= 0, k + pseudo, torch.full_like(slot, -1)))
    absent = torch.cat([torch.zeros_like(class_idx, dtype=torch.bool), ~pseudo_present], dim=1)
    logits = logits.float().masked_fill(absent[:, :, None, None], -1e4)
    if not (target >= 0).any():
        return logits.sum() * 0
    return F.cross_entropy(logits, target, ignore_index=-1)
