"""Prompt template sets for text adapters, by name.

``clip`` is the 80-template ImageNet ensemble of the CLIP paper as open_clip ships it; the other
sets are single templates. Word-vector models want the bare name (``name``): function words such
as "a photo of" would dominate an average of word vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from fusioner.errors import ConfigError

# The released Fusioner code's 32 prompts (chaofanma/Fusioner model/text_encoder.py), word for word:
# its checkpoints were trained on their average, so `import-released` and the paper configs use them.
_FUSIONER = (
    "a bad photo of the {}.", "a photo of the large {}.", "a photo of the small {}.",
    "a cropped photo of a {}.", "This is a photo of a {}", "This is a photo of a small {}",
    "This is a photo of a medium {}", "This is a photo of a large {}",
    "This is a masked photo of a {}", "This is a masked photo of a small {}",
    "This is a masked photo of a medium {}", "This is a masked photo of a large {}",
    "This is a cropped photo of a {}", "This is a cropped photo of a small {}",
    "This is a cropped photo of a medium {}", "This is a cropped photo of a large {}",
    "A photo of a {} in the scene", "a bad photo of the {} in the scene",
    "a photo of the large {} in the scene", "a photo of the small {} in the scene",
    "a cropped photo of a {} in the scene", "a photo of a masked {} in the scene",
    "There is a {} in the scene", "There is the {} in the scene", "This is a {} in the scene",
    "This is the {} in the scene", "This is one {} in the scene", "There is a masked {} in the scene",
    "There is the masked {} in the scene", "This is a masked {} in the scene",
    "This is the masked {} in the scene", "This is one masked {} in the scene",
)  # fmt: skip

TEMPLATES: dict[str, tuple[str, ...]] = {
    "name": ("{}",),
    "photo": ("a photo of a {}.",),
    "clip": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    "fusioner": _FUSIONER,
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
