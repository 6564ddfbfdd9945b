"""benchmarks/gpu.py runs as is on a CPU at toy sizes, so its first GPU run is not its first run."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny", "--threads", "1",
           "--no-record", "--json", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())
    train = [r for r in rows if r["part"] == "train"]
    infer = [r for r in rows if r["part"] == "infer"]
    sdpa = [r for r in rows if r["part"] == "sdpa"]
    # every (backbone, head, batch, precision) trained, both heads, both precisions, no failure
    assert {(r["head"], r["precision"], r["batch"]) for r in train} == {
        (h, p, b) for h in ("paper", "default") for p in ("fp32", "bf16") for b in (1, 2)
    }
    assert all(
        "status" not in r and r["steps_s"] > 0 and r["images_s"] == r["steps_s"] * r["batch"] for r in train
    )
    assert {r["k"] for r in infer} == {1, 20} and all("status" not in r and r["ratio"] > 0 for r in infer)
    assert all(r.get("kernel") and "none matched" not in r["kernel"] for r in sdpa), sdpa
    assert "GPU: training, inference" in result.stdout and "SDPA kernel" in result.stdout
