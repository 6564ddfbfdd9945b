"""Training examples: where their pixels come from, their seeded randomness, batches, epoch order.

A *source* yields ``(x, mask, names)``: decoded images (:class:`ImageSource`, the backbone runs on
every step) or cached tokens (:class:`CachedSource`, it never does). :class:`TrainView` maps a
virtual index to an example with its randomness drawn from ``(seed, index)`` and
:class:`EpochSampler` orders each epoch from ``(seed, epoch)``, so a resumed run sees exactly the
batches an uninterrupted one would have (fusioner/engine/train.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fusioner.config import Config
from fusioner.data.augment import resolve_augmentations
from fusioner.data.base import IGNORE, SegDataset
from fusioner.data.transforms import resize
from fusioner.engine.cache import FeatureCache
from fusioner.methods.zegclip_st import UNSEEN


# -- where a training example's pixels come from -------------------------------------------------
class ImageSource:
    """Decoded images resized to the training size: the backbone runs on every step."""

    cached = False

    def __init__(self, dataset: SegDataset, image_size: int) -> None:
        self.dataset, self.image_size = dataset, image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, tuple[str, ...]]:
        s = resize(self.dataset[index], self.image_size)
        return s["image"], s["mask"], tuple(s["names"])


class CachedSource:
    """Tokens ``gh gw c`` and masks read from the feature cache: the backbone never runs."""

    cached = True

    def __init__(self, cache: FeatureCache, ids: list[str], teacher: FeatureCache | None = None) -> None:
        # teacher: CLIP-ZSS's frozen teacher's own cache (methods/teacher.py), read beside the student's
        self.cache, self.ids, self.teacher = cache, ids, teacher

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, tuple[str, ...]]:
        item = self.cache.read(self.ids[index])
        return item.tokens, item.mask.long(), item.names

    def cls(self, index: int) -> Tensor | None:
        """The item's cached CLS token ``c`` (ZegCLIP's image embedding), None when the backbone has none."""
        return self.cache.read_cls(self.ids[index])

    def teacher_item(self, index: int) -> tuple[Tensor, Tensor | None]:
        """The teacher's cached tokens ``gh gw c`` and CLS ``c`` of the item."""
        item = self.teacher.read(self.ids[index])
        return item.tokens, item.cls


