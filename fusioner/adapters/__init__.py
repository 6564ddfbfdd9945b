"""Frozen vision and text backbones behind one contract each (see ``base.py``)."""

from fusioner.adapters.base import TextAdapter, VisionAdapter, VisionOutput
from fusioner.adapters.registry import create_text, create_vision, list_text, list_vision

__all__ = [
    "TextAdapter",
    "VisionAdapter",
    "VisionOutput",
    "create_text",
    "create_vision",
    "list_text",
    "list_vision",
]
