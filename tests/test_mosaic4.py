"""mosaic4: FSS-1000 reading, Mosaic-4 generation, its files, the Hub upload, the CLI and the reader.

The main tree is built from the real VOC samples beside the repo (one class folder per VOC class,
the class's binary mask as a 0/255 PNG); without them a synthetic tree stands in, so these tests
never skip as a whole.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import datasets
import httpx2 as httpx  # the HTTP client huggingface_hub uses
import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

import mosaic4.card
from fusioner.config import load_config
from fusioner.data.mosaic import FEATURES, Mosaic4, build_mosaic4, load_mosaic4
from fusioner.errors import ConfigError, DataError, FusionerError
from mosaic4.card import build_card, publish
from mosaic4.cli import TILE_COLOURS, main
from mosaic4.fss import FSSClass, FSSImage, class_name, load_mask, read_class_list, scan_fss
from mosaic4.generate import MosaicOptions, check_classes, plan_sample, write_mosaic4

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOC = SHARED / "voc2012-samples" / "VOC2012"
FSS_SPLITS = SHARED / "hsnet-splits" / "fss"
# VOC label -> FSS-style folder name (underscores, as FSS-1000 writes multi-word classes).
VOC_FOLDERS = {
    1: "aeroplane", 2: "bicycle", 3: "bird", 5: "bottle", 6: "bus", 7: "car", 10: "cow", 13: "horse",
    14: "motor_bike", 15: "person", 17: "sheep",
}  # fmt: skip
TILE = 32
OPTIONS = MosaicOptions(num=12, seed=3, tile_size=TILE)


# ---------------------------------------------------------------------------------------------
# Trees.


def voc_tree(root: Path) -> Path:
    """An FSS-layout tree from the VOC samples: a folder per class, image reused per class it shows."""
    for mask_path in sorted((VOC / "SegmentationClass").glob("*.png")):
        labels = np.asarray(Image.open(mask_path))
        for label in np.unique(labels):
            if int(label) not in VOC_FOLDERS:
                continue
            folder = root / VOC_FOLDERS[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            k = len(list(folder.glob("*.jpg"))) + 1
            shutil.copy(VOC / "JPEGImages" / f"{mask_path.stem}.jpg", folder / f"{k}.jpg")
            Image.fromarray(((labels == label) * 255).astype(np.uint8)).save(folder / f"{k}.png")
    return root


def synthetic_tree(root: Path, folders=("ab_wheel", "bus", "cow", "dog", "egg", "fox"), per_class=2) -> Path:
    """Noise images with a random rectangle as mask (0/255), sizes differing between images."""
    rng = np.random.default_rng(0)
    for c, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for k in range(1, per_class + 1):
            h, w = 30 + 4 * c, 40 + 2 * k
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / folder / f"{k}.jpg")
            mask = np.zeros((h, w), dtype=np.uint8)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[y : y + h // 2, x : x + w // 2] = 255
            Image.fromarray(mask).save(root / folder / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def fss_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fss") / "FSS-1000"
    return voc_tree(root) if VOC.is_dir() else synthetic_tree(root)


@pytest.fixture(scope="module")
def written(fss_tree, tmp_path_factory) -> Path:
    classes = scan_fss(fss_tree)
    out = tmp_path_factory.mktemp("out") / "mosaic4"
    return write_mosaic4(classes, OPTIONS, out, card=str(build_card(OPTIONS, classes)), progress=False)


def write(tree: Path, out: Path, options: MosaicOptions = OPTIONS, **kwargs) -> Path:
    classes = scan_fss(tree)
    card = str(build_card(options, classes))
    return write_mosaic4(classes, options, out, card=card, progress=False, **kwargs)


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fake_classes(n: int) -> list[FSSClass]:
    """Classes that exist only as names: enough for planning, which reads no file."""
    return [
        FSSClass(
            Path(f"/fss/c{i}"),
            tuple(FSSImage(Path(f"/fss/c{i}/{k}.jpg"), Path(f"/fss/c{i}/{k}.png")) for k in range(1, 4)),
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# What a mosaic holds.


def test_each_tile_holds_its_source_and_only_its_own_label(written, fss_tree):
    data = load_mosaic4(written)
    assert len(data) == OPTIONS.num
    for row in data:
        image, label = np.asarray(row["image"]), np.asarray(row["label"])
        assert image.shape == (2 * TILE, 2 * TILE, 3) and label.shape == (2 * TILE, 2 * TILE)
        assert len(set(row["names"])) == 4 and 0 <= row["query"] < 4
        for j, source in enumerate(row["sources"]):
            folder, stem = source.split("/")
            assert row["names"][j] == class_name(folder)
            rows, cols = (
                slice((j // 2) * TILE, (j // 2 + 1) * TILE),
                slice((j % 2) * TILE, (j % 2 + 1) * TILE),
            )
            # Class j only inside tile j, exactly where its resized source mask is on.
            src_mask = Image.open(fss_tree / folder / f"{stem}.png").resize(
                (TILE, TILE), Image.Resampling.NEAREST
            )
            assert np.array_equal(label[rows, cols], (np.asarray(src_mask) > 127) * (j + 1))
            src = Image.open(fss_tree / folder / f"{stem}.jpg").convert("RGB")
            assert np.array_equal(
                image[rows, cols], np.asarray(src.resize((TILE, TILE), Image.Resampling.BILINEAR))
            )
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4}


def test_equal_seeds_give_byte_identical_datasets(written, fss_tree, tmp_path):
    options = MosaicOptions(num=6, seed=3, tile_size=TILE)
    a, b = write(fss_tree, tmp_path / "a", options), write(fss_tree, tmp_path / "b", options)
    files = tree_files(a)
    assert {"README.md", "state.json", "dataset_info.json", "data/test-00000-of-00001.parquet"} <= set(files)
    assert files == tree_files(b)
    # Sample i depends on (seed, i) only: the 6-sample set is the start of the 12-sample one.
    assert load_mosaic4(a)["id"] == load_mosaic4(written)["id"][:6]
    other = write(fss_tree, tmp_path / "c", MosaicOptions(num=6, seed=4, tile_size=TILE))
    assert load_mosaic4(other)["sources"] != load_mosaic4(a)["sources"]


def test_worker_processes_write_the_same_data(fss_tree, tmp_path):
    options = MosaicOptions(num=4, seed=0, tile_size=TILE)
    one, two = (
        tree_files(write(fss_tree, tmp_path / "1", options)),
        tree_files(write(fss_tree, tmp_path / "2", options, num_proc=2)),
    )
    # dataset_info.json records how the work was split between processes; the data does not change.
    del one["dataset_info.json"], two["dataset_info.json"]
    assert one == two


def test_query_placement_is_uniform_or_fixed():
    classes = fake_classes(9)
    plans = [plan_sample(classes, MosaicOptions(seed=1), i) for i in range(800)]
    counts = Counter(p.query for p in plans)
    assert set(counts) == {0, 1, 2, 3} and all(150 <= n <= 250 for n in counts.values()), counts
    assert all(len(set(p.names)) == 4 for p in plans)
    assert len({p.names for p in plans}) > 700  # the draws vary from sample to sample
    fixed = [plan_sample(classes, MosaicOptions(seed=1, query_tile=2), i) for i in range(100)]
    assert {p.query for p in fixed} == {2}
    # Fixing the query's tile keeps the drawn classes and images: only their tiles move.
    assert all(set(f.tiles) == set(p.tiles) for f, p in zip(fixed, plans, strict=False))
    with pytest.raises(ConfigError, match="query_tile"):
        MosaicOptions(query_tile=4)
    with pytest.raises(ConfigError, match="tile_size"):
        MosaicOptions(tile_size=0)


# ---------------------------------------------------------------------------------------------
# Files: save_to_disk, parquet, the card, the reader, the Hub.


def test_save_to_disk_and_parquet_round_trip(written, tmp_path):
    saved = datasets.load_from_disk(str(written))
    parquet = datasets.Dataset.from_parquet(
        str(written / "data" / "test-00000-of-00001.parquet"), cache_dir=str(tmp_path / "cache")
    )
    # What publish uploads (README.md + data/) as a repo: the card's `configs` lead load_dataset to data/.
    repo = tmp_path / "repo"
    shutil.copytree(written / "data", repo / "data")
    shutil.copy(written / "README.md", repo)
    hub_view = datasets.load_dataset(str(repo), split="test", cache_dir=str(tmp_path / "cache2"))
    for other in (parquet, hub_view):
        assert other.features == saved.features == FEATURES
        assert len(other) == len(saved)
        for a, b in zip(saved, other, strict=True):
            assert (a["id"], a["names"], a["sources"], a["query"]) == (
                b["id"],
                b["names"],
                b["sources"],
                b["query"],
            )
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
            assert np.array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
    raw = saved.cast_column("label", datasets.Image(decode=False))[0]["label"]["bytes"]
    assert raw.startswith(b"\x89PNG")  # the label map is stored losslessly


def test_card_records_how_the_set_was_made(written, fss_tree):
    card = DatasetCard.load(written / "README.md")
    record = card.data.to_dict()["mosaic4"]
    assert (record["seed"], record["num"], record["tile_size"]) == (3, 12, TILE)
    assert record["query_tile"] == "uniform" and record["num_classes"] == len(scan_fss(fss_tree))
    assert card.data.configs[0]["data_files"][0] == {"split": "test", "path": "data/test-*"}
    assert "FSS-1000" in card.text and "--seed 3" in card.text
    assert str(fss_tree) not in card.content  # no local paths in a published card


def test_mosaic4_reader_follows_the_sample_contract(written, fss_tree):
    dataset = Mosaic4(written)
    assert len(dataset) == OPTIONS.num
    assert dataset.vocabulary == sorted({n for names in load_mosaic4(written)["names"] for n in names})
    assert set(dataset.vocabulary) <= {class_name(f.name) for f in fss_tree.iterdir()}
    sample = dataset[5]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 2 * TILE, 2 * TILE)
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (2 * TILE, 2 * TILE)
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2, 3, 4}
    assert len(sample["names"]) == 4 and sample["id"] == load_mosaic4(written)[5]["id"]
    indices = range(len(dataset))
    assert [dataset.item_id(i) for i in indices] == [dataset[i]["id"] for i in indices]
    assert len(set(dataset.ids)) == len(dataset)


def test_mosaic4_is_an_evaluation_split(written):
    split = build_mosaic4(load_config(dataset="mosaic4", data_path=str(written)))
    assert len(split.val) == OPTIONS.num and split.seen == [] and split.unseen == split.val.vocabulary
    with pytest.raises(ConfigError, match="evaluation set"):
        len(split.train)
    with pytest.raises(ConfigError, match="data_path"):
        build_mosaic4(load_config(dataset="mosaic4"))


def test_reader_refuses_what_is_not_mosaic4(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nothing")):
        Mosaic4(tmp_path / "nothing")
    datasets.Dataset.from_dict({"id": ["a"]}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(DataError, match="lacks the columns image, label"):
        Mosaic4(tmp_path / "other")


class FakeHub:
    """Records what HfApi would be asked to do; ``remote`` is what the repo already holds."""

    def __init__(self, remote=(".gitattributes",), fail: Exception | None = None):
        self.remote, self.fail, self.calls = list(remote), fail, []

    def create_repo(self, repo_id, **kwargs):
        if self.fail:
            raise self.fail
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/datasets/{repo_id}"

    def list_repo_files(self, repo_id, **kwargs):
        self.calls.append(("list_repo_files", repo_id, kwargs))
        return self.remote

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, kwargs))
        self.added = {
            op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
            for op in operations
            if hasattr(op, "path_or_fileobj")
        }
        self.deleted = [op.path_in_repo for op in operations if not hasattr(op, "path_or_fileobj")]
        return "commit-info"


def test_publish_uploads_card_and_parquet_in_one_commit(written):
    hub = FakeHub(remote=[".gitattributes", "README.md", "data/test-00000-of-00002.parquet"])
    assert publish(written, "someone/mosaic4", client=hub) == "commit-info"
    assert [c[0] for c in hub.calls] == ["create_repo", "list_repo_files", "create_commit"]
    assert hub.calls[0][2]["repo_type"] == "dataset" and hub.calls[0][2]["exist_ok"] is True
    assert hub.calls[2][2]["repo_type"] == "dataset"
    assert hub.added == {
        "README.md": (written / "README.md").read_bytes(),
        "data/test-00000-of-00001.parquet": (written / "data" / "test-00000-of-00001.parquet").read_bytes(),
    }
    assert hub.deleted == ["data/test-00000-of-00002.parquet"]  # a stale shard of an older upload


def test_publish_errors_are_one_line(written, tmp_path):
    with pytest.raises(DataError, match="README.md or data/test"):
        publish(tmp_path, "someone/mosaic4", client=FakeHub())
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    refused = HfHubHTTPError(
        "401 Client Error: Unauthorized\nmore detail", response=httpx.Response(401, request=request)
    )
    with pytest.raises(FusionerError, match=r"someone/mosaic4.*401 Client Error: Unauthorized$"):
        publish(written, "someone/mosaic4", client=FakeHub(fail=refused))


# ---------------------------------------------------------------------------------------------
# FSS-1000 reading: accepted variants and refused input.


def test_mask_variants_give_the_same_masks_and_mosaics(tmp_path):
    base = synthetic_tree(tmp_path / "base", per_class=1)
    variant = tmp_path / "variant"
    shutil.copytree(base, variant)
    masks = sorted(variant.rglob("*.png"))
    for i, path in enumerate(masks):
        on = np.asarray(Image.open(path)) == 255
        if i % 4 == 0:  # 0/1 grey
            Image.fromarray(on.astype(np.uint8)).save(path)
        elif i % 4 == 1:  # grey written as RGB
            Image.fromarray(np.repeat(on[..., None] * 255, 3, axis=2).astype(np.uint8)).save(path)
        elif i % 4 == 2:  # 1-bit
            Image.fromarray(on).save(path)
        else:  # palette with grey entries
            im = Image.fromarray(on.astype(np.uint8)).convert("P")
            im.putpalette([0, 0, 0, 255, 255, 255])
            im.save(path)
        assert np.array_equal(load_mask(path), on), path
    options = MosaicOptions(num=4, seed=0, tile_size=16)
    a, b = (
        load_mosaic4(write(base, tmp_path / "a", options)),
        load_mosaic4(write(variant, tmp_path / "b", options)),
    )
    assert [np.asarray(x).tobytes() for x in a["label"]] == [np.asarray(x).tobytes() for x in b["label"]]


@pytest.mark.parametrize(
    ("breakage", "named", "message"),
    [
        ("empty_folder", "ab_wheel", "0 image/mask pairs; at least 1 needed"),
        ("image_without_mask", "bus/3.jpg", "has no mask 3.png"),
        ("mask_of_another_size", "cow/1.png", "is 7x5 but its image 1.jpg is"),
        ("missing_listed_class", "zebra", "have no folder"),
    ],
)
def test_broken_trees_are_refused_with_the_path_named(tmp_path, breakage, named, message):
    tree = synthetic_tree(tmp_path / "fss")
    classes = None
    if breakage == "empty_folder":
        for f in (tree / "ab_wheel").iterdir():
            f.unlink()
    elif breakage == "image_without_mask":
        shutil.copy(tree / "bus" / "1.jpg", tree / "bus" / "3.jpg")
    elif breakage == "mask_of_another_size":
        Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(tree / "cow" / "1.png")
    else:
        classes = ["bus", "zebra"]
    with pytest.raises(DataError, match=message) as error:
        scan_fss(tree, classes)
    assert str(tree / named) in str(error.value)


def test_too_few_images_or_classes_are_refused(tmp_path):
    tree = synthetic_tree(tmp_path / "fss", per_class=2)
    with pytest.raises(DataError, match=f"{tree / 'ab_wheel'} has 2 image/mask pairs; at least 3 needed"):
        scan_fss(tree, min_images=3)
    with pytest.raises(DataError, match=f"at least 4 classes.*got 3: {tree / 'bus'}"):
        check_classes(scan_fss(tree, ["bus", "cow", "dog"]))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0, 128, 255], r"values \{0, 128, 255\}"),
        ([0, 1, 255], r"values \{0, 1, 255\}"),
        ("colour", "has colours"),
    ],
)
def test_masks_with_other_values_are_refused_and_nothing_is_written(tmp_path, values, message):
    tree = synthetic_tree(tmp_path / "fss", folders=("a", "b", "c", "d"), per_class=1)
    bad = tree / "c" / "1.png"
    h, w = np.asarray(Image.open(bad)).shape
    if values == "colour":
        array = np.zeros((h, w, 3), dtype=np.uint8)
        array[..., 0] = 255
    else:
        array = np.resize(np.array(values, dtype=np.uint8), (h, w))
    Image.fromarray(array).save(bad)
    with pytest.raises(DataError, match=message) as error:
        load_mask(bad)
    assert str(bad) in str(error.value)
    # With four classes of one image each, every mosaic uses the bad mask: generation stops, and
    # the output directory is never created (nor any staging folder left beside it).
    with pytest.raises(DataError, match=str(bad)):
        write(tree, tmp_path / "out" / "mosaic4")
    assert list((tmp_path / "out").iterdir()) == []


def test_class_lists(tmp_path):
    assert class_name("ab_wheel") == "ab wheel" and class_name("hotel_slipper") == "hotel slipper"
    listed = tmp_path / "test.txt"
    listed.write_text("bus\n\n# a comment\ncow  \n")
    assert read_class_list(listed) == ["bus", "cow"]
    listed.write_text("bus\ncow\nbus\n")
    with pytest.raises(DataError, match=f"class list {listed} names these classes more than once: bus"):
        read_class_list(listed)
    with pytest.raises(DataError, match="does not exist"):
        read_class_list(tmp_path / "absent.txt")


@pytest.mark.skipif(not FSS_SPLITS.is_dir(), reason=f"HSNet FSS-1000 split lists not found at {FSS_SPLITS}")
def test_published_fss_split_lists_are_read():
    splits = {name: read_class_list(FSS_SPLITS / f"{name}.txt") for name in ("trn", "val", "test")}
    assert {name: len(v) for name, v in splits.items()} == {"trn": 520, "val": 240, "test": 240}
    assert len(set().union(*splits.values())) == 1000  # disjoint


# ---------------------------------------------------------------------------------------------
# Command line.


def test_cli_generate_push_and_show(fss_tree, tmp_path, monkeypatch, capsys):
    folders = sorted(f.name for f in fss_tree.iterdir())[:5]
    (tmp_path / "split.txt").write_text("\n".join(folders) + "\n")
    hub = FakeHub()
    monkeypatch.setattr(mosaic4.card, "HfApi", lambda: hub)
    out = tmp_path / "mosaic4"
    argv = ["generate", "--fss-root", str(fss_tree), "--out", str(out), "--num", "5", "--seed", "1"]
    argv += ["--tile-size", str(TILE), "--classes-file", str(tmp_path / "split.txt")]
    argv += ["--image-format", "jpeg", "--push-to-hub", "someone/mosaic4"]
    assert main(argv) == 0
    data = load_mosaic4(out)
    assert len(data) == 5 and {n for names in data["names"] for n in names} <= {
        class_name(f) for f in folders
    }
    raw = data.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert raw.startswith(b"\xff\xd8")  # JPEG as asked
    assert set(hub.added) == {"README.md", "data/test-00000-of-00001.parquet"}
    assert "--classes-file split.txt" in (out / "README.md").read_text()

    png = tmp_path / "show.png"
    assert main(["show", str(out), "--index", "4", "--out", str(png)]) == 0
    with Image.open(png) as im:
        im.verify()
    shown = np.asarray(Image.open(png).convert("RGB"))
    assert shown.shape == (2 * TILE, 2 * TILE, 3)
    label = np.asarray(data[4]["label"])
    for j in range(4):  # each present object is outlined in its tile's colour
        if (label == j + 1).any():
            assert (shown == TILE_COLOURS[j]).all(axis=-1).any()
    assert "show.png" in capsys.readouterr().out


def test_cli_user_errors_print_one_line_and_exit_2(fss_tree, tmp_path, capsys):
    few = synthetic_tree(tmp_path / "few", folders=("a", "b", "c"))
    assert main(["generate", "--fss-root", str(few), "--out", str(tmp_path / "x"), "--num", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mosaic4: error:") and "at least 4 classes" in err

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["generate", "--fss-root", str(fss_tree), "--out", str(out), "--num", "2", "--tile-size", "16"]
    assert main(argv) == 2
    assert f"output {out} already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and not (out / "keep.txt").exists()
    assert len(load_mosaic4(out)) == 2

    assert main(["show", str(out), "--index", "9", "--out", str(tmp_path / "s.png")]) == 2
    assert "--index 9 is out of range" in capsys.readouterr().err
