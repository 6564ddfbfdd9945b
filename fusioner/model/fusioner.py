"""FusionHead (the only trainable part) and FusionerModel (head + frozen adapters by name).

A saved model is ``config.json`` (the head's hyper-parameters and the names, weights ids,
preprocessing and prompt templates of the two frozen backbones) plus ``model.safetensors`` with the
head's weights alone; :meth:`FusionerModel.from_pretrained` rebuilds the adapters by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from einops import einsum
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

import fusioner
from fusioner.adapters import TextAdapter, VisionAdapter, create_text, create_vision
from fusioner.adapters.prompts import resolve_templates
from fusioner.errors import FusionerError
from fusioner.io import atomic_write, atomic_write_json
from fusioner.model.decoder import Decoder
from fusioner.model.fusion import JointFusion

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class HeadConfig:
    vision_dim: int
    text_dim: int
    dim: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    decoder: str = "default"
    temperature: float = 0.07

    @classmethod
    def from_config(cls, config: Any, vision_dim: int, text_dim: int) -> HeadConfig:
        """The head a :class:`fusioner.config.Config` asks for, between backbones of these widths."""
        return cls(
            vision_dim=vision_dim,
            text_dim=text_dim,
            dim=config.dim,
            depth=config.depth,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            decoder=config.decoder,
            temperature=config.temperature,
        )


class FusionHead(nn.Module):
    """Patch tokens + class embeddings -> per-class mask logits, all K classes in one pass."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = Decoder(config.dim, config.decoder)
        self.fusion = JointFusion(
            config.vision_dim,
            config.text_dim,
            config.dim,
            config.depth,
            config.heads,
            config.mlp_ratio,
            class_dim=self.decoder.out_dim,
        )

    def forward(
        self, tokens: Tensor, grid: tuple[int, int], text: Tensor, size: tuple[int, int] | None = None
    ) -> Tensor:
        """tokens ``b n cv``, text ``b k ct`` (or ``k ct``, shared) -> logits ``b k h w``.

        ``h w`` is ``size`` when given, else the decoder's own resolution (8x the grid), for callers
        that resize the logits themselves (resizing twice would cost more than the head).
        """
        if text.ndim == 2:
            text = text.expand(tokens.shape[0], -1, -1)
        visual, classes = self.fusion(tokens, text.to(tokens.dtype))
        pixels = F.normalize(self.decoder(visual, grid), dim=1)
        classes = F.normalize(classes, dim=-1)
        logits = einsum(pixels, classes, "b d h w, b k d -> b k h w") / self.config.temperature
        if size is None:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def labels_from_logits(logits: Tensor, threshold: float) -> Tensor:
    """``b k h w`` logits -> ``b h w`` labels: 0 where every class is below threshold, else argmax + 1."""
    # sigmoid is monotonic: take the max on logits and apply it to one value per pixel, not k.
    best, index = logits.max(dim=1)
    return torch.where(best.float().sigmoid() >= threshold, index + 1, torch.zeros_like(index))


class FusionerModel(nn.Module):
    """Frozen vision and text adapters + a trainable :class:`FusionHead`.

    ``model.head`` is the only trainable module; it is what the optimizer sees and what
    :meth:`save_pretrained` writes. The adapters are recorded by registry name and weights id.
    """

    def __init__(
        self,
        head: FusionHead,
        vision: VisionAdapter,
        text: TextAdapter,
        *,
        vision_weights: str | None = None,
        text_weights: str | None = None,
        image_size: int = 384,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.head = head
        self.vision = vision
        self.text = text
        self.vision_weights = vision_weights
        self.text_weights = text_weights
        self.image_size = image_size
        self.threshold = threshold

    @classmethod
    def from_config(cls, config: Any) -> FusionerModel:
        """Build adapters and a freshly initialised head from a :class:`fusioner.config.Config`."""
        vision = create_vision(config.vision, config.vision_weights)
        text = create_text(config.text, config.text_weights, templates=resolve_templates(config.templates))
        if config.image_size % vision.patch_size:
            raise FusionerError(
                f"config key 'image_size': {config.image_size} is not a multiple of {vision.name}'s "
                f"patch size {vision.patch_size}"
            )
        head = FusionHead(HeadConfig.from_config(config, vision.embed_dim, text.embed_dim))
        return cls(
            head,
            vision,
            text,
            vision_weights=config.vision_weights,
            text_weights=config.text_weights,
            image_size=config.image_size,
            threshold=config.threshold,
        )

    def forward(self, images: Tensor, names: list[str]) -> Tensor:
        """images ``b 3 h w`` in [0, 1], K names -> logits ``b k h w``."""
        out = self.vision(images)
        return self.head(out.tokens, out.grid, self.text(names), images.shape[-2:])

    @torch.no_grad()
    def predict(self, images: Tensor, names: list[str]) -> Tensor:
        """images ``b 3 h w`` -> labels ``b h w``: 0 = background, i = names[i - 1]."""
        return labels_from_logits(self(images, names), self.threshold)

    # -- persistence ---------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """Everything needed to rebuild this model besides the head's weights (config.json)."""
        return {
            "fusioner_version": fusioner.__version__,
            "vision": self.vision.name,
            "vision_weights": self.vision_weights,
            "vision_preprocessing": self.vision.preprocessing,
            "text": self.text.name,
            "text_weights": self.text_weights,
            "templates": list(self.text.templates),
            "image_size": self.image_size,
            "threshold": self.threshold,
            "head": asdict(self.head.config),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
        atomic_write_json(directory / CONFIG_NAME, self.record())
        return directory

    @classmethod
    def from_pretrained(cls, source: str | Path, **adapter_kwargs: Any) -> FusionerModel:
        """Load from a saved model folder, a run directory (``RUN/model``) or a Hub repo id."""
        folder = _resolve_model_folder(source)
        record = json.loads((folder / CONFIG_NAME).read_text())
        vision = create_vision(
            record["vision"], record.get("vision_weights"), **adapter_kwargs.get("vision", {})
        )
        text = create_text(
            record["text"],
            record.get("text_weights"),
            templates=record["templates"],
            **adapter_kwargs.get("text", {}),
        )
        head = FusionHead(HeadConfig(**record["head"]))
        state = load_file(str(folder / WEIGHTS_NAME))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FusionerError(
                f"{folder / WEIGHTS_NAME} does not fit the head in {folder / CONFIG_NAME}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return cls(
            head,
            vision,
            text,
            vision_weights=record.get("vision_weights"),
            text_weights=record.get("text_weights"),
            image_size=record["image_size"],
            threshold=record["threshold"],
        )


def _resolve_model_folder(source: str | Path) -> Path:
    path = Path(source)
    for folder in (path, path / "model"):
        if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            return folder
    if path.exists():
        raise FusionerError(f"{path} holds no finished fusioner model ({CONFIG_NAME} + {WEIGHTS_NAME})")
    if str(source).count("/") != 1:
        raise FusionerError(f"model {source!r} is neither a local folder nor a Hub repo id 'namespace/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as e:  # offline, missing repo, auth: all end the same way for the user
        raise FusionerError(f"could not fetch model {source!r} from the Hugging Face Hub: {e}") from None
