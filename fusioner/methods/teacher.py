"""CLIP-ZSS's frozen teacher: a second vision adapter beside the student backbone, training only.

Config key ``teacher_vision`` names it (e.g. ``clip_vitb16``; ``teacher_weights`` as
``vision_weights``); empty = the run's own backbone is its own teacher (the student's tokens and CLS,
the library's earlier behaviour). The teacher never enters the saved model: CLIP-ZSS segments with
the student alone. With ``use_cache`` its dense tokens and CLS are cached like the student's, in a
folder of their own (the cache key names the adapter and its weights), and read beside them
(engine/train_data.py); without the cache it runs on each batch's images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fusioner import adapters


@dataclass(frozen=True)
class TeacherOutput:
    """The teacher's view of a batch: dense tokens ``b n c`` on ``grid`` and CLS ``b c``."""

    tokens: Tensor
    grid: tuple[int, int]
    cls: Tensor | None


def needs_teacher(config: Any) -> bool:
    """Whether a run trains with CLIP-ZSS's terms and names a teacher of its own."""
    asks = getattr(config, "pseudo_labels", "none") == "clip-zss" or getattr(config, "global_loss_weight", 0)
    return bool(asks and getattr(config, "teacher_vision", ""))


def build_teacher(config: Any) -> adapters.VisionAdapter | None:
    """The frozen teacher adapter the config names, or None (no teacher key, or no CLIP-ZSS term)."""
    if not needs_teacher(config):
        return None
    # Through the module attribute, so a caller that swaps the factory (tests at a tiny width) reaches it.
    return adapters.create_vision(config.teacher_vision, config.teacher_weights or None)


def teacher_dim(vision: Any, teacher: Any | None) -> int:
    """The width of the teacher's tokens and CLS (the student's own when it is its own teacher)."""
    return (teacher if teacher is not None else vision).embed_dim
