"""What each ``fusioner`` command does: read its options and overrides, call the library, print.

Each ``cmd_<name>(args, extra)`` imports what it uses when it runs, so ``fusioner --help`` stays
fast; fusioner/cli.py holds the parser that routes to them and turns errors into one line.
"""

from __future__ import annotations

import argparse
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

    config = load_config(args.config, _overrides(extra), check_paths=True)
    result = train(config, resume=args.resume)
    if process_state().is_main_process:  # under a launcher every process returns here
        print(f"trained {result.steps} steps; model in {result.out_dir / 'model'}")


def cmd_cache(args: argparse.Namespace, extra: list[str]) -> None:
    import torch

    from fusioner.adapters import create_vision
    from fusioner.config import load_config
    from fusioner.data import build_split
    from fusioner.engine.cache import prepare_cache
    from fusioner.model.seeding import seeded_backbones

    config = load_config(args.config, _overrides(extra), check_paths=True)
    with seeded_backbones(config.seed, config.vision_weights):  # random weights: the run's backbone
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
    from fusioner.metrics_file import Metrics

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


def _refuse_extra(extra: list[str]) -> None:
    """Commands without config overrides name what they did not understand (exit 2), never ignore it."""
    if extra:
        options = [e for e in extra if e.startswith("-")]
        what = (
            f"unknown option(s): {' '.join(options)}"
            if options
            else f"unexpected arguments: {' '.join(extra)}"
        )
        raise FusionerError(what)


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.inputs import parse_names
    from fusioner.predict import predict_images

    _refuse_extra(extra)
    names = parse_names(args.classes, "--classes")
    if args.onnx:
        from fusioner.export import predict_onnx

        settings = {"--threshold": args.threshold, "--mode": args.mode, "--seen-bias": args.seen_bias}
        settings |= {"--refine": args.refine, "--inference": args.inference}
        if given := [flag for flag, value in settings.items() if value is not None]:
            raise FusionerError(
                f"{', '.join(given)} go with --model; --onnx answers with the export's settings"
            )
        written = predict_onnx(args.onnx, args.images, names, Path(args.out))
    else:
        written = predict_images(
            args.model, args.images, names, Path(args.out), threshold=args.threshold,
            mode=args.mode or "best-name", seen_bias=args.seen_bias, refine=args.refine or "",
            inference=args.inference or "fixed",
        )  # fmt: skip
    for path in written:
        print(path)


def cmd_export(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.export import export_onnx

    _refuse_extra(extra)
    names = [n.strip() for n in (args.classes or "").split(",") if n.strip()]
    from fusioner.progress import step

    with step(f"exporting {args.model} to ONNX in {args.out} (about a minute with real backbones)"):
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

    _refuse_extra(extra)
    for path in write_report(args.dir):
        print(path)


def cmd_push(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.hub import push

    _refuse_extra(extra)
    result = push(args.run_dir, args.repo_id, private=args.private)
    print(f"pushed {', '.join(result.files)} to {result.url}")


def cmd_import_released(args: argparse.Namespace, extra: list[str]) -> None:
    from fusioner.model.released_import import import_released

    _refuse_extra(extra)
    out = import_released(
        args.checkpoint, vision=args.vision, text=args.text, out=args.out, heads=args.heads,
        temperature=args.temperature, templates=args.templates, image_size=args.image_size,
        vision_weights=args.vision_weights, text_weights=args.text_weights, config=args.config,
    )  # fmt: skip
    print(f"imported {args.checkpoint} as a fusioner run in {out} (model in {out / 'model'})")


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> None:
    _refuse_extra(extra)
    try:
        from fusioner.demo import export_space, launch
    except ModuleNotFoundError as e:
        raise FusionerError(f"the demo needs {e.name}: pip install 'fusioner[demo]'") from None
    if args.export_space:
        from fusioner.progress import step

        with step(f"writing the Space folder {args.export_space}"):
            written = export_space(Path(args.export_space), args.model)
        for path in written:
            print(path)
        return
    launch(args.model, port=args.port, host=args.host, share=args.share)
