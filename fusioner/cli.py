"""`fusioner` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fusioner.errors import FusionerError


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
    from fusioner.engine.train import train

    config = load_config(args.config, _overrides(extra))
    result = train(config, resume=args.resume)
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

    out = evaluate_model(args.model, args.config, _overrides(extra), out=args.out)
    print(f"{Metrics.read(out).line()}\nwrote {out}")


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.predict import predict_images

    names = [n.strip() for n in args.classes.split(",") if n.strip()]
    for path in predict_images(args.model, args.images, names, Path(args.out)):
        print(path)


def cmd_quickstart(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.quickstart import quickstart

    report = quickstart(Path(args.out), seed=args.seed, fast=args.fast, overrides=_overrides(extra))
    print(report.summary())


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.sweep import load_sweep, parse_shard, run_sweep

    sweep = load_sweep(args.config, _overrides(extra), out=args.out)
    index, count = parse_shard(args.shard)
    runs = sweep.shard(index, count)
    print(f"sweep {sweep.dir}: shard {index}/{count} holds {len(runs)} of {len(sweep.runs)} runs")
    result = run_sweep(sweep, shard=(index, count), on_outcome=lambda o: print(o.line(), flush=True))
    print(result.summary())
    if result.failed:
        log_file = sweep.dir / "runs.jsonl"
        raise FusionerError(f"{len(result.failed)} runs failed; see their error.txt files and {log_file}")


def cmd_sweep_report(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.sweep import write_report

    for path in write_report(args.dir):
        print(path)


def cmd_push(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.hub import push

    result = push(args.run_dir, args.repo_id, private=args.private)
    print(f"pushed {', '.join(result.files)} to {result.url}")


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
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("predict", help="segment your own images with your own class names")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--classes", required=True, help='comma-separated names, e.g. "cat,dog,grass"')
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("quickstart", help="offline demo: train on pictograms, segment names never seen")
    p.add_argument("--out", required=True, help="output folder for the data, runs and report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a tiny setting that only checks the pipeline (CI)")
    p.set_defaults(fn=cmd_quickstart)

    p = sub.add_parser("sweep", help="train and evaluate every run of a sweep file (lists are axes)")
    p.add_argument("--config", required=True, help="sweep file, e.g. configs/sweeps/offline.yaml")
    p.add_argument("--shard", help="i/n: run every n-th run starting at i (n machines share a sweep)")
    p.add_argument("--out", help="sweep directory (default: the sweep file's out_dir)")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("sweep-report", help="results.csv, results.md and heatmap.png of a sweep directory")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_sweep_report)

    p = sub.add_parser("push", help="upload a trained run's head, config.json and a model card to the Hub")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="namespace/name on the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(fn=cmd_push)
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
