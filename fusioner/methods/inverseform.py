"""InverseForm's boundary distance (config key ``inverseform_weights``), SAZS's third edge term.

InverseForm (Borse et al., CVPR 2021; official code Qualcomm-AI-research/InverseForm,
``models/InverseForm.py`` and ``models/loss/utils.py``, copied into Liuxinyv/SAZS as
``model/InverseForm.py`` and ``utils.py``) measures how far a predicted boundary map is from the
ground-truth one with a separately trained, frozen regressor, ``InverseNet``: an MLP over two
flattened 224 x 224 maps (``fc``: Linear(2 x 224 x 224, 1000), ReLU, Linear(1000, 32), ReLU,
Linear(32, 4)) that regresses the parameters of the transform between them. ``InverseTransform2D``:

- both maps (``b 1 h w``) are resized (bilinear, ``align_corners=False``) to 672 x 1344, three
  by six tiles of 224 x 224 whatever the input's aspect ratio, and the 18 tiles of every image
  are stacked as a batch;
- the regressor reads each (prediction, ground truth) tile pair; the distance is the Euclidean
  norm of its 4 outputs, averaged over every tile of the batch (``((c * c).sum(1) ** 0.5).mean()``:
  the official code compares the outputs with 0, not with an identity transform's parameters, so
  the released regressor's 0 is "no transform"; this does the same).

The released regressor is ``distance_measures_regressor.pth`` (the InverseForm repository's
``checkpoints/``); it is read as safetensors or a weights-only torch checkpoint, keys as the
official ``InverseNet`` names them (a leading ``model.`` / ``module.`` / ``modules.`` is dropped,
as the official ``load_model_from_dict`` does for two of them). Unlike that loader, which keeps the
random initialisation of any key it cannot match, a file that does not fit is refused.

Here the tile side is read from the file (224 for the released one, the regressor's first layer
being ``2 side^2`` wide); the maps are resized to ``3 side x 6 side``. Only tests use other sides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.adapters.weights import load_state_dict
from fusioner.config import register_check
from fusioner.errors import ConfigError, WeightsError

TILE, ROWS, COLS = 224, 3, 6  # InverseTransform2D: 672 x 1344 = 3 x 6 tiles of 224
RELEASED_FILE = "distance_measures_regressor.pth"
_KEY = "config key 'inverseform_weights'"
_PREFIXES = ("model.", "module.", "modules.")


class InverseNet(nn.Module):
    """The official regressor: two ``side x side`` maps -> 4 transform parameters (``fc.0``,
    ``fc.2``, ``fc.4``: the released state dict's names)."""

    def __init__(self, side: int = TILE) -> None:
        super().__init__()
        self.side = side
        self.fc = nn.Sequential(
            nn.Linear(2 * side * side, 1000),
            nn.ReLU(True),
            nn.Linear(1000, 32),
            nn.ReLU(True),
            nn.Linear(32, 4),
        )

    def forward(self, predicted: Tensor, target: Tensor) -> Tensor:
        """Tiles ``n side side`` (or anything of ``n side^2`` values per tile) -> ``n 4``."""
        n = predicted.shape[0]
        return self.fc(torch.cat([predicted.reshape(n, -1), target.reshape(n, -1)], dim=1))


def tiles(maps: Tensor, side: int) -> Tensor:
    """``b 1 h w`` -> ``(3 6 b) side side``: resized to ``3 side x 6 side``, cut into tiles."""
    if maps.ndim != 4 or maps.shape[1] != 1:
        raise ValueError(f"InverseForm reads one-channel maps 'b 1 h w', got {tuple(maps.shape)}")
    maps = F.interpolate(maps.float(), size=(ROWS * side, COLS * side), mode="bilinear", align_corners=False)
    return rearrange(maps, "b 1 (i h) (j w) -> (i j b) h w", i=ROWS, j=COLS)


def inverseform_distance(net: InverseNet, predicted: Tensor, target: Tensor) -> Tensor:
    """InverseTransform2D's distance between two ``b 1 h w`` maps: the norm of the regressed
    parameters, averaged over every tile of the batch (float32, whatever the autocast)."""
    with torch.autocast(predicted.device.type, enabled=False):
        coeffs = net(tiles(predicted, net.side), tiles(target, net.side).to(predicted.device))
    return coeffs.float().pow(2).sum(1).sqrt().mean()


def _official_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key.removeprefix(prefix)
                break
        out[key] = value
    return out


def load_inverseform(path: str | Path) -> InverseNet:
    """The frozen regressor of ``path`` (safetensors or weights-only torch), in eval mode."""
    hint = f"expected InverseForm's {RELEASED_FILE} (Qualcomm-AI-research/InverseForm, checkpoints/)"
    file = Path(str(path)).expanduser()
    if not str(path) or not file.is_file():
        raise WeightsError(f"{_KEY}: {path!r} is not a file; {hint}")
    try:
        state = _official_names(load_state_dict("InverseForm", file))
    except WeightsError as e:
        raise WeightsError(f"{_KEY}: {e}; {hint}") from e
    first = state.get("fc.0.weight")
    side = math.isqrt(first.shape[1] // 2) if first is not None and first.ndim == 2 else 0
    with torch.device("meta"):  # shapes only: the file's tensors are assigned, not copied
        net = InverseNet(max(side, 1))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if side < 1 or found != expected:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shapes = [k for k in expected if k in found and found[k] != expected[k]]
        raise WeightsError(
            f"{_KEY}: {file} is not an InverseNet state dict (missing {missing[:3]}, unexpected "
            f"{extra[:3]}, other shapes {shapes[:3]}); {hint}, keys fc.0/fc.2/fc.4.weight/bias"
        )
    net.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    net.requires_grad_(False)
    return net.eval()


@register_check
def check_inverseform(config: Any) -> None:
    """InverseForm's term is one of SAZS's edge terms: it needs the edge branch."""
    if getattr(config, "inverseform_weights", "") and not config.sazs_edge_weight > 0:
        raise ConfigError(
            f"{_KEY}: InverseForm's distance is a term of SAZS's edge objective; set sazs_edge_weight "
            "> 0 (1 = SAZS's weights) or leave inverseform_weights empty"
        )


__all__ = ["InverseNet", "check_inverseform", "inverseform_distance", "load_inverseform", "tiles"]
