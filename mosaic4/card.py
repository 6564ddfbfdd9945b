"""The dataset card of a Mosaic-4 set (its README.md), and publishing a written set to the Hub.

The card records everything needed to make the same bytes again: the options, the seed, a digest
of the class list, and the library versions that encode the images. It holds no timestamps or
local paths, so equal inputs give an equal card.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import PIL
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, DatasetCardData, HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError

from fusioner.errors import DataError, FusionerError
from fusioner.version import __version__
from mosaic4.fss import FSSClass
from mosaic4.generate import SPLIT, MosaicOptions, fingerprint

FSS_HOMEPAGE = "https://github.com/HKUSTCV/FSS-1000"
HSNET_SPLITS = "https://github.com/juhongm999/hsnet/tree/main/data/splits/fss"

CITATION = """\
@inproceedings{ma2022fusioner,
  title     = {Open-vocabulary Semantic Segmentation with Frozen Vision-Language Models},
  author    = {Ma, Chaofan and Yang, Yuhuan and Wang, Yanfeng and Zhang, Ya and Xie, Weidi},
  booktitle = {British Machine Vision Conference (BMVC)},
  year      = {2022}
}
@inproceedings{li2020fss1000,
  title     = {FSS-1000: A 1000-Class Dataset for Few-Shot Segmentation},
  author    = {Li, Xiang and Wei, Tianhan and Chen, Yau Pun and Tai, Yu-Wing and Tang, Chi-Keung},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2020}
}"""


def size_category(n: int) -> str:
    """The Hub's size bucket for ``n`` rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def classes_digest(classes: Sequence[FSSClass]) -> str:
    """sha256 of the sorted class folder names, one per line: compare it to check a split."""
    text = "".join(f"{name}\n" for name in sorted(c.folder for c in classes))
    return hashlib.sha256(text.encode()).hexdigest()


def generation_record(
    options: MosaicOptions, classes: Sequence[FSSClass], classes_file: str | Path | None
) -> dict[str, Any]:
    """The card's machine-readable ``mosaic4`` metadata block."""
    return {
        **asdict(options),
        "query_tile": "uniform" if options.query_tile is None else options.query_tile,
        "num_classes": len(classes),
        "classes_file": Path(classes_file).name if classes_file else None,
        "classes_sha256": classes_digest(classes),
        "fingerprint": fingerprint(classes, options),
        "versions": {
            "fusioner": __version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "datasets": datasets.__version__,
        },
    }


def _command(options: MosaicOptions, classes_file: str | Path | None) -> str:
    parts = ["mosaic4 generate --fss-root FSS-1000 --out mosaic4", f"--num {options.num}"]
    parts += [f"--seed {options.seed}", f"--tile-size {options.tile_size}"]
    if classes_file:
        parts.append(f"--classes-file {Path(classes_file).name}")
    if options.query_tile is not None:
        parts.append(f"--query-tile {options.query_tile}")
    if options.image_format != "png":
        parts.append(f"--image-format {options.image_format}")
    return " ".join(parts)


