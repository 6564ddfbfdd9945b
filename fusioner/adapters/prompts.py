"""Prompt template sets for text adapters, by name.

``clip`` is the 80-template ImageNet ensemble of the CLIP paper as open_clip ships it; the other
sets are single templates. Word-vector models want the bare name (``name``): function words such
as "a photo of" would dominate an average of word vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from fusioner.errors import ConfigError

TEMPLATES: dict[str, tuple[str, ...]] = {
    "name": ("{}",),
    "photo": ("a photo of a {}.",),
    "clip": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A set name from :data:`TEMPLATES`, or an explicit list of templates each containing ``{}``."""
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ConfigError(f"unknown prompt template set {templates!r}; known: {', '.join(TEMPLATES)}")
        return TEMPLATES[templates]
    templates = tuple(templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(
            f"prompt templates must be a non-empty list of strings containing '{{}}', got {bad or templates}"
        )
    return templates
