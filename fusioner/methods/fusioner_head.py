"""The Fusioner head (fusioner/model/head.py) as the default method, unchanged."""

from __future__ import annotations

from typing import Any

from fusioner.methods.registry import Method, register_method
from fusioner.model.head import FusionHead, HeadConfig


def _head_config(config: Any, vision: Any, text: Any) -> HeadConfig:
    return HeadConfig.from_config(config, vision.embed_dim, text.embed_dim)


FUSIONER = register_method(
    Method(
        name="fusioner",
        config_cls=HeadConfig,
        head_cls=FusionHead,
        from_config=_head_config,
        # The decoder's per-pixel embeddings: the last dense features before names are scored.
        dense_module="decoder",
        dense_dim=lambda head: head.decoder.out_dim,
    )
)
