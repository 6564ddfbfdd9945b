"""Frozen-feature cache: visual tokens computed once, stored as fp16 safetensors shards.

The backbone is frozen, so its output for an unchanged image never changes; training then runs at
the speed of the head alone. Each shard stores, per image id, the tokens ``gh gw c`` (fp16) and the
mask resized to the input size (uint8), everything a training step needs, so cached training never
opens an image file. Shards are read lazily through safetensors' memory map, so caches larger than
memory work.

This module decides what goes in (the key, which items to encode, where the cache lives);
:mod:`fusioner.engine.cache_store` owns the folder itself (:class:`FeatureCache`: index, shards,
checksums, the fill lock).

What keeps a cache from serving stale features:

* One cache folder holds one *key*: backbone name, weights fingerprint, preprocessing, input size,
  the dataset's name and root folder, and a digest of its name list (``vocabulary``). Changing any
  of them (a renamed or added line in ``classes.txt`` included) lands in another folder.
* Within a folder, each item carries the fingerprint its dataset gave when it was encoded
  (:meth:`SegDataset.item_fingerprint`: one stat per file, no decoding: size and mtime of the image
  and mask for folder and VOC; the image and the annotation file for COCO; the Arrow files for
  Mosaic-4; image, mask and the scene's names for pictograms). An item whose fingerprint changed is
  read and encoded again, through the same ``dataset[i]`` as a fresh one, so every check a reader
  applies (a label the class list does not define, a mask of the wrong size) applies to it too. A
  file rewritten with the same size *and* mtime (``cp -p`` of another file of the same length) is
  not noticed.
* Every shard's SHA-256 is in the index and is checked on first use: a truncated or corrupted
  shard is reported by path and rebuilt. An unreadable ``index.json`` is reported and the cache
  rebuilt from nothing, since the shards it listed can no longer be matched to images.
* Filling holds a lock (``fill.lock``, the holder's pid and host in ``fill.lock.holder``): a second
  process filling the same folder (another rank of a multi-process training, a second run) waits,
  then reads what the first wrote instead of encoding it again. A cache with nothing to write is
  read without taking the lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusioner.adapters import VisionAdapter
from fusioner.data.base import SegDataset
from fusioner.data.transforms import resize
from fusioner.engine.cache_store import FORMAT, INDEX, CachedItem, CorruptShardError, FeatureCache

__all__ = [
    "FORMAT",
    "INDEX",
    "CachedItem",
    "CorruptShardError",
    "FeatureCache",
    "cache_key",
    "dataset_id",
    "fill_cache",
    "prepare_cache",
    "vocabulary_digest",
]

log = logging.getLogger(__name__)


def vocabulary_digest(vocabulary: Sequence[str]) -> str:
    """``"<count>:<sha1>"`` of the name list in label order: a renamed, added or moved name changes it."""
    return f"{len(vocabulary)}:{hashlib.sha1(json.dumps(list(vocabulary)).encode()).hexdigest()[:16]}"


def cache_key(
    vision: VisionAdapter, image_size: int, dataset_id: str, vocabulary: Sequence[str] = ()
) -> dict[str, Any]:
    """The key of one cache folder; ``vocabulary`` is the dataset's name list (label order)."""
    return {
        "vision": vision.name,
        "weights": vision.fingerprint(),
        "preprocessing": vision.preprocessing,
        "image_size": image_size,
        "dataset": dataset_id,
        "vocabulary": vocabulary_digest(vocabulary),
        "format": FORMAT,
    }


def _batches(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def fill_cache(
    cache: FeatureCache,
    vision: VisionAdapter,
    dataset: SegDataset,
    image_size: int,
    *,
    batch_size: int = 16,
    shard_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> int:
    """Encode every dataset item not cached, or changed since it was; returns how many were encoded.

    Runs under the cache's fill lock, so of several processes filling one cache only the first
    encodes; the others find its items current. A killed fill loses at most the shard in progress:
    finished shards are already indexed.
    """
    # Nothing to write needs no lock: a full cache is shared without waiting, even from a read-only folder.
    if not cache.stale(dataset) and not cache.corrupt_shards():
        return 0
    with cache.filling():
        cache.verify()
        # Fingerprinted under the lock and before reading: an edit made after this stat shows up as
        # a changed fingerprint on the next fill, never as old pixels filed under a new fingerprint.
        todo = cache.stale(dataset)
        changed = sum(dataset.item_id(i) in cache for i, _ in todo)
        if changed:
            log.info(
                "%d images of %s changed since they were cached; encoding them again", changed, cache.dir
            )
        pending: dict[str, CachedItem] = {}
        added = 0
        bar = tqdm(total=len(todo), desc=f"caching {vision.name} features", unit="img", disable=not progress)
        for chunk in _batches(todo, batch_size):
            # dataset[i] is the uncached path's read too: a changed item passes the same checks.
            samples = [(resize(dataset[i], image_size), fingerprint) for i, fingerprint in chunk]
            images = torch.stack([s["image"] for s, _ in samples]).to(device)
            out = vision(images)
            tokens = out.tokens.view(len(samples), *out.grid, -1)
            cls = out.cls if out.cls is not None else [None] * len(samples)
            for (s, fingerprint), t, c in zip(samples, tokens, cls, strict=True):
                pending[s["id"]] = CachedItem(t, s["mask"], tuple(s["names"]), fingerprint, c)
            bar.update(len(chunk))
            if len(pending) >= shard_size:
                cache.write_shard(pending)
                added += len(pending)
                pending = {}
        if pending:
            cache.write_shard(pending)
            added += len(pending)
        bar.close()
    return added


def dataset_id(config) -> str:
    """The dataset's place in a cache key: its registry name and resolved root folder (its content is
    in the key's vocabulary digest and the items' fingerprints)."""
    root = str(Path(config.data_path).resolve()) if config.data_path else ""
    return f"{config.dataset}:{root}"


def prepare_cache(config, vision: VisionAdapter, dataset: SegDataset, device: torch.device) -> FeatureCache:
    """Open (and fill what is missing of) the feature cache for ``dataset`` at the config's size.

    The cache lives in ``config.cache_dir``, or beside the run (``<out_dir>/../cache``) so that
    the runs of one sweep share it.
    """
    root = Path(config.cache_dir) if config.cache_dir else Path(config.out_dir).parent / "cache"
    key = cache_key(vision, config.image_size, dataset_id(config), dataset.vocabulary)
    cache = FeatureCache(root, key)
    fill_cache(cache, vision, dataset, config.image_size, device=device, batch_size=config.eval_batch_size)
    return cache
