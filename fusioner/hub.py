"""Publish a trained run on the Hugging Face Hub: the head's weights, ``config.json`` and a model card.

Only what :meth:`fusioner.FusionerModel.from_pretrained` reads travels: ``model.safetensors`` (the
fusion head alone; the frozen backbones are rebuilt on load from their own sources, by the names and
weights ids in ``config.json``) and ``config.json``, plus a generated ``README.md``. Everything that
can be checked locally is checked before the first request, so a refused push uploads nothing:
the repo id's form, the run's finished model, its backbone names (against the adapter registries,
without building a backbone) and the readability of its weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub import CommitOperationAdd, EvalResult, ModelCard, ModelCardData

from fusioner.adapters.registry import check
from fusioner.config import Config
from fusioner.errors import ConfigError, DataError, FusionerError, WeightsError
from fusioner.io import read_json
from fusioner.metrics_file import Metrics, pct
from fusioner.model.files import CONFIG_NAME, WEIGHTS_NAME
from fusioner.model.head import HeadConfig
from fusioner.run import RunDir

CARD_NAME = "README.md"
RANDOM = "random"  # adapters' weights="random": a backbone that cannot be rebuilt identically on load
# The Hub's rule for both halves (huggingface_hub.utils.validate_repo_id), with the namespace required.
_PART = r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}(?<![.-])"
REPO_ID = re.compile(rf"^{_PART}/{_PART}$")


class HubClient(Protocol):
    """The two :class:`huggingface_hub.HfApi` methods a push uses (tests pass a recording fake)."""

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False) -> Any: ...

    def create_commit(
        self, repo_id: str, operations: Iterable[CommitOperationAdd], *, commit_message: str
    ) -> Any: ...


# -- checks --------------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or repo_id.endswith(".git"):
        raise ConfigError(
            f"--repo-id {repo_id!r}: expected 'namespace/name' (your user or organisation, a slash, the "
            f"model's name; letters, digits, '-', '_' and '.'), e.g. 'alice/fusioner-dino-bert'"
        )
    return repo_id


@dataclass(frozen=True)
class RunRecord:
    """What a push publishes and describes, read (and checked) from a run directory."""

    run_dir: Path
    model_dir: Path
    record: dict[str, Any]  # model/config.json
    config: Config  # config.yaml: training data, fold, schedule
    metrics: Metrics | None  # metrics.json, when the run was evaluated
    steps: int | None
    num_parameters: int


def _read_model_record(path: Path) -> dict[str, Any]:
    data = read_json(path, "model config")
    if not isinstance(data, dict):
        raise DataError(f"model config {path} is not a JSON object")
    return data


def _count_parameters(path: Path) -> int:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None


def read_run(run_dir: str | Path) -> RunRecord:
    """Check that ``run_dir`` holds a finished, publishable model and read what the card needs."""
    run = RunDir(run_dir)
    model_dir = run.model
    state = run.require_finished_model()
    config = run.read_config()
    record = _read_model_record(model_dir / CONFIG_NAME)
    for key in ("vision", "text", "head", "templates", "image_size", "threshold"):
        if key not in record:
            raise FusionerError(f"{model_dir / CONFIG_NAME}: key {key!r} is missing; re-save the model")
    for kind in ("vision", "text"):
        check(kind, record[kind], str(model_dir / CONFIG_NAME))
    for kind in ("vision", "text"):
        if record.get(f"{kind}_weights") == RANDOM:
            raise FusionerError(
                f"{model_dir / CONFIG_NAME}: the {kind} backbone has random weights ({kind}_weights: "
                f"random), which cannot be rebuilt on load; publish a model trained on real weights"
            )
    try:
        HeadConfig(**record["head"])
    except TypeError as e:
        raise FusionerError(f"{model_dir / CONFIG_NAME}: key 'head' is not a head config: {e}") from None
    metrics = run.read_metrics() if run.metrics.is_file() else None
    steps = state.steps if state else None
    num_parameters = _count_parameters(model_dir / WEIGHTS_NAME)
    return RunRecord(run.path, model_dir, record, config, metrics, steps, num_parameters)


# -- the model card ----------------------------------------------------------------------------------
def held_out_classes(run: RunRecord) -> list[str]:
    """The class names kept out of training: evaluated ones first, else the config's / the fold's."""
    from fusioner.data.splits import COCO_CLASSES, VOC_CLASSES, coco20i_labels, pascal5i_labels

    if run.metrics and run.metrics.one_way.get("per_class"):
        return list(run.metrics.one_way["per_class"])
    if run.config.unseen_classes:
        return list(run.config.unseen_classes)
    if run.config.dataset == "pascal5i":
        return [VOC_CLASSES[i - 1] for i in pascal5i_labels(run.config.fold)]
    if run.config.dataset == "coco20i":
        return [COCO_CLASSES[i - 1] for i in coco20i_labels(run.config.fold)]
    return []


def _weights(kind: str, name: str, weights: str | None) -> str:
    if weights:
        return f"weights `{weights}`"
    return f"default weights, from {check(kind, name).weights}"  # read_run checked the name


def _protocol(gzss: dict) -> str:
    # Which GZSS arithmetic the figures follow (engine/metrics.py): ZegCLIP's VOC protocol ignores
    # background pixels; background_as_class counts a name painted on background as an error.
    return f" ({gzss['protocol']})" if gzss.get("protocol") else ""


def _metrics_section(metrics: Metrics | None) -> list[str]:
    if not metrics:
        return ["Not evaluated yet (`fusioner eval --model RUN_DIR` writes `metrics.json`)."]
    one, gz = metrics.one_way, metrics.gzss or {}
    lines = [
        "| protocol | metric | value (%) |",
        "|---|---|---|",
        f"| 1-way, each held-out class queried alone (HSNet) | mIoU | {pct(one.get('miou'))} |",
        f"| | FB-IoU | {pct(one.get('fbiou'))} |",
        f"| generalized zero-shot, all classes in one pass{_protocol(gz)} | mIoU seen "
        f"| {pct(gz.get('miou_seen'))} |",
        f"| | mIoU unseen | {pct(gz.get('miou_unseen'))} |",
        f"| | hIoU | {pct(gz.get('hiou'))} |",
    ]
    per_class = one.get("per_class") or {}
    if per_class:
        figures = ", ".join(f"{name} {pct(value)}" for name, value in per_class.items())
        lines += ["", f"1-way IoU per held-out class: {figures}"]
    return lines


def _eval_results(run: RunRecord, model_name: str) -> list[EvalResult] | None:
    miou = run.metrics.one_way.get("miou") if run.metrics else None
    if not isinstance(miou, (int, float)) or math.isnan(miou):
        return None
    dataset = run.config.dataset
    name = f"{dataset} fold {run.config.fold}" if dataset in ("pascal5i", "coco20i") else dataset
    return [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=dataset,
            dataset_name=name,
            metric_type="mean_iou",
            metric_name="1-way mIoU on held-out classes",
            metric_value=round(100 * miou, 2),
        )
    ]


def model_card(run: RunRecord, repo_id: str) -> ModelCard:
    """The README.md of a pushed model: pair, data, metrics, intended use and limits, usage."""
    record, config = run.record, run.config
    head = record["head"]
    vision, text = record["vision"], record["text"]
    model_name = repo_id.split("/")[1]
    data = ModelCardData(
        library_name="fusioner",
        pipeline_tag="image-segmentation",
        tags=["fusioner", "open-vocabulary-segmentation", "zero-shot", "semantic-segmentation", vision, text],
        model_name=model_name,
        eval_results=_eval_results(run, model_name),
    )
    held_out = held_out_classes(run)
    folds = f", fold {config.fold}" if config.dataset in ("pascal5i", "coco20i") else ""
    body = [
        f"# {model_name}",
        "",
        f"A fusioner head for open-vocabulary semantic segmentation (after *Open-vocabulary Semantic "
        f"Segmentation with Frozen Vision-Language Models*, BMVC 2022) on the frozen pair "
        f"**`{vision}`** (vision) + **`{text}`** (text). "
        f"This repository holds only the trainable head ({run.num_parameters / 1e6:.1f} M parameters); "
        f"the two backbones stay frozen and are rebuilt from their own weights when the model is loaded.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| vision backbone | `{vision}`, {_weights('vision', vision, record.get('vision_weights'))} |",
        f"| text backbone | `{text}`, {_weights('text', text, record.get('text_weights'))} |",
        f"| prompt templates | {', '.join(f'`{t}`' for t in record['templates'])} |",
        f"| input size | {record['image_size']} px, threshold {record['threshold']} |",
        f"| fusion head | dim {head.get('dim')}, depth {head.get('depth')}, heads {head.get('heads')}, "
        f"decoder `{head.get('decoder')}` |",
        f"| fusioner version | {record.get('fusioner_version', 'unknown')} |",
        "",
        "## Training data",
        "",
        f"- dataset `{config.dataset}`{folds}"
        + (" (a custom dataset in the folder layout)" if config.dataset == "folder" else ""),
        f"- held out of training (zero-shot): {', '.join(held_out) if held_out else 'none'}",
        f"- {run.steps if run.steps is not None else 'unknown'} steps, batch size {config.batch_size}, "
        f"lr {config.lr}, {config.epochs} epochs, image size {config.image_size}, seed {config.seed}",
        "",
        "## Results",
        "",
        *_metrics_section(run.metrics),
        "",
        "## Intended use and limits",
        "",
        "Segmenting images into classes named at inference time, for research on open-vocabulary and "
        "zero-shot segmentation. The head was trained on the dataset's other classes; the held-out "
        "figures measure transfer to names it never saw, and quality drops for names far from all of "
        f"them. Masks are predicted at {record['image_size']} px and upsampled, so thin structures are "
        "coarse. The model "
        "inherits the biases and the licences of its two backbones and of its training data; check them "
        "before any deployment, and do not use it for decisions about people.",
        "",
        "## Usage",
        "",
        "```python",
        "from fusioner import FusionerModel",
        f'model = FusionerModel.from_pretrained("{repo_id}")',
        'labels = model.predict(images, ["cat", "dog", "grass"])  # images b 3 h w in [0, 1] -> b h w',
        "```",
        "",
        f'or: `fusioner predict photo.jpg --model {repo_id} --classes "cat,dog,grass" --out masks/`',
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


# -- push ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    files: tuple[str, ...]


def push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    api: HubClient | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload ``config.json``, ``model.safetensors`` and a generated ``README.md`` in one commit.

    ``private`` applies when the repo is created; an existing repo keeps its visibility.
    """
    repo_id = check_repo_id(repo_id)
    run = read_run(run_dir)
    card = model_card(run, repo_id)
    operations = [
        CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=str(run.model_dir / CONFIG_NAME)),
        CommitOperationAdd(path_in_repo=WEIGHTS_NAME, path_or_fileobj=str(run.model_dir / WEIGHTS_NAME)),
        CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode()),
    ]
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    pair = f"{run.record['vision']} + {run.record['text']}"
    message = commit_message or f"fusioner: {pair} from {run.run_dir.name}"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=message)
    except Exception as e:  # auth, network, permissions: the user's to fix, so one line, no traceback
        raise FusionerError(
            f"could not push to {repo_id!r} on the Hugging Face Hub: {e} "
            f"(log in with `hf auth login` or set HF_TOKEN)"
        ) from e
    return PushResult(repo_id, str(url), tuple(op.path_in_repo for op in operations))
