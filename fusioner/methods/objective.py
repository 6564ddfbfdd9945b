"""The training loss when a method or an option adds terms to the head's own mask loss.

``fusioner/engine/train.py`` keeps ``head_loss`` for the plain Fusioner head; :func:`build_objective`
returns an :class:`Objective` only when something more is asked, so the default run is unchanged:

- a method's own term (ZegFormer's class-agnostic grouping loss, ``head.aux_loss``);
- a method's own mask loss over every seen name (ZegCLIP: ``Method.all_seen`` and ``Method.loss``);
- ``spectral_weight``: a pull of predictions toward the eigen-segments (methods/spectral.py; this
  library's term, not SAZS's);
- ``pseudo_labels: kmeans`` (+ ``pseudo_weight``): CLIP-ZSS pseudo-classes (methods/pseudo_labels.py);
- ``global_loss_weight``: CLIP-ZSS's global contrastive term.

The objective's own parameters (the synthesizer, the global projection) train with the head and are
checkpointed with it as ``objective.safetensors`` (engine/checkpoint.py: never a pickle); they are not
part of the saved model, which needs none of them to segment.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from einops import reduce
from torch import Tensor, nn

from fusioner.errors import FusionerError
from fusioner.methods.pseudo_labels import Synthesizer, global_contrastive
from fusioner.methods.registry import PSEUDO_LABELS, call_head, method_of
from fusioner.methods.spectral import SpectralRefiner, eigen_segment_consistency
from fusioner.model.losses import mask_loss, rank_loss, resize_labels


def _unwrap(head: nn.Module) -> nn.Module:
    return getattr(head, "_orig_mod", getattr(head, "module", head))


@contextmanager
def _captured(module: nn.Module | None):
    """The outputs ``module`` produces inside the block (a forward hook, removed on exit)."""
    outputs: list[Tensor] = []
    if module is None:
        yield outputs
        return
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def _pool(features: Tensor, batch: int) -> Tensor:
    """Dense features ``(b q) d h w`` or ``b n d`` -> one vector per image ``b d``."""
    if features.ndim == 4:
        return reduce(features, "(b q) d h w -> b d", "mean", b=batch)
    return reduce(features, "b n d -> b d", "mean")


class Objective(nn.Module):
    def __init__(self, config: Any, head: nn.Module, vision: Any, text_dim: int) -> None:
        super().__init__()
        self.method = method_of(head)
        self.dice_weight, self.ce_weight = config.dice_weight, config.ce_weight
        self.method_term = hasattr(_unwrap(head), "aux_loss")
        self.spectral_weight = config.spectral_weight
        self.refiner = (
            SpectralRefiner(
                1.0, config.spectral_eigs, config.spectral_segments, config.spectral_knn, config.seed
            )
            if config.spectral_weight
            else None
        )
        self.pseudo = PSEUDO_LABELS[config.pseudo_labels]
        self.pseudo_weight, self.clusters, self.seed = (
            config.pseudo_weight,
            config.pseudo_clusters,
            config.seed,
        )
        self.scales = tuple(int(s) for s in config.pseudo_scales)
        self.synthesizer = Synthesizer(vision.embed_dim, text_dim) if self.pseudo is not None else None
        self.global_weight = config.global_loss_weight
        self.global_proj = None
        if self.global_weight:
            if getattr(vision, "has_cls", True) is False:
                raise FusionerError(
                    f"config key 'global_loss_weight': vision backbone {vision.name!r} has no CLS token "
                    "to pull the pooled dense features toward; use a ViT / CLIP backbone or set it to 0"
                )
            self.global_proj = nn.Linear(self.method.dense_dim(_unwrap(head)), vision.embed_dim)

    def forward(
        self,
        head: nn.Module,
        tokens: Tensor,
        grid: tuple[int, int],
        vocab: Tensor,
        class_idx: Tensor,
        target: Tensor,
        cls: Tensor | None = None,
    ) -> Tensor:
        """Same inputs as ``engine.train.head_loss`` (+ the backbone's CLS ``b c`` for the global term)."""
        tokens = tokens.float()
        if self.method.all_seen:  # every seen name on every image, not the sampled ones
            class_idx = torch.arange(len(vocab), device=class_idx.device).expand(class_idx.shape[0], -1)
        text = vocab[class_idx]  # b k ct
        k = text.shape[1]
        pseudo = None
        if self.synthesizer is not None:
            pseudo, prototypes = self.pseudo(
                tokens.detach(), grid, target, clusters=self.clusters, scales=self.scales, seed=self.seed
            )
            text = torch.cat([text, self.synthesizer(prototypes).to(text.dtype)], dim=1)
        plain = _unwrap(head)
        if hasattr(plain, "remember_seen"):  # ZegFormer fuses seen and unseen names differently
            plain.remember_seen(vocab)
        dense = plain.get_submodule(self.method.dense_module) if self.global_proj is not None else None
        with _captured(dense) as features:
            extra = {"return_aux": True} if self.method_term else {}
            out = call_head(head, tokens, grid, text, cls, **extra)
        logits, aux = out if self.method_term else (out, None)
        labels = resize_labels(target, logits.shape[-2:])
        named = logits[:, :k]
        targets = (labels[:, None] == class_idx[:, :, None, None] + 1).to(torch.uint8)
        valid = labels >= 0
        if self.method.loss is not None:
            loss = self.method.loss(named, targets, valid)
        elif not self.method.pixel_loss:
            loss = named.sum() * 0
        else:
            loss = mask_loss(named, targets, valid, self.dice_weight)
        if self.ce_weight and self.method.loss is None and self.method.pixel_loss:
            answered = valid & ((labels == 0) | targets.any(1).bool())
            loss = loss + self.ce_weight * rank_loss(named, targets, answered)
        if pseudo is not None:
            pseudo = resize_labels(pseudo, logits.shape[-2:])
            masks = pseudo[:, None] == torch.arange(self.clusters, device=pseudo.device)[None, :, None, None]
            loss = loss + self.pseudo_weight * mask_loss(
                logits[:, k:], masks.to(torch.uint8), valid, self.dice_weight
            )
        if self.method_term:
            loss = loss + plain.aux_loss(aux, labels, self.dice_weight)
        if self.refiner is not None:
            loss = loss + self.spectral_weight * eigen_segment_consistency(named, tokens, grid, self.refiner)
        if self.global_proj is not None:
            if cls is None:
                raise FusionerError(
                    "config key 'global_loss_weight': the backbone returned no CLS token for this batch"
                )
            pooled = self.global_proj(_pool(features[-1], tokens.shape[0]))
            loss = loss + self.global_weight * global_contrastive(pooled, cls)
        return loss


def build_objective(
    config: Any, head: nn.Module, vision: Any, text_dim: int, vocab: Tensor | None = None
) -> Objective | None:
    """The objective ``config`` asks for, or None when the head's own ``head_loss`` is the whole loss.

    ``vocab`` (the seen names' embeddings): a head that tells seen from unseen names (ZegFormer's
    fusion) records them now, before a resumed run loads its checkpoint into the head.
    """
    if vocab is not None and hasattr(_unwrap(head), "remember_seen"):
        _unwrap(head).remember_seen(vocab)
    method = method_of(head)
    extra = (
        hasattr(_unwrap(head), "aux_loss")
        or method.loss is not None
        or method.all_seen
        or config.spectral_weight
        or config.pseudo_labels != "none"
        or config.global_loss_weight
    )
    return Objective(config, head, vision, text_dim) if extra else None
