"""ZegCLIP's transductive setting (``zegclip_self_training``): unseen pixels named by the model itself.

ZegCLIP (official code ZiqinZhou66/ZegCLIP) trains "transductively" with ``self_training=True``
(``configs/voc12/vpt_seg_zero_vit-b_512x512_10k_12_10_st.py``, ``configs/coco/*_st.py``), a run
started from the inductive model (``--load-from`` its last checkpoint, README):

- ``models/segmentor/zegclip.py`` (``_visiable_mask_st``): a pixel of a seen class keeps its label,
  a pixel of an unseen class becomes -1 (its class withheld, its being unseen known), an ignored
  pixel stays ignored; every name, seen and unseen, is scored (``text_feat`` is not cut to the
  seen classes as in the inductive run);
- ``models/decode_heads/decode_seg.py`` (``ATMSingleHeadSeg.forward_train``): from the training
  forward's own mask logits, detached, ``sigmoid``, the seen names' channels set to -1, ``argmax``
  over names: every -1 pixel takes the unseen name of highest score, *all* of them (no confidence
  threshold, no top-k), then the loss runs on these labels as on ground truth.

Here the data side marks a pixel of an unseen class :data:`UNSEEN` (fusioner/engine/train_data.py;
the inductive default makes it background), and :func:`pseudo_label` is the decode head's rule.
Before ``zegclip_st_start`` (optimizer steps) the run is ZegCLIP's inductive phase: seen names only,
:data:`UNSEEN` pixels ignored (its ``_visiable_mask`` maps them to -1, then to the ignore index);
from it on, the unseen names are scored too and their pseudo-labels train them. One run with a
start step stands in for ZegCLIP's two runs (inductive, then ``--load-from`` + self-training);
the optimizer and schedule run on through the switch instead of restarting.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusioner.config import register_check
from fusioner.errors import ConfigError

UNSEEN = -2  # training target of a pixel of an unseen class whose name is withheld (ignore is -1)


def self_training_on(config: Any, step: int | None) -> bool:
    """Whether optimizer step ``step`` (0-based; None = no step counted: on) pseudo-labels."""
    if not getattr(config, "zegclip_self_training", False):
        return False
    return step is None or step >= getattr(config, "zegclip_st_start", 0)


def pseudo_label(unseen_logits: Tensor, labels: Tensor, first: int) -> Tensor:
    """ZegCLIP's pseudo-labels: every :data:`UNSEEN` pixel of ``labels`` (``b h w``) becomes
    ``first + j`` with ``j`` the unseen name of highest ``sigmoid`` score in ``unseen_logits``
    (``b u h w``, the training forward's mask logits of the unseen names, taken detached); every
    other pixel (seen, background, ignored) keeps its label. Ties go to the first name, as
    ``torch.argmax`` does in the official code."""
    if unseen_logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"pseudo_label: logits {tuple(unseen_logits.shape)} vs labels {tuple(labels.shape)}")
    best = unseen_logits.detach().float().sigmoid().argmax(1).to(labels.dtype) + first
    return torch.where(labels == UNSEEN, best, labels)


@register_check
def check_self_training(config: Any) -> None:
    """The transductive setting's rules, run by ``Config.__post_init__``."""
    if not config.zegclip_self_training:
        return
    if config.method != "zegclip":
        raise ConfigError(
            "config key 'zegclip_self_training': ZegCLIP's transductive setting is a zegclip option; "
            f"method is {config.method!r}"
        )
    if config.drop_unseen_images:
        raise ConfigError(
            "config key 'zegclip_self_training': self-training names the unseen pixels of the training "
            "images, and drop_unseen_images=true removes every image that has any; set it to false"
        )
    if config.pseudo_labels != "none":
        raise ConfigError(
            "config key 'zegclip_self_training': ZegCLIP's pseudo-labels and pseudo_labels="
            f"{config.pseudo_labels!r} both name unlabelled pixels; use one of them"
        )


__all__ = ["UNSEEN", "check_self_training", "pseudo_label", "self_training_on"]
