"""`fusioner` command line: parse, call the library, print. No logic lives here.

The parser and the error handling; what each command does is fusioner/commands.py.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from fusioner.commands import (
    cmd_cache,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_import_released,
    cmd_predict,
    cmd_push,
    cmd_quickstart,
    cmd_sweep,
    cmd_sweep_report,
    cmd_train,
)
from fusioner.errors import FusionerError
from fusioner.progress import plain_progress


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusioner")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


# The choices of predict's flags, spelled here so `fusioner --help` imports no torch (tests/test_cli.py
# checks them against fusioner.decide.RULES and fusioner.inference.MODES).
RULES = ("best-name", "one-name")
MODES = ("fixed", "sliding")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusioner",
        description="Open-vocabulary segmentation from frozen vision and language models. Commands that "
        "read a config also take key=value (or --key value) overrides of any config key.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"fusioner {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a fusion head (config + key=value overrides)")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("cache", help="fill the frozen-feature cache ahead of training")
    p.add_argument("--config", required=True)
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser(
        "eval",
        help="evaluate a trained model; writes metrics.json",
        description="Under the run's own config the figures go to RUN/metrics.json (what push, the demo and "
        "predict read); under another dataset or other settings (--config, key=value) to "
        "RUN/evals/<slug>.json, never over metrics.json. --out names the file instead; a file there "
        "that fusioner eval did not write is refused.",
    )
    p.add_argument("--model", required=True, help="run directory, model folder or Hub repo id")
    p.add_argument("--config", help="dataset config (default: the run's own config.yaml)")
    p.add_argument("--out", help="a .json file, or a folder for metrics.json (default: see above)")
    p.add_argument(
        "--suite",
        choices=("ov", "fewshot"),
        help="every dataset of a benchmark suite found under config key data_root: ov (ADE-847/150, "
        "Pascal Context-459/59, VOC-20/21, COCO-Stuff-171, Cityscapes) or fewshot (PASCAL-5i and COCO-20i "
        "folds 0-3); writes suite.md, suite.json, per_class/ into --out (default: MODEL/suite-SUITE)",
    )
    # Not "--datasets": argparse would read `--dataset X` (the config key) as its abbreviation.
    p.add_argument("--only", help="with --suite: a comma-separated subset of its datasets, e.g. ade150,voc20")
    p.add_argument("--short-side", type=int, help="with --suite: replace the standard short side (512)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="segment your own images with your own class names",
        description="Writes NAME_labels.png and NAME_overlay.png per image, classes.txt and predictions.json "
        "into --out. NAME is the image's stem; images sharing a stem use their file name (photo.jpg), and "
        "those still equal prepend parent folders joined by __ (a__photo.jpg, b__photo.jpg). A file in "
        "--out that predict did not write (not listed in its predictions.json) is never overwritten: "
        "the command refuses, naming it, before writing anything; re-running into the same --out "
        "replaces its own files.",
    )
    p.add_argument("images", nargs="+")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="run directory, model folder or Hub repo id")
    which.add_argument("--onnx", metavar="DIR", help="a folder written by fusioner export (onnxruntime)")
    p.add_argument("--classes", required=True, help='comma-separated names, e.g. "cat,dog,grass"')
    p.add_argument("--out", required=True, help="output folder (see above for what may already be there)")
    p.add_argument(
        "--threshold", type=float, help="a name's probability needed to mark a pixel (default: the model's)"
    )
    p.add_argument(
        "--mode",
        choices=RULES,
        help="best-name (default): each pixel gets its best name or background, one label map; one-name: "
        "each name asked alone, one mask per name (NAME_maskI.png, I as in classes.txt; masks may "
        "overlap): the 1-way protocol behind the headline figures",
    )
    p.add_argument(
        "--seen-bias",
        type=float,
        help="subtracted from the logits of names seen in training (default: the calibration in the run's "
        "metrics.json; 0 without one)",
    )
    p.add_argument(
        "--refine",
        help="training-free refinement, a name of fusioner.methods.REFINERS, e.g. none or spectral "
        "(default: the model's own)",
    )
    p.add_argument(
        "--inference", choices=MODES, help="fixed (default: resized to the model's size) or sliding windows"
    )
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser(
        "export",
        help="export a trained model for onnxruntime (fusioner predict --onnx DIR runs it)",
        description="Writes predictor.onnx (frozen vision backbone + head: images 'b 3 s s' at the model's "
        "image_size, name embeddings 'k c' -> logits; b and k dynamic), text.onnx + tokenizer/ when the "
        "text model is a Hugging Face transformer, names.json + embeddings.npy of --classes, and "
        "export.json. --out must be new, empty or an earlier export.",
    )
    p.add_argument("model", help="run directory, model folder or Hub repo id")
    p.add_argument("--format", default="onnx", choices=("onnx",))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--classes", help='names whose embeddings are stored beside the graphs, e.g. "cat,dog"')
    p.add_argument("--no-text-graph", action="store_true", help="skip text.onnx: only --classes can be asked")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("quickstart", help="offline demo: train on pictograms, segment names never seen")
    p.add_argument("--out", required=True, help="output folder for the data, runs and report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a tiny setting that only checks the pipeline (CI)")
    p.set_defaults(fn=cmd_quickstart)

    p = sub.add_parser("sweep", help="train and evaluate every run of a sweep file (lists are axes)")
    p.add_argument("--config", required=True, help="sweep file, e.g. configs/sweeps/offline.yaml")
    p.add_argument("--shard", help="i/n: run every n-th run starting at i (n machines share a sweep)")
    p.add_argument("--out", help="sweep directory (default: the sweep file's out_dir)")
    p.add_argument(
        "--launcher",
        choices=("slurm", "local"),
        help="submit the shards through submitit: slurm (a job array; returns at once) or local (processes "
        "here; waits). Default: run in this process",
    )
    p.add_argument("--shards", type=int, help="with --launcher: how many array tasks (default: one per run)")
    p.add_argument("--partition", help="SLURM partition (--launcher slurm)")
    p.add_argument("--gpus-per-run", type=int, help="GPUs per array task (default: 1 on slurm, 0 locally)")
    p.add_argument("--time", type=int, help="minutes per array task before it is killed (default: 1440)")
    p.add_argument("--array-parallelism", type=int, help="at most this many SLURM tasks run at once")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("sweep-report", help="results.csv, results.md and heatmap.png of a sweep directory")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_sweep_report)

    p = sub.add_parser("push", help="upload a trained run's head, config.json and a model card to the Hub")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="namespace/name on the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser(
        "import-released",
        help="turn a checkpoint of the released Fusioner code into a run folder (config.yaml + model/)",
        description="Reads a released FullModel state dict (or a dict holding one, as the released code "
        "saves {'model': ...}) weights-only: safetensors, or torch.load(weights_only=True), never "
        "unpickling code. Its fusion.* / decoder.* tensors become the head; the named backbones stand "
        "in for its CLIP towers. Writes a finished run into --out (config.yaml, model/config.json, "
        "model/model.safetensors), refusing files already there; eval, predict, demo, export and push "
        "take it like any trained run.",
    )
    p.add_argument("checkpoint", help="the released checkpoint (.pth / .pt / .safetensors)")
    p.add_argument("--vision", required=True, help="vision backbone it was trained on, e.g. clip_vitl14")
    p.add_argument("--text", required=True, help="text backbone it was trained on, e.g. clip_vitl14_text")
    p.add_argument("--out", required=True, help="output run folder")
    p.add_argument(
        "--config", help="the dataset config it was trained under, e.g. configs/pascal5i/clip_clip.yaml"
    )
    p.add_argument("--heads", type=int, default=8, help="attention heads (no tensor shows them; released: 8)")
    p.add_argument("--temperature", type=float, default=0.07, help="released: 0.07")
    p.add_argument("--templates", default="fusioner", help="prompt set (default: the released 32)")
    p.add_argument("--image-size", type=int, default=224, help="input size (released: 224)")
    p.add_argument("--vision-weights", help="weights id or path of the vision backbone")
    p.add_argument("--text-weights", help="weights id or path of the text backbone")
    p.set_defaults(fn=cmd_import_released)

    p = sub.add_parser("demo", help="a web page (Gradio) to segment uploaded photos with typed names")
    p.add_argument("--model", help="run directory, model folder or Hub repo id (without: a page says how)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument(
        "--export-space", metavar="DIR", help="write a Hugging Face Space folder for --model; serve nothing"
    )
    p.add_argument(
        "--share",
        action="store_true",
        help="also serve through a temporary public gradio.live link (internet)",
    )
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if not args.verbose:
        # transformers draws a bar per checkpoint it loads; the CLI's own bars say what is going on.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        with plain_progress():  # in a log file, progress bars become a plain line every 10 s
            args.fn(args, extra)
    except FusionerError as e:
        print(f"fusioner {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C is the user's word, not a bug: no traceback
        print(f"fusioner {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if (disk := _disk_error(e)) is None:
            raise  # anything else is a bug and keeps its traceback
        where = f" {disk.filename}" if disk.filename else ""
        print(f"fusioner {args.command}: error: cannot write{where}: {disk.strerror}", file=sys.stderr)
        return 2
    return 0


# What the machine, not the program, refuses: a read-only folder, a full disk or quota.
_DISK_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _disk_error(error: BaseException) -> OSError | None:
    """The OSError of a refused write anywhere in ``error``'s chain (a full disk arrives wrapped)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
