"""`fusioner` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fusioner.errors import FusionerError

if TYPE_CHECKING:  # the commands import what they use when they run: `fusioner --help` stays fast
    from fusioner.sweep import Sweep
    from fusioner.sweep.launch import LaunchOptions


def _overrides(extra: list[str]) -> list[str]:
    """``key=value`` and ``--key value`` / ``--key=value`` (e.g. ``--data.path DIR``) as overrides."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if item.startswith("--"):
            key = item[2:]
            if "=" in key:
                out.append(key)
            elif i + 1 < len(extra):
                out.append(f"{key}={extra[i + 1]}")
                i += 1
            else:
                raise FusionerError(f"option {item} needs a value")
        elif "=" in item:
            out.append(item)
        else:
            raise FusionerError(f"unexpected argument {item!r}: overrides are key=value")
        i += 1
    return out


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.config import load_config
    from fusioner.engine.train import process_state, train

    config = load_config(args.config, _overrides(extra))
    result = train(config, resume=args.resume)
    if process_state().is_main_process:  # under a launcher every process returns here
        print(f"trained {result.steps} steps; model in {result.out_dir / 'model'}")


def cmd_cache(args: argparse.Namespace, extra: list[str]) -> None:
    import torch

    from fusioner.adapters import create_vision
    from fusioner.config import load_config
    from fusioner.data import build_split
    from fusioner.engine.cache import prepare_cache

    config = load_config(args.config, _overrides(extra))
    vision = create_vision(config.vision, config.vision_weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vision.to(device)
    split = build_split(config)
    sets = {"train": split.train, "val": split.val, "test": split.test}
    for name, dataset in ((n, d) for n, d in sets.items() if d is not None):
        cache = prepare_cache(config, vision, dataset, device)
        print(f"{name}: {len(dataset)} images cached in {cache.dir}")


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.engine.evaluate import evaluate_model
    from fusioner.run import Metrics

    if args.suite:
        from fusioner.engine.suite import evaluate_suite

        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        result = evaluate_suite(
            args.model, args.suite, args.config, _overrides(extra), out=args.out, short_side=args.short_side,
            only=only,
        )  # fmt: skip
        counts = f"{len(result.evaluated)} evaluated, {len(result.skipped)} skipped"
        print(f"wrote {result.dir / 'suite.md'} ({counts})")
        return
    if args.short_side or args.only:
        raise FusionerError("--short-side and --only go with --suite")
    out = evaluate_model(args.model, args.config, _overrides(extra), out=args.out)
    print(f"{Metrics.read(out).line()}\nwrote {out}")


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.predict import predict_images

    names = [n.strip() for n in args.classes.split(",") if n.strip()]
    if args.onnx:
        from fusioner.export import predict_onnx

        written = predict_onnx(args.onnx, args.images, names, Path(args.out))
    else:
        written = predict_images(args.model, args.images, names, Path(args.out))
    for path in written:
        print(path)


def cmd_export(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.export import export_onnx

    if extra:
        raise FusionerError(f"unexpected arguments: {' '.join(extra)}")
    names = [n.strip() for n in (args.classes or "").split(",") if n.strip()]
    result = export_onnx(args.model, Path(args.out), classes=names, text_graph=not args.no_text_graph)
    for name in result.files:
        print(result.out / name)
    text = "" if result.text_diff is None else f", text embeddings {result.text_diff:.1e}"
    print(f"onnxruntime vs PyTorch at export, max |diff|: logits {result.predictor_diff:.1e}{text}")


def cmd_quickstart(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.quickstart import quickstart

    report = quickstart(Path(args.out), seed=args.seed, fast=args.fast, overrides=_overrides(extra))
    print(report.summary())


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.sweep import load_sweep, parse_shard, run_sweep
    from fusioner.sweep.launch import launch_options

    launch = launch_options(
        args.launcher, shard=args.shard, shards=args.shards, partition=args.partition,
        gpus_per_run=args.gpus_per_run, time_min=args.time, array_parallelism=args.array_parallelism,
    )  # fmt: skip
    sweep = load_sweep(args.config, _overrides(extra), out=args.out)
    if launch is not None:
        return _launch_sweep(sweep, launch)
    index, count = parse_shard(args.shard)
    runs = sweep.shard(index, count)
    print(f"sweep {sweep.dir}: shard {index}/{count} holds {len(runs)} of {len(sweep.runs)} runs")
    result = run_sweep(sweep, shard=(index, count), on_outcome=lambda o: print(o.line(), flush=True))
    print(result.summary())
    if result.failed:
        log_file = sweep.dir / "runs.jsonl"
        raise FusionerError(f"{len(result.failed)} runs failed; see their error.txt files and {log_file}")


def _launch_sweep(sweep: Sweep, options: LaunchOptions) -> None:
    from fusioner.sweep.launch import submit, wait

    launch = submit(sweep, options)
    print("\n".join(launch.lines(options.launcher)), flush=True)
    if options.launcher == "slurm":
        print(f"when they are done: fusioner sweep-report {sweep.dir}  (submit again to retry failed runs)")
        return
    results = wait(launch)
    for index, result in enumerate(results):
        for outcome in result.outcomes:
            print(outcome.line())
        print(f"shard {index}/{len(results)}: {result.summary()}")
    failed = sum(len(r.failed) for r in results)
    if failed:
        raise FusionerError(f"{failed} runs failed; see their error.txt files and {sweep.dir / 'runs.jsonl'}")


def cmd_sweep_report(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.sweep import write_report

    for path in write_report(args.dir):
        print(path)


def cmd_push(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.hub import push

    result = push(args.run_dir, args.repo_id, private=args.private)
    print(f"pushed {', '.join(result.files)} to {result.url}")


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> None:
    if extra:
        raise FusionerError(f"unexpected arguments: {' '.join(extra)}")
    try:
        from fusioner.demo import export_space, launch
    except ModuleNotFoundError as e:
        raise FusionerError(f"the demo needs {e.name}: pip install 'fusioner[demo]'") from None
    if args.export_space:
        for path in export_space(Path(args.export_space), args.model):
            print(path)
        return
    launch(args.model, port=args.port, host=args.host)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusioner",
        description="Open-vocabulary segmentation from frozen vision and language models. Commands that "
        "read a config also take key=value (or --key value) overrides of any config key.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a fusion head (config + key=value overrides)")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("cache", help="fill the frozen-feature cache ahead of training")
    p.add_argument("--config", required=True)
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("eval", help="evaluate a trained model; writes metrics.json")
    p.add_argument("--model", required=True, help="run directory, model folder or Hub repo id")
    p.add_argument("--config", help="dataset config (default: the run's own config.yaml)")
    p.add_argument("--out", help="where to write metrics.json (default: beside the model)")
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

    p = sub.add_parser("demo", help="a web page (Gradio) to segment uploaded photos with typed names")
    p.add_argument("--model", help="run directory, model folder or Hub repo id (without: a page says how)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument(
        "--export-space", metavar="DIR", help="write a Hugging Face Space folder for --model; serve nothing"
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
        args.fn(args, extra)
    except FusionerError as e:
        print(f"fusioner {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
