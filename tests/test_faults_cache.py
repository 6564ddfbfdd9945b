"""The feature cache against changed data and concurrent fills (issue 13): edited masks, replaced
images and renamed classes are never served stale, an undefined label is refused as without the
cache, an unreadable index is rebuilt, and two processes filling one cache encode each image once.
The other readers' fingerprints (pictograms, Mosaic-4, COCO) are checked the same way.

The folder cases run on a copy of the real VOC samples (``voc_folder``); every case uses a tiny
deterministic vision adapter, so what is asserted is the cache's behaviour, not a backbone's."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from fusioner.adapters.base import VisionAdapter, VisionOutput
from fusioner.config import load_config
from fusioner.data import build_split
from fusioner.data.folder import FolderDataset
from fusioner.data.transforms import resize
from fusioner.engine.cache import INDEX, CachedItem, FeatureCache, cache_key, fill_cache, prepare_cache
from fusioner.engine.refine_cache import RefineStore
from fusioner.errors import DataError

SIZE = 64


class PatchMeanVision(VisionAdapter):
    """Tokens = a fixed linear map of each 16x16 patch's mean colour: cheap, and any pixel change shows.

    ``record``: a folder where each call appends its batch size to ``encoded-<pid>.txt``, so a test
    can count encodings across processes. ``started`` / ``go`` (threading events): on its first call
    the adapter sets ``started`` and waits for ``go``, holding the fill (and its lock) open for as
    long as a test needs.
    """

    def __init__(self, record: str | None = None, started=None, go=None) -> None:
        super().__init__("patch-mean", embed_dim=4, patch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
        self.proj = torch.nn.Linear(3, 4)
        with torch.no_grad():
            self.proj.weight.copy_(torch.arange(12, dtype=torch.float32).view(4, 3) / 12)
            self.proj.bias.zero_()
        self.record, self.started, self.go = record, started, go
        self.freeze()

    def encode(self, x: Tensor) -> VisionOutput:
        if self.record:
            with open(Path(self.record) / f"encoded-{os.getpid()}.txt", "a") as f:
                f.write(f"{len(x)}\n")
        if self.started is not None and not self.started.is_set():
            self.started.set()
            self.go.wait(timeout=120)
        pooled = torch.nn.functional.avg_pool2d(x, self.patch_size)  # b 3 gh gw
        gh, gw = pooled.shape[-2:]
        return VisionOutput(self.proj(pooled.flatten(2).transpose(1, 2)), (gh, gw))


@pytest.fixture
def folder(voc_folder, tmp_path) -> Path:
    """A private copy of the VOC folder dataset, free to edit."""
    return Path(shutil.copytree(voc_folder, tmp_path / "data"))


def _cache(root: Path, dataset: FolderDataset, vision: VisionAdapter) -> FeatureCache:
    return FeatureCache(root, cache_key(vision, SIZE, "folder:test", dataset.vocabulary))


def _fill(cache: FeatureCache, vision: VisionAdapter, dataset: FolderDataset) -> int:
    return fill_cache(cache, vision, dataset, SIZE, batch_size=4, progress=False)


def test_edited_mask_is_encoded_again(folder, tmp_path):
    vision = PatchMeanVision()
    dataset = FolderDataset(folder, "train")
    assert _fill(_cache(tmp_path / "c", dataset, vision), vision, dataset) == len(dataset)
    item_id = dataset.item_id(0)
    mask_path = folder / "masks" / f"{item_id}.png"
    old = np.asarray(Image.open(mask_path))
    new = np.zeros_like(old)
    new[: old.shape[0] // 2, : old.shape[1] // 2] = 15  # a "person" square where the old objects were
    Image.fromarray(new).save(mask_path)

    dataset = FolderDataset(folder, "train")  # the next run
    cache = _cache(tmp_path / "c", dataset, vision)
    assert _fill(cache, vision, dataset) == 1  # only the edited item
    expected = resize(dataset[0], SIZE)["mask"]
    assert torch.equal(cache.read(item_id).mask.long(), expected)
    assert set(expected.unique().tolist()) == {0, 15}
    assert _fill(_cache(tmp_path / "c", dataset, vision), vision, dataset) == 0  # and then it is current


def test_replaced_image_is_encoded_again(folder, tmp_path):
    vision = PatchMeanVision()
    dataset = FolderDataset(folder, "train")
    cache = _cache(tmp_path / "c", dataset, vision)
    _fill(cache, vision, dataset)
    item_id = dataset.item_id(0)
    old_tokens = cache.read(item_id).tokens.float()
    image_path = dataset.image_path(item_id)
    Image.open(image_path).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(
        image_path
    )  # same size, new pixels

    dataset = FolderDataset(folder, "train")
    cache = _cache(tmp_path / "c", dataset, vision)
    assert _fill(cache, vision, dataset) == 1
    sample = resize(dataset[0], SIZE)
    fresh = vision(sample["image"][None]).tokens.view(SIZE // 16, SIZE // 16, -1)
    cached = cache.read(item_id).tokens.float()
    torch.testing.assert_close(cached, fresh, rtol=1e-3, atol=1e-3)  # fp16 storage
    assert (cached - old_tokens).abs().max() > 0.05  # really the new image, not the old one


def test_renamed_class_gives_a_new_cache_with_the_new_name(folder, tmp_path):
    vision = PatchMeanVision()
    config = load_config(
        None,
        dataset="folder",
        data_path=str(folder),
        image_size=SIZE,
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "run"),
    )
    val = build_split(config).val
    before = prepare_cache(config, vision, val, torch.device("cpu"))
    assert "sheep" in before.read(val.item_id(0)).names

    classes = folder / "classes.txt"
    classes.write_text(classes.read_text().replace("sheep\n", "ewe\n"))
    val = build_split(config).val
    after = prepare_cache(config, vision, val, torch.device("cpu"))
    assert after.dir != before.dir and len(after) == len(val)
    names = after.read(val.item_id(0)).names
    assert names[16] == "ewe" and "sheep" not in names  # label 17: the renamed line


def test_mask_edited_to_an_undefined_label_is_refused_as_without_the_cache(folder, tmp_path):
    vision = PatchMeanVision()
    dataset = FolderDataset(folder, "val")
    _fill(_cache(tmp_path / "c", dataset, vision), vision, dataset)
    item_id = dataset.item_id(1)
    mask_path = folder / "masks" / f"{item_id}.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[:8, :8] = 42  # classes.txt defines labels 0..20
    Image.fromarray(mask).save(mask_path)

    dataset = FolderDataset(folder, "val")
    with pytest.raises(DataError) as uncached:
        dataset[1]  # what use_cache=false reads
    with pytest.raises(DataError) as cached:
        _fill(_cache(tmp_path / "c", dataset, vision), vision, dataset)
    assert str(cached.value) == str(uncached.value)
    assert f"mask {mask_path} contains label 42" in str(cached.value)


@pytest.mark.parametrize(
    "damage",
    [b'{"key": {"vision": "patch-mean"}, "shards": {', b"\xff\xfe\x00garbage", b"[1, 2, 3]"],
    ids=["truncated", "not-utf8", "not-an-index"],
)
def test_corrupt_index_is_rebuilt_with_a_warning(folder, tmp_path, caplog, damage):
    vision = PatchMeanVision()
    dataset = FolderDataset(folder, "train")
    _fill(_cache(tmp_path / "c", dataset, vision), vision, dataset)
    index = _cache(tmp_path / "c", dataset, vision).dir / INDEX
    index.write_bytes(damage)

    with caplog.at_level(logging.WARNING):
        cache = _cache(tmp_path / "c", dataset, vision)
        assert len(cache) == 0
        assert _fill(cache, vision, dataset) == len(dataset)
    assert f"feature cache index {index} is unreadable" in caplog.text
    listed = json.loads(index.read_text())["shards"]
    on_disk = sorted(p.name for p in cache.dir.glob("shard-*.safetensors"))
    assert on_disk == sorted(listed)  # the untrusted shards are gone, not kept beside the new ones
    reopened = _cache(tmp_path / "c", dataset, vision)
    assert torch.equal(reopened.read(dataset.item_id(0)).mask.long(), resize(dataset[0], SIZE)["mask"])


class OnesRefiner:
    """The three members fusioner/engine/refine_cache.py reads of a refiner; its inputs are ones."""

    vision = None

    def precompute_key(self) -> dict:
        return {"refiner": "ones"}

    def precompute(self, tokens: Tensor, grid: tuple[int, int], image) -> Tensor:
        return torch.ones(2, *grid, dtype=torch.bool)

    def precomputed(self, value: Tensor):
        return nullcontext()


@pytest.mark.parametrize("store", ["cache", "refiner"])
@pytest.mark.parametrize("shard", ["UP", "ABSOLUTE", "SUB"])
def test_a_tampered_index_never_reaches_outside_the_cache_folder(folder, tmp_path, caplog, shard, store):
    """A shard name is a bare ``shard-NNNNN.safetensors`` (``part-NNNNN`` in the refiner store
    beside the cache); anything else makes the index untrusted (rebuilt), never a path that is
    opened or deleted as "a corrupted shard" (issue 21, item 2)."""
    vision = PatchMeanVision()
    dataset = FolderDataset(folder, "train")
    cache = _cache(tmp_path / "c", dataset, vision)
    _fill(cache, vision, dataset)
    kind, directory = "shard", cache.dir
    if store == "refiner":
        kind, directory = "part", RefineStore(cache, OnesRefiner()).dir
        assert RefineStore(cache, OnesRefiner()).fill(dataset, SIZE, progress=False) == len(dataset)
    victim = tmp_path / "victim.txt"
    victim.write_text("not the cache's")
    (directory / "sub").mkdir()
    inner = directory / "sub" / f"{kind}-00000.safetensors"
    inner.write_text("not the cache's either")
    names = {"UP": os.path.relpath(victim, directory), "ABSOLUTE": str(victim), "SUB": f"sub/{inner.name}"}
    name = names[shard]
    assert (directory / name).resolve() in {victim.resolve(), inner.resolve()}
    index = json.loads((directory / INDEX).read_text())
    first = next(iter(index[f"{kind}s"]))
    index[f"{kind}s"][name] = {"sha256": "0" * 64, "count": 1}  # a wrong checksum: "corrupted"
    index["items"][dataset.item_id(0)][kind] = name
    (directory / INDEX).write_text(json.dumps(index))
    assert first in index[f"{kind}s"]

    with caplog.at_level(logging.WARNING):
        reopened = _cache(tmp_path / "c", dataset, vision)
        _fill(reopened, vision, dataset)
        reopened.verify()
        if store == "refiner":
            refined = RefineStore(cache, OnesRefiner())
            assert len(refined) == 0
            assert refined.fill(dataset, SIZE, progress=False) == len(dataset)
            assert torch.equal(refined.read(dataset.item_id(0)), torch.ones(2, 4, 4, dtype=torch.bool))
    assert "is unreadable" in caplog.text
    assert victim.read_text() == "not the cache's" and inner.read_text() == "not the cache's either"


def _fill_in_child(folder: str, cache_root: str, record: str, log_file: str) -> None:
    """The second process of the two-process test: fill the cache, write what fill_cache returned."""
    logging.basicConfig(filename=log_file, level=logging.WARNING, format="%(message)s")
    vision = PatchMeanVision(record)
    dataset = FolderDataset(folder, "train")
    added = _fill(_cache(Path(cache_root), dataset, vision), vision, dataset)
    Path(log_file).with_suffix(".added").write_text(str(added))


def test_two_processes_filling_one_cache_encode_each_image_once(folder, tmp_path):
    # This process fills first (in a thread, held open mid-encoding by the adapter); a spawned
    # process asks for the same cache meanwhile. One spawn, not two: each costs a full import.
    record = tmp_path / "record"
    record.mkdir()
    started, go = threading.Event(), threading.Event()
    vision = PatchMeanVision(str(record), started, go)
    dataset = FolderDataset(folder, "train")
    added: list[int] = []
    first = threading.Thread(
        target=lambda: added.append(_fill(_cache(tmp_path / "c", dataset, vision), vision, dataset))
    )
    first.start()
    second_log = tmp_path / "second.log"
    try:
        assert started.wait(timeout=60), "the first fill never started encoding"
        # This process now holds the fill lock, mid-encoding; the second must wait for it.
        ctx = multiprocessing.get_context("spawn")
        second = ctx.Process(
            target=_fill_in_child, args=(str(folder), str(tmp_path / "c"), str(record), str(second_log))
        )
        second.start()
        deadline = time.monotonic() + 120
        while "waiting for it to finish" not in (second_log.read_text() if second_log.exists() else ""):
            assert second.exitcode is None, "the second process ended without waiting for the lock"
            assert time.monotonic() < deadline, "the second process never waited for the lock"
            time.sleep(0.1)
    finally:
        go.set()
        first.join(timeout=60)
    second.join(timeout=120)
    assert second.exitcode == 0
    assert f"being filled by pid {os.getpid()} on host" in second_log.read_text()

    assert added == [len(dataset)]
    assert (tmp_path / "second.added").read_text() == "0"  # it read what the first wrote
    counts = {p.name: sum(map(int, p.read_text().split())) for p in record.iterdir()}
    assert counts == {f"encoded-{os.getpid()}.txt": len(dataset)}  # every image encoded once, here
    cache_dir = next((tmp_path / "c").iterdir())
    assert not (cache_dir / "fill.lock.holder").exists()
    assert json.loads((cache_dir / INDEX).read_text())["items"].keys() == set(dataset.ids)


def _write_pictograms(root: Path) -> None:
    """A two-scene pictogram folder in the layout fusioner.data.pictograms reads, built by hand."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    scenes = []
    for i, names in enumerate([["cat", "dog"], ["dog", "sun"]]):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:16, :16], mask[16:, 16:] = 1, 2
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
        scenes.append({"id": f"s{i}", "split": "train", "names": names, "glyphs": [], "boxes": []})
    (root / "scenes.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scenes))
    (root / "names.json").write_text(json.dumps({"seen": ["cat", "dog", "sun"], "unseen": [], "params": {}}))


def test_pictogram_scene_changed_in_its_mask_or_its_names_is_encoded_again(tmp_path):
    from fusioner.data.pictograms import PictogramScenes

    vision = PatchMeanVision()
    root = tmp_path / "pictograms"
    _write_pictograms(root)
    scenes = PictogramScenes(root, "train")
    cache = FeatureCache(tmp_path / "c", cache_key(vision, SIZE, "pictograms:test", scenes.vocabulary))
    assert fill_cache(cache, vision, scenes, SIZE, progress=False) == 2

    Image.fromarray(np.full((32, 32), 2, dtype=np.uint8)).save(root / "masks" / "s0.png")
    lines = (root / "scenes.jsonl").read_text().replace('["dog", "sun"]', '["sun", "dog"]')
    (root / "scenes.jsonl").write_text(lines)  # scene s1: the same pixels, its labels now name others
    scenes = PictogramScenes(root, "train")
    assert fill_cache(cache, vision, scenes, SIZE, progress=False) == 2
    assert torch.equal(cache.read("s0").mask, torch.full((SIZE, SIZE), 2, dtype=torch.uint8))
    assert cache.read("s1").names == ("sun", "dog")


def _write_mosaic4(path: Path, seed: int) -> None:
    """A two-row Mosaic-4 folder (the reader's schema), with random pixels drawn from ``seed``."""
    import datasets

    from fusioner.data.mosaic import FEATURES

    rng = np.random.default_rng(seed)
    rows = {
        "id": ["m0", "m1"],
        "image": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)],
        "label": [Image.fromarray(np.zeros((32, 32), dtype=np.uint8)) for _ in range(2)],
        "names": [["cat", "dog", "sun", "car"]] * 2,
        "sources": [["a/1", "b/1", "c/1", "d/1"]] * 2,
        "query": [0, 0],
    }
    datasets.Dataset.from_dict(rows, features=FEATURES).save_to_disk(str(path))


