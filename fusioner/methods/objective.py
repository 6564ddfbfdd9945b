"""The training loss when a method or an option adds terms to the head's own mask loss.

``fusioner/engine/train.py`` keeps ``head_loss`` for the plain Fusioner head; :func:`build_objective`
returns an :class:`Objective` only when something more is asked, so the default run is unchanged:

- a method's own term (ZegFormer's class-agnostic grouping loss, ``head.aux_loss``);
- a method's own mask loss over every seen name (ZegCLIP: ``Method.all_seen`` and ``Method.loss``);
- ``spectral_weight``: a pull of predictions toward the eigen-segments (methods/spectral.py; this
  library's term, not SAZS's);
- ``pseudo_labels: clip-zss`` (+ ``pseudo_weight``): CLIP-ZSS's pixel learning, pseudo-classes from
  the teacher's dense tokens (methods/pseudo_labels.py) named by the synthesizer from student-feature
  centroids and the teacher's CLS, cross-entropy over seen + pseudo names, seen names anchored to
  their text (methods/clip_zss.py); ``kmeans``: the library's earlier fixed-K variant;
- ``global_loss_weight``: CLIP-ZSS's global learning (CLS-query attention pooling, CLS bank);
- ``sazs_edge_weight``: SAZS's boundary / edge constraint (methods/sazs_edges.py; with
  ``inverseform_weights``, its InverseForm term too, methods/inverseform.py);
- ``zegclip_self_training``: ZegCLIP's transductive setting (methods/zegclip_st.py): from step
  ``zegclip_st_start`` the unseen names (``unseen``) are scored too and the unseen-class pixels take
  the unseen name the head scores highest there, as labels.

CLIP-ZSS's teacher is ``teacher_vision`` (methods/teacher.py); without one the run's own backbone
stands in (its tokens and CLS).

The objective's own parameters (the synthesizer, the global projection) train with the head and are
checkpointed with it as ``objective.safetensors`` (engine/checkpoint.py: never a pickle); they are not
part of the saved model, which needs none of them to segment.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fusioner.errors import FusionerError
from fusioner.methods import clip_zss
from fusioner.methods.inverseform import load_inverseform
from fusioner.methods.pseudo_labels import Synthesizer
from fusioner.methods.registry import PSEUDO_LABELS, call_head, method_of
from fusioner.methods.sazs_edges import EdgeHead, sazs_edge_loss
from fusioner.methods.spectral import SpectralRefiner, eigen_segment_consistency
from fusioner.methods.teacher import TeacherOutput, teacher_dim
from fusioner.methods.zegclip_st import pseudo_label, self_training_on
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


class Objective(nn.Module):
    def __init__(
        self,
        config: Any,
        head: nn.Module,
        vision: Any,
        text_dim: int,
        teacher: Any | None = None,
        unseen: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.method = method_of(head)
        self.config = config
        self.self_training = bool(getattr(config, "zegclip_self_training", False))
        if self.self_training and (unseen is None or not len(unseen)):
            raise FusionerError(
                "config key 'zegclip_self_training': the transductive setting needs the unseen names "
                "(this split holds out none)"
            )
        # u ct: the unseen names' embeddings (ZegCLIP's transductive setting only); not checkpointed
        self.register_buffer("unseen", unseen if self.self_training else None, persistent=False)
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
        self.published = config.pseudo_labels == "clip-zss"
        self.merge = getattr(config, "pseudo_merge", 0.85)
        clip_dim = teacher_dim(vision, teacher)
        self.synthesizer: nn.Module | None = None
        if self.published:
            self.synthesizer = clip_zss.Synthesizer(vision.embed_dim, clip_dim, text_dim)
        elif self.pseudo is not None:
            self.synthesizer = Synthesizer(vision.embed_dim, text_dim)
        self.global_weight = config.global_loss_weight
        self.global_term = None
        if self.global_weight:
            if teacher is None and getattr(vision, "has_cls", True) is False:
                raise FusionerError(
                    f"config key 'global_loss_weight': vision backbone {vision.name!r} has no CLS token "
                    "to query its dense features with; name a CLIP teacher (teacher_vision=clip_vitb16) "
                    "or set it to 0"
                )
            self.global_term = clip_zss.GlobalLearning(
                self.method.dense_dim(_unwrap(head)), clip_dim, getattr(config, "global_bank", 256)
            )

        self.edge_weight = getattr(config, "sazs_edge_weight", 0.0)
        self.edge_head = EdgeHead(self.method.dense_dim(_unwrap(head))) if self.edge_weight else None
        # InverseForm's frozen regressor (SAZS's third edge term): held in a list, out of the
        # objective's parameters and state dict, so it is neither optimised nor checkpointed.
        path = getattr(config, "inverseform_weights", "") if self.edge_weight else ""
        self.inverse_net = [load_inverseform(path)] if path else []

    def forward(
        self,
        head: nn.Module,
        tokens: Tensor,
        grid: tuple[int, int],
        vocab: Tensor,
        class_idx: Tensor,
        target: Tensor,
        cls: Tensor | None = None,
        teacher: TeacherOutput | None = None,
        step: int | None = None,
    ) -> Tensor:
        """Same inputs as ``engine.train.head_loss`` (+ the backbone's CLS ``b c``, CLIP-ZSS's
        teacher view of the batch: None = the backbone is its own teacher, and the 0-based optimizer
        step, which starts ZegCLIP's self-training: None = started)."""
        tokens = tokens.float()
        view = teacher if teacher is not None else TeacherOutput(tokens, grid, cls)
        if self.method.all_seen:  # every seen name on every image, not the sampled ones
            class_idx = torch.arange(len(vocab), device=class_idx.device).expand(class_idx.shape[0], -1)
        text = vocab[class_idx]  # b k ct
        transductive = self.self_training and self_training_on(self.config, step)
        if transductive:  # the unseen names after the seen ones: name j answers label len(vocab) + j + 1
            unseen_idx = torch.arange(len(self.unseen), device=class_idx.device) + len(vocab)
            class_idx = torch.cat([class_idx, unseen_idx.expand(class_idx.shape[0], -1)], dim=1)
            text = torch.cat([text, self.unseen.to(text)[None].expand(text.shape[0], -1, -1)], dim=1)
        k = text.shape[1]
        pseudo, anchor = None, tokens.new_zeros(())
        if self.published:
            pseudo, counts = self.pseudo(
                view.tokens.detach(), view.grid, target, clusters=self.clusters, scales=self.scales,
                merge=self.merge,
            )  # fmt: skip
            ids = torch.arange(int(counts.max()), device=target.device).expand(len(target), -1)
            seen_c, seen_present = clip_zss.class_centroids(tokens.detach(), grid, target, class_idx + 1)
            pseudo_c, pseudo_present = clip_zss.class_centroids(tokens.detach(), grid, pseudo, ids)
            synthesized = self.synthesizer(
                torch.cat([seen_c, pseudo_c], 1), view.cls, torch.cat([seen_present, pseudo_present], 1)
            )
            anchor = self.pseudo_weight * clip_zss.anchor_loss(synthesized[:, :k], text, seen_present)
            text = torch.cat([text, synthesized[:, k:].to(text.dtype)], dim=1)
        elif self.synthesizer is not None:
            pseudo, prototypes = self.pseudo(
                tokens.detach(), grid, target, clusters=self.clusters, scales=self.scales, seed=self.seed
            )
            text = torch.cat([text, self.synthesizer(prototypes).to(text.dtype)], dim=1)
        plain = _unwrap(head)
        if hasattr(plain, "remember_seen"):  # ZegFormer fuses seen and unseen names differently
            plain.remember_seen(vocab)
        wants_dense = self.global_term is not None or self.edge_head is not None
        dense = plain.get_submodule(self.method.dense_module) if wants_dense else None
        with _captured(dense) as features:
            extra = {"return_aux": True} if self.method_term else {}
            out = call_head(head, tokens, grid, text, cls, **extra)
        logits, aux = out if self.method_term else (out, None)
        labels = resize_labels(target, logits.shape[-2:])
        named = logits[:, :k]
        if transductive:
            u = len(self.unseen)
            labels = pseudo_label(named[:, k - u :], labels, len(vocab) + 1)
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
        if pseudo is not None and self.published:
            pseudo = resize_labels(pseudo, logits.shape[-2:])
            loss = (
                loss
                + anchor
                + self.pseudo_weight
                * clip_zss.seen_and_pseudo_loss(logits, labels, class_idx, pseudo, pseudo_present)
            )
        elif pseudo is not None:
            pseudo = resize_labels(pseudo, logits.shape[-2:])
            masks = pseudo[:, None] == torch.arange(self.clusters, device=pseudo.device)[None, :, None, None]
            loss = loss + self.pseudo_weight * mask_loss(
                logits[:, k:], masks.to(torch.uint8), valid, self.dice_weight
            )
        if self.method_term:
            loss = loss + plain.aux_loss(aux, labels, self.dice_weight)
        if self.refiner is not None:
            loss = loss + self.spectral_weight * eigen_segment_consistency(named, tokens, grid, self.refiner)
        if self.edge_head is not None:
            inverse_net = self.inverse_net[0] if self.inverse_net else None
            edge = sazs_edge_loss(self.edge_head, features[-1], named, target, class_idx, inverse_net)
            loss = loss + self.edge_weight * edge
        if self.global_term is not None:
            if view.cls is None:
                raise FusionerError(
                    "config key 'global_loss_weight': the teacher returned no CLS token for this batch"
                )
            dense_features = clip_zss.dense_tokens(features[-1], tokens.shape[0])
            loss = loss + self.global_weight * self.global_term(dense_features, view.cls)
        return loss


def build_objective(
    config: Any,
    head: nn.Module,
    vision: Any,
    text_dim: int,
    vocab: Tensor | None = None,
    teacher: Any | None = None,
    unseen: Tensor | None = None,
) -> Objective | None:
    """The objective ``config`` asks for, or None when the head's own ``head_loss`` is the whole loss.

    ``vocab`` (the seen names' embeddings): a head that tells seen from unseen names (ZegFormer's
    fusion) records them now, before a resumed run loads its checkpoint into the head. ``unseen``
    (the unseen names' embeddings): ZegCLIP's transductive setting scores them too.
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
        or getattr(config, "sazs_edge_weight", 0.0)
        or getattr(config, "zegclip_self_training", False)
    )
    return Objective(config, head, vision, text_dim, teacher, unseen) if extra else None
