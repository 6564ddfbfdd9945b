"""``fusioner import-released``: a checkpoint of the released Fusioner code -> a model folder.

The released code saves ``{"model": FullModel.state_dict(), ...}`` with ``torch.save``. The file is
read weights-only (safetensors, or ``torch.load(weights_only=True)``), so no code in it ever runs;
the ``fusion.*`` / ``decoder.*`` tensors become a :class:`FusionHead` (model/released.py), the
frozen CLIP towers in the file are ignored and the named adapters stand in for them. The output is
laid out as a finished run (``OUT/config.yaml`` + the ``save_pretrained`` folder ``OUT/model``), so
``fusioner eval / predict / demo / export / push`` take it like any trained run.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from fusioner.adapters import create_text, create_vision
from fusioner.adapters.prompts import resolve_templates
from fusioner.config import load_config, save_config
from fusioner.errors import FusionerError
from fusioner.model.model import CONFIG_NAME, WEIGHTS_NAME, FusionerModel
from fusioner.model.released import PREFIXES, head_from_released


def _holds_head(mapping: Mapping[Any, Any]) -> bool:
    return any(isinstance(k, str) and k.startswith(PREFIXES) for k in mapping)


def _strip_wrapper(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys saved from a DataParallel / DDP wrapper start with ``module.``: drop it."""
    keys = [k for k in state if isinstance(k, str)]
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def find_state_dict(obj: Any, where: str) -> dict[str, Tensor]:
    """The released state dict in ``obj``: itself, or the first mapping under it holding
    ``fusion.*`` keys (the released code's ``{"model": ...}``, any other wrapper)."""
    queue: list[tuple[Any, str]] = [(obj, "")]
    while queue:
        item, path = queue.pop(0)
        if not isinstance(item, Mapping):
            continue
        state = _strip_wrapper(item)
        if _holds_head(state):
            return state
        queue += [(v, f"{path}{k}.") for k, v in item.items() if isinstance(v, Mapping)]
    raise FusionerError(
        f"checkpoint {where}: no released Fusioner weights (fusion.* / decoder.* tensors) in it or in "
        "any mapping inside it"
    )


def read_released_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """``fusion.*`` / ``decoder.*`` (and any other) tensors of a released checkpoint, read weights-only."""
    path = Path(path)
    if not path.is_file():
        raise FusionerError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return find_state_dict(load_file(str(path)), str(path))
        except (SafetensorError, OSError) as e:
            raise FusionerError(f"checkpoint {path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FusionerError(
            f"checkpoint {path} cannot be read weights-only ({first}); fusioner never unpickles code: "
            "save its state dict alone (torch.save(model.state_dict(), ...)) or as safetensors"
        ) from None
    return find_state_dict(obj, str(path))


def import_released(
    checkpoint: str | Path,
    *,
    vision: str,
    text: str,
    out: str | Path,
    heads: int = 8,
    temperature: float = 0.07,
    templates: str = "fusioner",
    image_size: int = 224,
    threshold: float = 0.5,
    vision_weights: str | None = None,
    text_weights: str | None = None,
    config: str | Path | None = None,
) -> Path:
    """Write the run folder ``out`` (``config.yaml``, ``model/``) for a released checkpoint; returns ``out``.

    ``heads`` (8), ``temperature`` (0.07) and ``image_size`` (224) are the released defaults; the
    released prompts (``templates="fusioner"``) are what its text embeddings were averaged over.
    ``config``: the dataset config it was trained under (e.g. configs/pascal5i/clip_clip.yaml), which
    ``eval`` and the model card read; its head and backbone keys are replaced by the checkpoint's.
    Files already in ``out`` under the names written are refused, never replaced.
    """
    out = Path(out)
    targets = (out / "config.yaml", out / "model" / CONFIG_NAME, out / "model" / WEIGHTS_NAME)
    if taken := [path for path in targets if path.exists()]:
        raise FusionerError(
            f"{taken[0]} already exists; import-released writes only new files: choose another --out"
        )
    head = head_from_released(
        read_released_checkpoint(checkpoint), heads=heads, temperature=temperature, where=str(checkpoint)
    )
    vision_adapter = create_vision(vision, vision_weights)
    text_adapter = create_text(text, text_weights, templates=resolve_templates(templates))
    for side, adapter, key, width in (
        ("vision", vision_adapter, "fusion.visual_proj.1.weight", head.config.vision_dim),
        ("text", text_adapter, "fusion.text_proj.1.weight", head.config.text_dim),
    ):
        if adapter.embed_dim != width:
            raise FusionerError(
                f"checkpoint {checkpoint}: {key} takes {width}-wide features, but the {side} backbone "
                f"{adapter.name!r} gives {adapter.embed_dim}; name the backbone it was trained on"
            )
    if image_size % vision_adapter.patch_size:
        raise FusionerError(
            f"image size {image_size} is not a multiple of {vision_adapter.name}'s patch size "
            f"{vision_adapter.patch_size}"
        )
    c = head.config
    run_config = load_config(
        config, vision=vision, vision_weights=vision_weights, text=text, text_weights=text_weights,
        templates=templates, image_size=image_size, threshold=threshold, method="fusioner", dim=c.dim,
        depth=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio, decoder=c.decoder, fusion_layout=c.fusion_layout,
        fusion_attention=c.fusion_attention, normalize_tokens=c.normalize_tokens, score_dim=c.score_dim,
        temperature=c.temperature, learn_temperature=c.learn_temperature, out_dir=str(out),
    )  # fmt: skip
    model = FusionerModel(
        head,
        vision_adapter,
        text_adapter,
        vision_weights=vision_weights,
        text_weights=text_weights,
        image_size=image_size,
        threshold=threshold,
    )
    model.save_pretrained(out / "model")
    save_config(run_config, out / "config.yaml")  # last: a run folder with it holds a whole model
    return out