def build_card(
    options: MosaicOptions, classes: Sequence[FSSClass], classes_file: str | Path | None = None
) -> DatasetCard:
    """The README.md of a generated set: Hub metadata, how it was made, columns, and the class list."""
    record = generation_record(options, classes, classes_file)
    data = DatasetCardData(
        pretty_name="Mosaic-4",
        # FSS-1000 ships without a stated licence; the mosaics inherit its terms.
        license="unknown",
        task_categories=["image-segmentation"],
        size_categories=[size_category(options.num)],
        tags=["open-vocabulary-segmentation", "fss-1000", "robustness", "fusioner"],
        configs=[{"config_name": "default", "data_files": [{"split": SPLIT, "path": f"data/{SPLIT}-*"}]}],
        mosaic4=record,
    )
    t = options.tile_size
    placement = (
        "drawn uniformly from the four (the classes are dealt to the tiles in a seeded random order)"
        if options.query_tile is None
        else f"always tile {options.query_tile}"
    )
    split = (
        f"the classes listed in `{record['classes_file']}`"
        if classes_file
        else "every class folder of the FSS-1000 copy"
    )
    class_list = ", ".join(sorted(c.name for c in classes))
    body = f"""
# Mosaic-4

A robustness benchmark for language-vision correspondence, from *Open-vocabulary Semantic
Segmentation with Frozen Vision-Language Models* (Fusioner, BMVC 2022). Each image is a 2x2 mosaic
of four [FSS-1000]({FSS_HOMEPAGE}) images from four different classes, so a model must find the right
quarter from the class name alone.

## How it was made

- {options.num} mosaics of {2 * t}x{2 * t} pixels; each tile is an FSS-1000 image resized to {t}x{t}
  (bilinear; masks nearest-neighbour).
- Classes: {split}, {len(classes)} classes (sha256 of the sorted folder names, one per line:
  `{record["classes_sha256"]}`). The published FSS-1000 split has 520 training, 240 validation and
  240 test classes; the test list is the FSS-1000 authors' own, and copies of all three are in
  [HSNet's repository]({HSNET_SPLITS}).
- Sample `i` draws four distinct classes and one image of each from a numpy generator seeded with
  `(seed={options.seed}, i)`. The first class drawn is the query; its tile is {placement}.
- Images are stored as {options.image_format.upper()}, label maps as lossless PNG.
- Generated with fusioner {__version__} (numpy {np.__version__}, Pillow {PIL.__version__}).
  The same FSS-1000 files, options and library versions give byte-identical output:

```
{_command(options, classes_file)}
```

## Columns

| column | type | meaning |
|---|---|---|
| `id` | string | `<index>-<hash of the sources>`, unique and stable |
| `image` | image | the RGB mosaic; tiles row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right |
| `label` | image (PNG, L) | 0 = background, `j + 1` = the object of tile `j` |
| `names` | list of 4 strings | class name of each tile (FSS folder names with `_` written as spaces) |
| `sources` | list of 4 strings | FSS-1000 file of each tile, `<class folder>/<stem>` |
| `query` | int8 | the tile holding the query class |

Evaluate with `fusioner eval --dataset mosaic4 --data-path <this folder>`, or read it with
`fusioner.data.mosaic.Mosaic4`.

## Source and licence

All pixels and masks come from FSS-1000 ({FSS_HOMEPAGE}); use of this set is subject to its terms.

<details><summary>Classes ({len(classes)})</summary>

{class_list}

</details>

## Citation

```bibtex
{CITATION}
```
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


class HubClient(Protocol):
    """The part of ``huggingface_hub.HfApi`` that :func:`publish` uses (tests pass a recorder)."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def list_repo_files(self, repo_id: str, **kwargs: Any) -> list[str]: ...

    def create_commit(self, repo_id: str, operations: Any, **kwargs: Any) -> Any: ...


def publish(
    out: str | Path,
    repo_id: str,
    *,
    client: HubClient | None = None,
    private: bool | None = None,
    commit_message: str = "Upload Mosaic-4",
) -> Any:
    """Upload the card and parquet shards of a written set to the dataset repo ``repo_id``, in one commit.

    ``client`` defaults to ``huggingface_hub.HfApi()``, which uses the saved login token.
    Parquet shards left on the Hub from an earlier, differently sharded upload are deleted in the
    same commit, so the repository never mixes two generations. Returns the client's commit info.
    """
    out = Path(out)
    card = out / "README.md"
    shards = sorted((out / "data").glob(f"{SPLIT}-*.parquet"))
    if not card.is_file() or not shards:
        raise DataError(f"{out} lacks README.md or data/{SPLIT}-*.parquet; write it with `mosaic4 generate`")
    client = HfApi() if client is None else client
    files = {"README.md": card, **{f"data/{shard.name}": shard for shard in shards}}
    try:
        client.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        remote = client.list_repo_files(repo_id, repo_type="dataset")
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()
        ]
        operations += [
            CommitOperationDelete(path_in_repo=name)
            for name in remote
            if name.startswith("data/") and name not in files
        ]
        return client.create_commit(repo_id, operations, commit_message=commit_message, repo_type="dataset")
    except (HfHubHTTPError, HFValidationError) as e:
        # Auth, permission and name errors are the user's to fix; say so in one line.
        raise FusionerError(f"push to the Hub dataset {repo_id!r} failed: {str(e).splitlines()[0]}") from None