# -- one training example --------------------------------------------------------------------------
class TrainView(Dataset):
    """Virtual index ``v`` -> the example ``v % n`` with its randomness drawn from ``(seed, v)``.

    The mask is mapped to the seen vocabulary: 0 = background (unseen classes included: the
    standard inductive setting, where held-out pixels are background), ``j + 1`` = ``seen[j]``,
    -1 = ignore (int32 ``h w``). With ``unseen`` names (ZegCLIP's transductive setting,
    methods/zegclip_st.py) their pixels are ``UNSEEN`` (-2) instead of background: labels withheld.
    """

    def __init__(
        self,
        source,
        seen: list[str],
        *,
        augment: Sequence[str],
        seed: int,
        similarity: Tensor | None = None,
        unseen: Sequence[str] = (),
    ) -> None:
        self.source, self.seed = source, seed
        self.unseen = frozenset(unseen)
        # v v cosine similarity of the seen names' embeddings: with it, the absent names closest
        # to a present one come first (hard negatives), instead of in random order.
        self.similarity = similarity
        self.augmentations = resolve_augmentations(augment, cached=source.cached)
        self.vocab = {name: j for j, name in enumerate(seen)}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, v: int) -> dict[str, Any]:
        x, mask, names = self.source[v % len(self.source)]
        rng = np.random.default_rng([self.seed, v])
        if self.source.cached:
            # Cached tokens are laid out "gh gw c": put the grid last for the (geometric) augmentations.
            x = x.permute(2, 0, 1)
        for augmentation in self.augmentations:
            x, mask = augmentation.apply(x, mask, rng)
        if self.source.cached:
            x = x.permute(1, 2, 0)
        # Ignore is -1 here, not 255: with more than 254 seen names (the quickstart has ~900),
        # seen[254] would read as ignore and every later name would never count as present.
        # int32, not int64: half the bytes to gather, stack and ship.
        lut = torch.zeros(256, dtype=torch.int32)
        lut[IGNORE] = -1
        for label, name in enumerate(names, start=1):
            if name in self.vocab:
                lut[label] = self.vocab[name] + 1
            elif name in self.unseen:
                lut[label] = UNSEEN
        # index_select, not lut[mask]: the same gather, 7x faster on a CPU (0.11 vs 0.83 ms at 448x448).
        target = lut.index_select(0, mask.clamp(0, 255).reshape(-1)).view(mask.shape)
        # A histogram, not target.unique(): unique sorts every pixel (2.7 ms for 448x448 on one
        # core, 0.1 ms this way), which was most of the cached data path.
        counts = torch.bincount(target.view(-1).clamp(min=0), minlength=len(self.vocab) + 1)
        present = counts[1 : len(self.vocab) + 1].nonzero().view(-1).tolist()
        absent = rng.permutation(np.setdiff1d(np.arange(len(self.vocab)), present))
        if self.similarity is not None and present and len(absent):
            closeness = self.similarity[present][:, absent].max(0).values
            absent = absent[closeness.argsort(descending=True, stable=True).numpy()]
        example = {"x": x, "target": target, "present": present, "absent": absent.tolist()}
        if self.source.cached:  # the backbone does not run: its CLS comes from the cache too
            example["cls"] = self.source.cls(v % len(self.source))
        if getattr(self.source, "teacher", None) is not None:
            example["teacher"], example["teacher_cls"] = self._teacher(v, mask)
        return example

    def _teacher(self, v: int, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """The teacher's tokens under the same flips as the student's: the augmentations are
        replayed with a generator drawn from the same ``(seed, v)`` (a flip draws one number
        whatever the grid), so both see one picture."""
        tokens, cls = self.source.teacher_item(v % len(self.source))
        rng, x = np.random.default_rng([self.seed, v]), tokens.permute(2, 0, 1)
        for augmentation in self.augmentations:
            x, _ = augmentation.apply(x, mask, rng)
        return x.permute(1, 2, 0), cls


def make_collate(num_negatives: int, vocab_size: int):
    def collate(items: list[dict[str, Any]]) -> dict[str, Tensor]:
        k = min(max(len(it["present"]) for it in items) + num_negatives, vocab_size)
        classes = [it["present"] + it["absent"][: k - len(it["present"])] for it in items]
        return {
            "x": torch.stack([it["x"] for it in items]),
            "class_idx": torch.tensor(classes, dtype=torch.long),  # b k
            # Labels only: the b k h w masks are expanded on the device (expand_targets), which
            # costs nothing there and was 8 ms of every 448x448 batch of 8 here.
            "target": torch.stack([it["target"] for it in items]),  # b h w
            # b c: cached CLS tokens; empty when the backbone has none or runs on each step
            "cls": torch.stack([it["cls"] for it in items]) if items[0].get("cls") is not None else None,
            # CLIP-ZSS's cached teacher: tokens b gh gw c and CLS b c (absent without one)
            **{
                key: torch.stack([it[key] for it in items])
                for key in ("teacher", "teacher_cls")
                if items[0].get(key) is not None
            },
        }

    return collate


def make_loader(
    source, seen: list[str], config: Config, similarity: Tensor | None = None, unseen: Sequence[str] = ()
) -> DataLoader:
    """The training DataLoader over ``source``: every epoch in its own seeded order."""
    view = TrainView(
        source, seen, augment=config.augment, seed=config.seed, similarity=similarity, unseen=unseen
    )
    return DataLoader(
        view,
        batch_size=config.batch_size,
        sampler=EpochSampler(len(view), config.epochs, config.seed),
        collate_fn=make_collate(config.num_negatives, len(seen)),
        num_workers=config.num_workers,
        drop_last=True,
    )


class EpochSampler(Sampler[int]):
    """Virtual indices ``e * n + i`` for every epoch ``e``, each epoch in its own seeded order."""

    def __init__(self, n: int, epochs: int, seed: int) -> None:
        self.n, self.epochs, self.seed = n, epochs, seed

    def __len__(self) -> int:
        return self.n * self.epochs

    def __iter__(self) -> Iterator[int]:
        for epoch in range(self.epochs):
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            yield from (order + epoch * self.n).tolist()
