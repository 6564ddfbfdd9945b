"""Frozen-feature cache: visual tokens computed once, stored as fp16 safetensors shards.

The backbone is frozen, so its output for an unchanged image never changes; training then runs at
the speed of the head alone. Each shard stores, per image id, the tokens ``gh gw c`` (fp16) and the
mask resized to the input size (uint8), everything a training step needs, so cached training never
opens an image file. Shards are read lazily through safetensors' memory map, so caches larger than
memory work.

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
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fusioner.adapters import VisionAdapter
from fusioner.data.base import SegDataset
from fusioner.data.transforms import resize
from fusioner.errors import FusionerError
from fusioner.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

INDEX = "index.json"
LOCK = "fill.lock"  # held while a process fills the folder; never a shard, never in the index
HOLDER = "fill.lock.holder"  # pid, host and start time of the lock's holder, for the waiting message
# 2: items carry their dataset fingerprint and the key a vocabulary digest; format-1 folders are left alone.
FORMAT = 2


class CorruptShardError(FusionerError):
    """A shard whose bytes do not match the checksum recorded when it was written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


@dataclass
class CachedItem:
    tokens: Tensor  # gh gw c, fp16
    mask: Tensor  # s s, uint8 (the dataset's labels, 255 = ignore); int16 where labels do not fit
    names: tuple[str, ...]
    fingerprint: str = ""  # the dataset's item_fingerprint when it was encoded


def _mask_dtype(mask: Tensor) -> torch.dtype:
    # uint8 holds labels 0..254 and 255 = ignore; name lists of 255 or more (ADE20K-847, Pascal
    # Context-459) have higher labels and ignore = -1, which uint8 would wrap onto other labels.
    if mask.numel() == 0 or (int(mask.min()) >= 0 and int(mask.max()) <= 255):
        return torch.uint8
    return torch.int16


# The only shard names the cache ever writes. The index names files that get opened and, when their
# checksum fails, deleted: a name with a separator, ``..`` or a drive would reach outside the folder.
_SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")


_NOT_AN_INDEX = "it is not a cache index (key, shards named shard-NNNNN.safetensors, items in them)"


def _valid_index(index: Any) -> bool:
    """Whether parsed JSON has the index's shape: a key, shards with checksums, items in those shards,
    and every shard a bare ``shard-NNNNN.safetensors`` name inside the cache folder."""
    if not isinstance(index, dict) or not isinstance(index.get("key"), dict):
        return False
    shards, items = index.get("shards"), index.get("items")
    if not isinstance(shards, dict) or not isinstance(items, dict):
        return False
    if not all(isinstance(name, str) and _SHARD_NAME.fullmatch(name) for name in shards):
        return False
    if not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in shards.values()):
        return False
    return all(isinstance(v, dict) and v.get("shard") in shards and "names" in v for v in items.values())


