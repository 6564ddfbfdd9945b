"""FusionerModel: the trainable :class:`FusionHead` + the frozen adapters, recorded by name.

A saved model is ``config.json`` (the head's hyper-parameters and the names, weights ids,
preprocessing and prompt templates of the two frozen backbones) plus ``model.safetensors`` with the
head's weights alone; :meth:`FusionerModel.from_pretrained` rebuilds the adapters by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fusioner.adapters import TextAdapter, VisionAdapter, create_text, create_vision
from fusioner.adapters.prompts import resolve_templates
from fusioner.calibration import Calibration, read_calibration
from fusioner.decide import Decision
from fusioner.errors import FusionerError
from fusioner.inference import MODES, batch_logits
from fusioner.inputs import as_images, parse_names
from fusioner.io import atomic_write, atomic_write_json, read_json
from fusioner.methods import METHODS, attach_vision, build_head, build_refiner, head_record
from fusioner.model.files import CONFIG_NAME, WEIGHTS_NAME
from fusioner.model.head import FusionHead
from fusioner.model.seeding import SEED_KEY, has_random, recorded_seed, seeded_backbones
from fusioner.run import RunDir
from fusioner.version import __version__


def _check_pixels(images: Tensor | Sequence[Tensor]) -> None:
    """Refuse 8-bit or 0-255 images: scaled wrongly they still give (meaningless) masks."""
    # A 4-d batch iterates image by image, so the message names the image as a list would.
    for i, image in enumerate([images] if isinstance(images, Tensor) and images.ndim != 4 else images):
        if not isinstance(image, Tensor) or not image.is_floating_point():
            kind = image.dtype if isinstance(image, Tensor) else type(image).__name__
            raise FusionerError(f"image {i}: expected a float tensor in [0, 1], got {kind}")
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise FusionerError(
                f"image {i}: values run from {image.min().item():g} to {image.max().item():g}; "
                "expected [0, 1] (divide 8-bit images by 255)"
            )


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
        refiner: Any | None = None,
        backbone_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        # Training-free logit refiner (fusioner/methods, config key ``refine``), run by inference.py.
        self.refiner = refiner
        self.vision = vision
        self.text = text
        self.vision_weights = vision_weights
        self.text_weights = text_weights
        self.image_size = image_size
        self.threshold = threshold
        # The seed random-weight backbones were drawn from (fusioner/model/seeding.py); None otherwise.
        self.backbone_seed = backbone_seed if has_random(vision_weights, text_weights) else None
        # GZSS calibration of the run the model came from (from_pretrained finds it), for seen_bias.
        self.calibration: Calibration | None = None

    @classmethod
    def from_config(cls, config: Any) -> FusionerModel:
        """Build adapters and a freshly initialised head from a :class:`fusioner.config.Config`."""
        with seeded_backbones(config.seed, config.vision_weights, config.text_weights):
            vision = create_vision(config.vision, config.vision_weights)
            templates = resolve_templates(config.templates)
            text = create_text(config.text, config.text_weights, templates=templates)
        if config.image_size % vision.patch_size:
            raise FusionerError(
                f"config key 'image_size': {config.image_size} is not a multiple of {vision.name}'s "
                f"patch size {vision.patch_size}"
            )
        head = build_head(config, vision, text)  # config key ``method`` (fusioner/methods)
        return cls(
            head,
            attach_vision(head, vision),
            text,
            vision_weights=config.vision_weights,
            text_weights=config.text_weights,
            image_size=config.image_size,
            threshold=config.threshold,
            refiner=build_refiner(config),
            backbone_seed=config.seed,
        )

    def logits(
        self, images: Tensor | Sequence[Tensor], names: Sequence[str], *, mode: str = "fixed"
    ) -> Tensor | list[Tensor]:
        """Images in [0, 1] at any size and K names -> mask logits at each image's own size.

        ``images``: ``b 3 h w`` -> ``b k h w``; ``3 h w`` -> ``k h w``; a list of ``3 h w`` of
        different sizes -> a list of ``k h w``. ``mode``: ``fixed`` (resized to ``image_size``) or
        ``sliding`` (``image_size`` windows at the image's own resolution), see fusioner/inference.py.
        """
        device = next(self.head.parameters()).device
        _check_pixels(images)
        text = self.text(list(names)).to(device)
        if isinstance(images, Tensor) and images.ndim == 3:
            return batch_logits(self, [images.to(device)], text, size=self.image_size, mode=mode)[0]
        if isinstance(images, Tensor) and images.ndim != 4:
            raise FusionerError(f"images must be 'b 3 h w' or '3 h w', got shape {tuple(images.shape)}")
        out = batch_logits(self, [im.to(device) for im in images], text, size=self.image_size, mode=mode)
        return torch.stack(out) if isinstance(images, Tensor) else out

    forward = logits

    @torch.no_grad()
    def predict(
        self,
        images: Any,
        names: str | Sequence[str],
        *,
        threshold: float | None = None,
        mode: str = "best-name",
        seen_bias: float = 0.0,
        seen: Iterable[str] | None = None,
        inference: str = "fixed",
    ) -> Tensor | list[Tensor]:
        """Labels ``h w`` per image (0 = background, i = names[i - 1]); with ``mode="one-name"``, bool
        masks ``k h w``, each name asked alone (fusioner/decide.py).

        ``images``: a PIL image, an ``h w 3`` uint8 array, a file path, a float tensor in [0, 1]
        (``3 h w`` or ``b 3 h w``), or a list of them (fusioner/inputs.py); one image gives one
        answer, a batch or a list gives one per image. ``names``: a list or ``"cat, dog"``.
        ``threshold``: default the model's own. ``seen_bias`` (default 0, the plain rule): subtracted
        from the logits of the ``seen`` names, by default those of the run's calibration that
        :meth:`from_pretrained` found beside the model (``model.calibration.seen_bias`` is the value
        chosen on val; ``fusioner predict`` applies it unless told otherwise).
        ``inference``: ``fixed`` or ``sliding`` (fusioner/inference.py); for older callers, ``mode``
        also takes those two and then means ``inference``.
        """
        if mode in MODES:  # the pre-0.2 spelling predict(images, names, mode="sliding")
            mode, inference = "best-name", mode
        decision = Decision(self.threshold if threshold is None else threshold, mode, seen_bias, inference)
        names = parse_names(names)
        pixels, single = as_images(images)
        flags = None
        if decision.seen_bias:
            known = seen if seen is not None else getattr(self.calibration, "seen", None)
            if known is None:
                raise FusionerError("seen_bias needs the names seen in training: give seen=[...]")
            flags = torch.tensor([n in set(known) for n in names], dtype=torch.bool)
        logits = self.logits(pixels, names, mode=decision.inference)
        if single:
            return decision.apply(logits, flags)
        answers = [decision.apply(one, flags) for one in logits]
        return torch.stack(answers) if isinstance(logits, Tensor) else answers

    # -- persistence ---------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """Everything needed to rebuild this model besides the head's weights (config.json)."""
        return {
            "fusioner_version": __version__,
            "vision": self.vision.name,
            "vision_weights": self.vision_weights,
            "vision_preprocessing": self.vision.preprocessing,
            "text": self.text.name,
            "text_weights": self.text_weights,
            "templates": list(self.text.templates),
            "image_size": self.image_size,
            "threshold": self.threshold,
            **({SEED_KEY: self.backbone_seed} if self.backbone_seed is not None else {}),
            **head_record(self.head),  # "method" and "head"
            "refine": self.refiner.record() if self.refiner is not None else {"refine": "none"},
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
        record = _read_record(folder / CONFIG_NAME)
        seed = recorded_seed(record, folder / CONFIG_NAME)
        with seeded_backbones(seed, record.get("vision_weights"), record.get("text_weights")):
            vision = create_vision(
                record["vision"], record.get("vision_weights"), **adapter_kwargs.get("vision", {})
            )
            text = create_text(
                record["text"],
                record.get("text_weights"),
                templates=record["templates"],
                **adapter_kwargs.get("text", {}),
            )
        method = record.get("method", "fusioner")  # models saved before methods existed: fusioner
        head = _build_head(folder / CONFIG_NAME, record["head"], vision, text, method)
        _load_head_weights(head, folder / WEIGHTS_NAME, folder / CONFIG_NAME)
        model = cls(
            head,
            attach_vision(head, vision),
            text,
            vision_weights=record.get("vision_weights"),
            text_weights=record.get("text_weights"),
            image_size=record["image_size"],
            threshold=record["threshold"],
            refiner=build_refiner(record.get("refine", {})),
            backbone_seed=seed,
        )
        model.calibration = read_calibration(source) if Path(source).exists() else None
        return model


# What config.json must hold to rebuild a model (the rest has defaults).
_RECORD_KEYS = ("vision", "text", "templates", "image_size", "threshold", "head")


def _read_record(path: Path) -> dict[str, Any]:
    """A saved model's config.json, or a FusionerError naming the file and what is wrong with it."""
    try:
        record = read_json(path, "model config")
    except FusionerError as e:
        raise FusionerError(f"{e} (cut off or edited? save or download the model again)") from None
    if not isinstance(record, dict):
        raise FusionerError(f"model config {path}: expected a JSON object, got {type(record).__name__}")
    if missing := [k for k in _RECORD_KEYS if k not in record]:
        raise FusionerError(f"model config {path}: key(s) {', '.join(missing)} missing")
    if not isinstance(record["head"], dict):
        raise FusionerError(f"model config {path}: key 'head' must be an object of head settings")
    return record


def _build_head(
    path: Path, settings: dict[str, Any], vision: VisionAdapter, text: TextAdapter, method: str = "fusioner"
) -> nn.Module:
    """The head ``config.json`` describes, refused where its widths do not fit the two backbones."""
    if method not in METHODS:
        raise FusionerError(f"model config {path}: method {method!r} is not one of {', '.join(METHODS)}")
    config_cls, head_cls = METHODS[method].config_cls, METHODS[method].head_cls
    known = {f.name for f in fields(config_cls)}
    if unknown := sorted(set(settings) - known):
        raise FusionerError(f"model config {path}: unknown head key(s) {', '.join(unknown)}")
    for key, adapter, side in (("vision_dim", vision, "vision"), ("text_dim", text, "text")):
        if key not in settings:
            raise FusionerError(f"model config {path}: key 'head.{key}' missing")
        if settings[key] != adapter.embed_dim:
            raise FusionerError(
                f"model config {path}: head.{key} is {settings[key]!r}, but the {side} backbone "
                f"{adapter.name!r} gives features {adapter.embed_dim} wide; the head and the backbone "
                "must agree (was config.json edited?)"
            )
    try:
        return head_cls(config_cls(**settings))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise FusionerError(f"model config {path}: its head settings build no head: {e}") from None


def _load_head_weights(head: FusionHead, weights: Path, config: Path) -> None:
    """Load ``model.safetensors`` into ``head``, naming the file and what is wrong with it."""
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise FusionerError(
            f"model weights {weights} cannot be read ({e}): truncated or not a safetensors file; "
            "save or download the model again"
        ) from None
    own = head.state_dict()
    if mismatched := [k for k in state if k in own and state[k].shape != own[k].shape]:
        k = mismatched[0]
        raise FusionerError(
            f"model weights {weights} do not fit the head in {config}: {k} is "
            f"{tuple(state[k].shape)} there, {tuple(own[k].shape)} in the head config.json describes "
            f"({len(mismatched)} tensor(s) differ)"
        )
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FusionerError(
            f"{weights} does not fit the head in {config}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def _resolve_model_folder(source: str | Path) -> Path:
    path = Path(source)
    for folder in (path, RunDir(path).model):
        if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            return folder
    if path.exists():
        raise FusionerError(f"{path} holds no finished fusioner model ({CONFIG_NAME} + {WEIGHTS_NAME})")
    if str(source).startswith((".", "/", "~")) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        # "runs/quikstart" names a local folder (its parent exists here), not a Hub repo.
        raise FusionerError(f"model folder {path} does not exist")
    if str(source).count("/") != 1:
        raise FusionerError(f"model {source!r} is neither a local folder nor a Hub repo id 'namespace/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as e:  # offline, missing repo, auth: all end the same way for the user
        raise FusionerError(f"could not fetch model {source!r} from the Hugging Face Hub: {e}") from None
