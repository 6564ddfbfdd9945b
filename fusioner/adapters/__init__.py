"""Frozen vision and text backbones behind one contract each (see ``base.py``).

Importing the implementation modules here runs their ``@register_*`` decorators: the registries
(:mod:`fusioner.adapters.registry`) are full once this package is imported, and the registry module
itself never imports an implementation.
"""

# The implementations are imported for their registrations (each imports the registry itself).
from fusioner.adapters import hf_text, open_clip, timm_vision, word_vectors  # noqa: F401
from fusioner.adapters.base import TextAdapter, VisionAdapter, VisionOutput
from fusioner.adapters.registry import check, create_text, create_vision, list_text, list_vision

__all__ = [
    "TextAdapter",
    "VisionAdapter",
    "VisionOutput",
    "check",
    "create_text",
    "create_vision",
    "list_text",
    "list_vision",
]