def test_regenerated_mosaic4_folder_is_encoded_again(tmp_path):
    from fusioner.data.mosaic import Mosaic4

    vision = PatchMeanVision()
    path = tmp_path / "mosaic4"
    _write_mosaic4(path, seed=0)
    mosaic = Mosaic4(path)
    cache = FeatureCache(tmp_path / "c", cache_key(vision, SIZE, "mosaic4:test", mosaic.vocabulary))
    assert fill_cache(cache, vision, mosaic, SIZE, progress=False) == 2
    assert fill_cache(cache, vision, Mosaic4(path), SIZE, progress=False) == 0  # reopened: still current

    shutil.rmtree(path)
    _write_mosaic4(path, seed=1)  # same ids and names, other pixels
    mosaic = Mosaic4(path)
    assert fill_cache(cache, vision, mosaic, SIZE, progress=False) == 2
    fresh = vision(resize(mosaic[0], SIZE)["image"][None]).tokens.view(SIZE // 16, SIZE // 16, -1)
    torch.testing.assert_close(cache.read("m0").tokens.float(), fresh, rtol=1e-3, atol=1e-3)


def test_coco_image_whose_annotation_changed_is_rendered_and_encoded_again(tmp_path):
    pytest.importorskip("pycocotools")
    from test_data import CAR, DOG, box, make_coco

    from fusioner.data.coco20i import COCOInstances

    vision = PatchMeanVision()
    first, second = "COCO_val2014_000000000001", "COCO_val2014_000000000002"
    root = make_coco(
        tmp_path,
        "val",
        {first: [(CAR, box(12, 16, 0, 6, 0, 8), 0)], second: [(DOG, box(12, 16, 0, 6, 0, 8), 0)]},
    )
    coco = COCOInstances(root, "val", mask_dir=tmp_path / "masks")
    cache = FeatureCache(tmp_path / "c", cache_key(vision, SIZE, "coco20i:test", coco.vocabulary))
    assert fill_cache(cache, vision, coco, SIZE, progress=False) == 2
    assert set(cache.read(first).mask.unique().tolist()) == {0, 3}  # car

    annotations = root / "annotations" / "instances_val2014.json"
    data = json.loads(annotations.read_text())
    data["annotations"][0]["category_id"] = DOG  # the first image's car was a dog
    annotations.write_text(json.dumps(data))
    # One second later, as a real edit would be: some filesystems stamp files written within one
    # clock tick (a few ms) with the same mtime, and the masks were rendered only ms ago.
    stamp = annotations.stat().st_mtime_ns + 1_000_000_000
    os.utime(annotations, ns=(stamp, stamp))

    coco = COCOInstances(root, "val", mask_dir=tmp_path / "masks")
    assert fill_cache(cache, vision, coco, SIZE, progress=False) == 2  # one annotation file for both
    assert set(cache.read(first).mask.unique().tolist()) == {0, 17}  # dog, rendered afresh


def test_labels_beyond_uint8_are_stored_exactly(tmp_path):
    # ADE20K-847-sized name lists: labels above 255 and ignore = -1 must not wrap onto other labels.
    cache = FeatureCache(tmp_path / "c", cache_key(PatchMeanVision(), SIZE, "ov:test", ["x"] * 847))
    wide = torch.tensor([[0, 1, 254], [255, 300, 847], [-1, -1, 5]])
    narrow = torch.tensor([[0, 3], [255, 20]])
    cache.write_shard(
        {
            "wide": CachedItem(torch.zeros(2, 2, 4), wide, ()),
            "narrow": CachedItem(torch.zeros(2, 2, 4), narrow, ()),
        }
    )
    reopened = FeatureCache(tmp_path / "c", cache.key)
    assert torch.equal(reopened.read("wide").mask.long(), wide)
    assert reopened.read("narrow").mask.dtype == torch.uint8  # the usual case stays one byte a pixel
    assert torch.equal(reopened.read("narrow").mask.long(), narrow)


def test_full_cache_is_read_without_the_lock_and_an_unlockable_one_is_named(folder, tmp_path, monkeypatch):
    from fusioner.engine import cache_store as cache_module  # FeatureCache takes the fill lock there
    from fusioner.errors import FusionerError

    vision = PatchMeanVision()
    dataset = FolderDataset(folder, "train")
    _fill(_cache(tmp_path / "c", dataset, vision), vision, dataset)

    def unlockable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_module, "FileLock", unlockable)  # as on a read-only shared folder
    assert _fill(_cache(tmp_path / "c", dataset, vision), vision, dataset) == 0
    other = FolderDataset(folder, "val")
    cache = _cache(tmp_path / "c", other, vision)
    with pytest.raises(FusionerError, match=f"cannot lock the feature cache {cache.dir} to fill it"):
        _fill(cache, vision, other)
