"""Shared fixtures: the real VOC samples from ../shared as a folder dataset, built in tmp."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOC = SHARED / "data" / "voc2012-samples" / "VOC2012"
VOC_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
]  # fmt: skip


def require_voc() -> Path:
    if not VOC.is_dir():
        pytest.skip(f"the shared VOC samples are not at {VOC}")
    return VOC


@pytest.fixture(scope="session")
def voc_folder(tmp_path_factory) -> Path:
    """The 14 real VOC images in the folder-dataset layout; the sheep and cow images are in val."""
    voc = require_voc()
    root = tmp_path_factory.mktemp("voc_folder")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("\n".join(VOC_NAMES) + "\n")
    train, val = [], []
    for jpg in sorted((voc / "JPEGImages").glob("*.jpg")):
        shutil.copy(jpg, root / "images" / jpg.name)
        labels = np.asarray(Image.open(voc / "SegmentationClass" / f"{jpg.stem}.png"))
        Image.fromarray(labels.astype(np.uint8)).save(root / "masks" / f"{jpg.stem}.png")
        present = set(np.unique(labels).tolist())
        (val if present & {10, 17} else train).append(jpg.stem)
    (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(val) + "\n")
    return root


@pytest.fixture
def edge_objective_step():
    """``step(**config)``: one backward step of the SAZS edge objective on a hand-built batch (a
    tiny head, a 16 x 8 box of name 2 in 32 x 32 targets) -> (objective, loss)."""
    from types import SimpleNamespace

    import torch
    from torch.nn import functional as F

    from fusioner.config import load_config
    from fusioner.methods.build import build_head
    from fusioner.methods.objective import build_objective

    def step(**config):
        vision, text = SimpleNamespace(embed_dim=12, has_cls=False, name="v"), SimpleNamespace(embed_dim=8)
        cfg = load_config(None, preset="tiny", sazs_edge_weight=1.0, **config)
        head = build_head(cfg, vision, text)
        objective = build_objective(cfg, head, vision, 8)
        target = torch.zeros(2, 32, 32, dtype=torch.long)
        target[:, 8:24, 8:20] = 2
        g = torch.Generator().manual_seed(0)
        vocab = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
        loss = objective(
            head, torch.randn(2, 16, 12, generator=g), (4, 4), vocab, torch.tensor([[1, 0]] * 2), target
        )
        loss.backward()
        return objective, loss

    return step