class FeatureCache:
    """One cache key's folder: ``index.json`` + ``shard-NNNNN.safetensors`` (+ the fill lock)."""

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        self.key = key
        self.dir = Path(root) / f"{key['vision'].replace(':', '_').replace('/', '_')}-{digest}"
        self._handles: dict[str, Any] = {}
        self._verified: dict[str, str] = {}  # shard -> the checksum it was verified against
        self._index_digest: str | None = None  # SHA-1 of the index.json bytes last read or written
        self._index_damaged = False  # the index.json on disk is unreadable (and not yet replaced)
        self._index = self._load_index(self._read_index_bytes())

    # -- index ------------------------------------------------------------------------------
    def _read_index_bytes(self) -> bytes | None:
        path = self.dir / INDEX
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FusionerError(f"cannot read feature cache index {path}: {e}") from None

    def _load_index(self, raw: bytes | None) -> dict[str, Any]:
        path = self.dir / INDEX
        self._index_digest = hashlib.sha1(raw).hexdigest() if raw is not None else None
        self._index_damaged = False
        fresh = {"key": self.key, "shards": {}, "items": {}}
        if raw is None:
            return fresh
        try:
            index = json.loads(raw.decode("utf-8"))
            problem = "" if _valid_index(index) else _NOT_AN_INDEX
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = str(e)
        if problem:
            # Without the index no shard can be matched to an image or checked against its checksum.
            log.warning(
                "feature cache index %s is unreadable (%s); its shards can no longer be trusted: "
                "removing them and rebuilding the cache",
                path,
                problem,
            )
            self._index_damaged = True
            return fresh
        if index["key"] != self.key:
            log.warning("cache %s was written for another key; rebuilding it", self.dir)
            return fresh
        return index

    def reload(self) -> None:
        """Re-read ``index.json`` if another process rewrote it; forget shards it no longer vouches for."""
        raw = self._read_index_bytes()
        if (hashlib.sha1(raw).hexdigest() if raw is not None else None) == self._index_digest:
            return  # compared by content, not mtime: two rewrites within one clock tick look alike
        self._index = self._load_index(raw)
        shards = self._index["shards"]
        for shard in list(self._handles) + list(self._verified):
            # A shard dropped or rewritten under the same name must be opened and checked afresh.
            if shard not in shards or self._verified.get(shard) != shards[shard]["sha256"]:
                self._handles.pop(shard, None)
                self._verified.pop(shard, None)

    def _save_index(self) -> None:
        raw = (json.dumps(self._index, indent=2) + "\n").encode()
        atomic_write(self.dir / INDEX, lambda tmp: tmp.write_bytes(raw))
        self._index_digest = hashlib.sha1(raw).hexdigest()
        self._index_damaged = False

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index["items"]

    def __len__(self) -> int:
        return len(self._index["items"])

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if i not in self]

    def is_current(self, item_id: str, fingerprint: str) -> bool:
        """Whether ``item_id`` is cached from content whose fingerprint was ``fingerprint``."""
        entry = self._index["items"].get(item_id)
        return entry is not None and entry.get("fingerprint") == fingerprint

    def stale(self, dataset: SegDataset) -> list[tuple[int, str]]:
        """``(index, fingerprint)`` of each item of ``dataset`` not cached, or changed since it was."""
        out = []
        for i in range(len(dataset)):
            fingerprint = dataset.item_fingerprint(i)
            if not self.is_current(dataset.item_id(i), fingerprint):
                out.append((i, fingerprint))
        return out

    def size_bytes(self) -> int:
        return sum((self.dir / s).stat().st_size for s in self._index["shards"])

    # -- the fill lock ----------------------------------------------------------------------
    @contextmanager
    def filling(self) -> Iterator[None]:
        """Hold the folder's fill lock; inside, the index is the latest on disk and no one else writes.

        A process that finds the lock taken says who holds it and waits: the holder is encoding the
        same images, and this one then reads them instead of encoding them again.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.dir / LOCK)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.warning(
                    "feature cache %s is being filled by %s; waiting for it to finish",
                    self.dir,
                    self._holder(),
                )
                lock.acquire()
        except OSError as e:
            raise FusionerError(
                f"cannot lock the feature cache {self.dir} to fill it ({e}); config key 'cache_dir' "
                "must name a writable folder"
            ) from None
        holder = self.dir / HOLDER
        try:
            atomic_write_json(
                holder,
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
            )
            self.reload()
            if self._index_damaged:
                self._save_index()
            self._remove_orphans()
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    def _holder(self) -> str:
        try:
            h = json.loads((self.dir / HOLDER).read_text())
            return f"pid {h['pid']} on host {h['host']} (since {h['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return f"another process (no readable {self.dir / HOLDER})"

    def _remove_orphans(self) -> None:
        """Delete shards the index does not list and half-written temporaries; only the lock holder may.

        They come from a killed fill, an unreadable index or a key change, and no reader can reach them.
        """
        listed = self._index["shards"]
        for path in [*self.dir.glob("shard-*.safetensors"), *self.dir.glob(".shard-*.tmp")]:
            if path.name not in listed:
                log.info("removing %s, which the cache index does not list", path)
                path.unlink(missing_ok=True)

    # -- writing ----------------------------------------------------------------------------
    def write_shard(self, items: dict[str, CachedItem]) -> Path:
        """Write one shard atomically, then record it (with its checksum) in the index.

        Items already cached point to the new shard afterwards; a shard left with no item is deleted.
        """
        name = f"shard-{len(self._index['shards']):05d}.safetensors"
        while (self.dir / name).exists() or name in self._index["shards"]:
            name = f"shard-{int(name[6:11]) + 1:05d}.safetensors"
        tensors: dict[str, Tensor] = {}
        for item_id, item in items.items():
            tensors[f"{item_id}/tokens"] = item.tokens.to(torch.float16).contiguous().cpu()
            tensors[f"{item_id}/mask"] = item.mask.to(_mask_dtype(item.mask)).contiguous().cpu()
        path = atomic_write(self.dir / name, lambda tmp: save_file(tensors, str(tmp)))
        sha = _sha256(path)
        self._index["shards"][name] = {"sha256": sha, "count": len(items)}
        for item_id, item in items.items():
            self._index["items"][item_id] = {
                "shard": name,
                "names": list(item.names),
                "fingerprint": item.fingerprint,
            }
        used = {entry["shard"] for entry in self._index["items"].values()}
        for shard in [s for s in self._index["shards"] if s not in used]:
            self._drop_shard(shard)
        self._save_index()
        self._verified[name] = sha
        return path

    # -- reading ----------------------------------------------------------------------------
    def _handle(self, shard: str) -> Any:
        expected = self._index["shards"][shard]["sha256"]
        if self._verified.get(shard) != expected:
            path = self.dir / shard
            if not path.is_file() or _sha256(path) != expected:
                raise CorruptShardError(f"feature cache shard {path} is missing, truncated or corrupted")
            self._verified[shard] = expected
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard]

    def read(self, item_id: str) -> CachedItem:
        entry = self._index["items"].get(item_id)
        if entry is None:
            raise KeyError(f"{item_id!r} is not in the feature cache {self.dir}")
        handle = self._handle(entry["shard"])
        return CachedItem(
            handle.get_tensor(f"{item_id}/tokens"),
            handle.get_tensor(f"{item_id}/mask"),
            tuple(entry["names"]),
            entry.get("fingerprint", ""),
        )

    def corrupt_shards(self) -> list[str]:
        """The indexed shards whose bytes do not match their checksum (each is hashed once)."""
        bad = []
        for shard in self._index["shards"]:
            try:
                self._handle(shard)
            except CorruptShardError:
                bad.append(shard)
        return bad

    def verify(self) -> list[Path]:
        """Check every shard; drop bad ones from the index (their items become missing) and return them."""
        bad = self.corrupt_shards()
        for shard in bad:
            log.warning(
                "feature cache shard %s is missing, truncated or corrupted; its images will be recomputed",
                self.dir / shard,
            )
            self._drop_shard(shard)
        if bad:
            self._save_index()
        return [self.dir / shard for shard in bad]

    def _drop_shard(self, shard: str) -> None:
        self._handles.pop(shard, None)
        self._verified.pop(shard, None)
        del self._index["shards"][shard]
        self._index["items"] = {k: v for k, v in self._index["items"].items() if v["shard"] != shard}
        (self.dir / shard).unlink(missing_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the memory maps in their own process.
        return {**self.__dict__, "_handles": {}}


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
            for (s, fingerprint), t in zip(samples, tokens, strict=True):
                pending[s["id"]] = CachedItem(t, s["mask"], tuple(s["names"]), fingerprint)
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
