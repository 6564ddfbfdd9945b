"""The two adapter contracts every backbone family implements, and what "frozen" means.

A vision adapter turns ``b 3 h w`` images in [0, 1] into patch tokens ``b n c`` on a ``gh x gw``
grid; a text adapter turns ``k`` class names into ``k c`` embeddings. Both are frozen for real:
no gradients, eval mode forever (``.train()`` on a parent cannot switch dropout or norm layers
back on), and their weights never enter a checkpoint of the trainable model.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusioner.errors import FusionerError


@dataclass(frozen=True)
class VisionOutput:
    tokens: Tensor  # b n c, n = gh * gw in row-major order
    grid: tuple[int, int]  # (gh, gw)
    cls: Tensor | None = None  # b c: CLS / pooled token when the model has one


class FrozenModule(nn.Module):
    """A module whose parameters never train and which never leaves eval mode."""

    def freeze(self) -> FrozenModule:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        # A parent's .train() recurses into children; ignoring it keeps dropout off and
        # norm statistics fixed, so cached features equal features computed on the fly.
        return super().train(False)

    def fingerprint(self) -> str:
        """A digest of the weights, so caches keyed on it go stale when the weights change."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha1()
            for key, value in sorted(self.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


class VisionAdapter(FrozenModule):
    """Frozen image encoder: ``b 3 h w`` in [0, 1] -> :class:`VisionOutput`.

    ``patch_size`` is the token stride in pixels; ``h`` and ``w`` must be multiples of it.
    The adapter applies its own mean/std, so callers never normalise images themselves.
    """

    def __init__(
        self,
        name: str,
        embed_dim: int,
        patch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.name = name
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def preprocessing(self) -> dict[str, object]:
        """Everything that changes the tokens besides the weights (part of cache keys)."""
        return {
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "patch": self.patch_size,
        }

    @abstractmethod
    def encode(self, x: Tensor) -> VisionOutput:
        """Normalised ``b 3 h w`` -> tokens; called under no-grad."""

    def forward(self, images: Tensor) -> VisionOutput:
        with torch.no_grad():
            x = self.normalized(images)
            h, w = x.shape[-2:]
            if h % self.patch_size or w % self.patch_size:
                raise FusionerError(
                    f"{self.name}: image size {h}x{w} is not a multiple of the patch size {self.patch_size}"
                )
            return self.encode(x)

    def normalized(self, images: Tensor) -> Tensor:
        """images ``b 3 h w`` in [0, 1] -> the backbone's input (its mean / std, its dtype)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise FusionerError(f"{self.name}: expected images 'b 3 h w', got shape {tuple(images.shape)}")
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        return x.to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size, w // self.patch_size


class TextAdapter(FrozenModule):
    """Frozen text encoder: ``k`` class names -> ``k c`` unit-norm embeddings.

    Each name is put into every prompt template, encoded, normalised and averaged (CLIP's
    template ensemble; a single template is the one-element case), then normalised again.
    Embeddings are cached per (name, templates): a vocabulary is encoded once per adapter.
    """

    def __init__(self, name: str, embed_dim: int, templates: Sequence[str]) -> None:
        super().__init__()
        self.name = name
        self.embed_dim = embed_dim
        self.templates = tuple(templates)
        self._cache: dict[tuple[str, tuple[str, ...]], Tensor] = {}

    @abstractmethod
    def encode(self, texts: list[str]) -> Tensor:
        """``t`` texts -> ``t c`` embeddings; called under no-grad."""

    def forward(self, names: Sequence[str], templates: Sequence[str] | None = None) -> Tensor:
        names = list(names)
        if not names:
            raise FusionerError(f"{self.name}: the list of class names is empty")
        for n in names:
            if not isinstance(n, str) or not n.strip():
                raise FusionerError(f"{self.name}: class names must be non-empty strings, got {n!r}")
        templates = tuple(templates) if templates is not None else self.templates
        todo = list(dict.fromkeys(n for n in names if (n, templates) not in self._cache))
        if todo:
            with torch.no_grad():
                texts = [t.replace("{}", n) for n in todo for t in templates]
                emb = self.encode(texts).float()  # (k t) c
                emb = nn.functional.normalize(emb, dim=-1).view(len(todo), len(templates), -1).mean(1)
                emb = nn.functional.normalize(emb, dim=-1).cpu()
            for n, e in zip(todo, emb, strict=True):
                self._cache[(n, templates)] = e
        return torch.stack([self._cache[(n, templates)] for n in names]).to(self.device)

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")
