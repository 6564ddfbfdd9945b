"""One flat config for every command: YAML file + ``key=value`` overrides, unknown keys refused.

Keys are flat field names; a dotted spelling (``data.path``) is the same key as its underscore
spelling (``data_path``), so ``fusioner eval --data.path DIR`` and ``data_path: DIR`` agree.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusioner.errors import ConfigError

# Numeric ranges, checked when a Config is built. dim / depth / heads = 0 mean "the preset's".
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch
_POSITIVE = ("temperature", "lr", "mlp_ratio")
_AT_LEAST_ONE = (
    "batch_size", "epochs", "checkpoint_every", "log_every", "grad_accum", "eval_batch_size", "image_size",
)  # fmt: skip
_NON_NEGATIVE = (
    "dim", "depth", "heads", "score_dim", "num_negatives", "dice_weight", "ce_weight", "max_steps",
    "weight_decay", "warmup_steps", "clip_grad", "num_workers", "fold",
    "spectral_knn", "spectral_weight", "deep_prompts", "pseudo_weight", "global_loss_weight", "global_bank",
    "sazs_edge_weight", "zegclip_st_start",
)  # fmt: skip


# The names a config key accepts and the checks of whole configs, registered by the modules that
# own them (model/decoder.py, model/fusion.py, inference.py, methods/build.py): the config reads the
# registries without importing them, since they import it (timm's registry imports nothing either).
# Importing fusioner imports those modules, so the tables are full before any Config is built.
# ``dataset`` and ``fold`` are checked where a split is built (fusioner.data.check_dataset).
_CHOICES: dict[str, Collection[str]] = {}
_CHECKS: list[Callable[[Config], None]] = []


def register_choices(key: str, names: Collection[str]) -> None:
    """Let config key ``key`` take the names in ``names`` (a registry: later additions count too)."""
    if key in _CHOICES:
        raise ValueError(f"the choices of config key {key!r} are registered twice")
    _CHOICES[key] = names


def register_check(check: Callable[[Config], None]) -> Callable[[Config], None]:
    """Run ``check(config)`` on every Config built (it raises ConfigError); usable as a decorator."""
    _CHECKS.append(check)
    return check


def _registered(key: str) -> Collection[str]:
    if key not in _CHOICES:  # a module that owns the key was not imported: a bug, not bad input
        raise RuntimeError(f"no module registered the choices of config key {key!r}")
    return _CHOICES[key]


@dataclass
class Config:
    # Backbones (registry names, see fusioner.adapters.list_vision / list_text).
    vision: str = "efficientnet_lite0"
    vision_weights: str | None = None
    text: str = "minilm_l6"
    text_weights: str | None = None
    templates: str = "name"  # a set in fusioner.adapters.prompts.TEMPLATES

    # Data.
    dataset: str = "folder"  # pascal5i | coco20i | folder | mosaic4 | pictograms
    data_path: str = ""
    split_dir: str = ""  # HSNet-format list folder (pascal5i / coco20i); empty = image lists by rule
    # `fusioner eval --suite`: the folder holding the suite's datasets in their prepared layouts
    # (ADEChallengeData2016/, ADE20K_2021_17_01/, VOCdevkit/, coco/, cityscapes/; fusioner/engine/suite.py).
    data_root: str = ""
    fold: int = 0
    unseen_classes: list[str] = field(default_factory=list)  # folder dataset: names held out of training
    drop_unseen_images: bool = False  # drop training images that contain held-out classes
    image_size: int = 384
    augment: list[str] = field(default_factory=lambda: ["hflip"])  # hflip | crop | jitter (data/augment.py)
    num_workers: int = 0

    # Fusion head (model/fusion.py, model/decoder.py).
    preset: str = "base"  # base | small: sets dim/depth/heads below unless given explicitly
    dim: int = 0
    depth: int = 0
    heads: int = 0
    mlp_ratio: float = 4.0
    decoder: str = "default"  # default (halving channels) | released (the released Fusioner decoder)
    fusion_layout: str = "default"  # default (timm blocks) | released (LN eps 1e-5, bias-free projections)
    normalize_tokens: bool = False  # L2-normalise patch tokens before the fusion (the released model does)
    fusion_attention: str = "decoupled"  # joint (the paper's, one name per sequence) | decoupled
    score_dim: int = 0  # width where pixels meet names; 0 = the decoder's last width (dim / 8)
    temperature: float = 0.07
    learn_temperature: bool = False
    threshold: float = 0.5

    # Training.
    num_negatives: int = 4  # absent seen classes sampled per image as negatives
    shuffle_names: bool = False  # ablation: permute the seen names' embeddings among themselves
    hard_negatives: bool = False  # negatives: the absent names closest to a present one first
    dice_weight: float = 1.0
    ce_weight: float = 0.0  # per-pixel softmax over background + queried names (model/losses.py)
    batch_size: int = 8
    epochs: int = 10
    max_steps: int = 0  # > 0 caps the number of optimizer steps
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_accum: int = 1
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPUs that have it) | no | bf16 | fp16
    compile: bool = False  # torch.compile the head (worth it on GPUs for long runs)
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    out_dir: str = "runs/default"
    cache_dir: str = ""  # frozen-feature cache; empty = <out_dir>/../cache
    use_cache: bool = True

    # Evaluation.
    eval_mode: str = "fixed"  # fixed (image_size) | sliding (original resolution), fusioner/inference.py
    eval_split: str = "val"  # val | test (datasets with a test split); GZSS calibration is chosen on val
    eval_batch_size: int = 8

    # Methods (fusioner/methods/, issue 12): the head design, a training-free refiner, extra terms.
    method: str = "fusioner"  # fusioner | zegclip | zegformer (fusioner.methods.METHODS)
    # none | spectral | sazs (fusioner.methods.REFINERS), applied in fusioner/inference.py
    refine: str = "none"
    # spectral: share of the segment-mean probabilities in the blend; 0.2 and 16 segments were chosen on
    # CCP val (benchmarks/QUALITY.md): 0.5 or 4 segments wash out small garments.
    refine_weight: float = 0.2
    refine_vision: str = ""  # spectral: another vision adapter for the graph; empty = the run's own
    spectral_eigs: int = 4  # eigenvectors of the normalised Laplacian
    spectral_segments: int = 16  # K-means segments (refine and spectral_weight)
    spectral_knn: int = 0  # > 0 keeps each token's knn strongest affinities
    sazs_min_iou: float = 0.5  # sazs: an eigen-mask replaces a name's mask from this IoU with it
    spectral_weight: float = 0.0  # training: pull predictions toward the eigen-segments (ours, not SAZS)
    sazs_edge_weight: float = 0.0  # training: SAZS's edge branch terms (methods/sazs_edges.py); 1 = SAZS's
    inverseform_weights: str = ""  # with sazs_edge_weight: InverseForm's regressor (methods/inverseform.py)
    deep_prompts: int = 0  # zegclip: prompt tokens per block of a CLIP or timm ViT (needs use_cache=false)
    # zegclip: ZegCLIP's transductive setting (methods/zegclip_st.py): unseen-class pixels of the training
    # images (names given, labels withheld) take the model's own best unseen name from step zegclip_st_start
    zegclip_self_training: bool = False
    zegclip_st_start: int = 0  # optimizer steps of the inductive phase (seen names only) before it
    zegformer_grouping: str = "queries"  # queries (learned, class-agnostic) | spectral
    zegformer_queries: int = 16  # mask queries (or spectral segments)
    zegformer_lambda: float = 2 / 3  # ZegFormer's fusion exponent (seen: segment^l x CLIP^(1-l))
    # none | clip-zss (CLIP-ZSS pixel learning, methods/pseudo_labels.py) | kmeans (earlier fixed-K variant)
    pseudo_labels: str = "none"
    pseudo_clusters: int = 4  # clip-zss: the most pseudo-classes per image; kmeans: exactly this many
    # clip-zss: K-means seed windows in tokens (s x s); kmeans: neighbourhoods fused into descriptors
    pseudo_scales: list[str] = field(default_factory=lambda: ["1", "3"])
    pseudo_merge: float = 0.85  # clip-zss: clusters whose centroids' cosine exceeds this merge
    pseudo_weight: float = 0.5
    global_loss_weight: float = 0.0  # CLIP-ZSS global learning (the teacher's CLS queries the head)
    global_bank: int = 256  # CLIP-ZSS: earlier batches' CLS tokens kept as negatives
    # CLIP-ZSS's frozen teacher (methods/teacher.py), training only; empty = the run's own backbone
    teacher_vision: str = ""
    teacher_weights: str = ""  # as vision_weights, for the teacher; empty = its default weights

    def __post_init__(self) -> None:
        self._check_ranges()
        presets = {"base": (512, 12, 8), "small": (256, 4, 8), "tiny": (64, 1, 2)}
        if self.preset not in presets:
            raise ConfigError(
                f"config key 'preset': unknown preset {self.preset!r}; known: {', '.join(presets)}"
            )
        dim, depth, heads = presets[self.preset]
        self.dim = self.dim or dim
        self.depth = self.depth or depth
        self.heads = self.heads or heads
        if self.dim % self.heads:
            raise ConfigError(f"config key 'dim': {self.dim} is not divisible by heads={self.heads}")
        if self.decoder == "paper":
            # Heads saved with it still load (model/decoder.py); new runs must say what they mean.
            raise ConfigError(
                "config key 'decoder': 'paper' was a three-stage GroupNorm decoder that is not the "
                "released Fusioner decoder; use 'released' for the paper's head (issue 20) or 'default'"
            )
        choices = {
            "decoder": _registered("decoder"),
            "fusion_layout": _registered("fusion_layout"),
            "fusion_attention": _registered("fusion_attention"),
            "precision": ("auto", "no", "bf16", "fp16"),
            "eval_mode": _registered("eval_mode"),
            "eval_split": ("val", "test"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"config key {key!r}: {getattr(self, key)!r} is not one of {', '.join(allowed)}"
                )
        for check in _CHECKS:
            check(self)

    def _check_ranges(self) -> None:
        """Refuse numeric values no run can use, before anything loads or writes (``temperature=0``
        once trained an all-NaN model that exited 0)."""
        for key in dataclasses.asdict(self):
            value = getattr(self, key)
            # Training runs in float32: a Python float beyond its range is as unusable as inf.
            if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise ConfigError(
                    f"config key {key!r}: expected a finite number (float32 range), got {value!r}"
                )
        rules = [
            (_POSITIVE, lambda v: v > 0, "greater than 0"),
            (_AT_LEAST_ONE, lambda v: v >= 1, "at least 1"),
            (_NON_NEGATIVE, lambda v: v >= 0, "0 or more"),
            (("threshold",), lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
        ]
        for keys, ok, expected in rules:
            for key in keys:
                if not ok(getattr(self, key)):
                    raise ConfigError(f"config key {key!r}: expected {expected}, got {getattr(self, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


# Keys that change how a run executes but not what it computes: the only keys a resumed run (by
# `train --resume` or a sweep) may change. Any other change would make config.yaml lie about the
# steps already taken.
RUNTIME_KEYS = frozenset(
    ("out_dir", "cache_dir", "use_cache", "num_workers", "eval_batch_size", "log_every", "checkpoint_every")
    + ("precision", "compile")
    + ("data_root",)  # where `eval --suite` looks for benchmarks; training never reads it
)


def config_changes(before: Config, now: Config) -> list[str]:
    """``key: old -> new`` for every non-runtime key whose value differs, in field order."""
    old, new = before.to_dict(), now.to_dict()
    return [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items() if k not in RUNTIME_KEYS and old[k] != v]


@functools.cache
def _field_types() -> dict[str, Any]:
    # Resolving the annotations costs about 10 ms; a 10,000-run sweep coerces some 80,000 values.
    return typing.get_type_hints(Config)


def _coerce(key: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or say what was expected."""
    hint = _field_types()[key]
    origin = typing.get_origin(hint)
    if isinstance(value, str) and (hint is not str):
        try:  # YAML 1.1 reads "3e-4" as a string; Python's float() does not
            value = float(value) if hint is float else yaml.safe_load(value) if value != "" else None
        except (ValueError, yaml.YAMLError):
            pass
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if value is None:  # `unseen_classes=` on the command line: the empty list
            return []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if hint is bool and isinstance(value, bool):
        return value
    if hint in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if hint is int and value != int(value):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return hint(value)
    if hint is str and value is not None:
        return str(value)
    raise ConfigError(f"config key {key!r}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def canonical_key(key: str, source: str) -> str:
    """``data.path`` / ``--data-path`` / ``data_path`` -> ``data_path``; unknown keys are refused."""
    name = key.strip().lstrip("-").replace(".", "_").replace("-", "_")
    if name not in Config.keys():
        close = difflib.get_close_matches(name, Config.keys(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
    return name


def override_keys(overrides: list[str]) -> set[str]:
    """The config keys a list of ``key=value`` overrides sets (canonical spelling)."""
    return {canonical_key(item.partition("=")[0], "command line") for item in overrides}


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping; ``what`` names it in errors ("config file", "sweep file")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of config keys to values")
    return data


# Keys naming something to read. A relative one in a config file means a path from the file's own
# folder, so `--config /any/where/ccp.yaml` works from any current folder; on the command line it
# means one from the current folder, as every shell path does. Outputs (out_dir, cache_dir) stay
# relative to the current folder: runs land where the command is run, as the README's `runs/...`.
INPUT_PATH_KEYS = ("data_path", "split_dir", "data_root")
# Weights may be a file or a Hub id / registry word ("random"): a relative value is a path only
# where that file exists beside the config file.
WEIGHTS_KEYS = ("vision_weights", "text_weights", "teacher_weights", "inverseform_weights")


def _resolve_path(key: str, value: Any, base: Path, where: str) -> tuple[Any, str | None]:
    """``value`` of path key ``key`` made absolute against ``base``, and what to say if it is missing
    (naming the base used, ``where``: "the config file's folder" / "the current folder")."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value, None
    resolved = Path(os.path.normpath(base / Path(value).expanduser()))
    if key in WEIGHTS_KEYS:
        return (str(resolved), None) if resolved.exists() else (value, None)
    missing = None
    if not resolved.exists():
        missing = (
            f"config key {key!r}: {value} does not exist relative to {where} {base} (looked for "
            f"{resolved}); relative paths in a config file start at its folder, on the command line at "
            "the current one"
        )
    return str(resolved), missing


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    check_paths: bool = False,
    **kwargs: Any,
) -> Config:
    """Read ``path`` (YAML), apply ``key=value`` overrides then keyword overrides, validate.

    Relative input paths (:data:`INPUT_PATH_KEYS`, and weights files that exist) are made absolute:
    from the config file's folder for its values, from the current folder for overrides and keyword
    arguments (where Python would resolve them anyway): a run's config.yaml then names one folder
    whichever way it was started, so a sweep and a command line compare equal.
    ``check_paths``: refuse a relative input path that does not exist, saying which base it was
    resolved against (commands that read the data ask for it; merely loading a config does not).
    """
    values: dict[str, Any] = {}
    if path is not None:
        for key, value in read_yaml_mapping(path, "config file").items():
            values[canonical_key(str(key), str(path))] = (value, str(path))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        values[canonical_key(key, "command line")] = (value, "command line")
    for key, value in kwargs.items():
        values[canonical_key(key, "keyword argument")] = (value, "keyword argument")
    # Resolved after merging: a file's placeholder path that the command line replaces is never read.
    for key in INPUT_PATH_KEYS + WEIGHTS_KEYS:
        value, source = values.get(key, (None, "keyword argument"))
        if key not in values:
            continue
        if source in ("command line", "keyword argument"):
            resolved, missing = _resolve_path(key, value, Path.cwd(), "the current folder")
        else:
            resolved, missing = _resolve_path(
                key, value, Path(str(path)).resolve().parent, "the config file's folder"
            )
        if missing and check_paths:
            raise ConfigError(missing)
        values[key] = (resolved, source)
    coerced = {key: _coerce(key, value) for key, (value, _src) in values.items()}
    return Config(**coerced)


def save_config(config: Config, path: str | Path) -> None:
    from fusioner.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
