"""Issue 21, WEAK cases: a one-line message where a traceback was, or a bound where none was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from faultcases.common import BIN, ENV, Base, Ran, Row, case, mentions, message, run, snapshot, voc_image


@case("21.W", "Ctrl-C during training")
def ctrl_c(base: Base, d: Path) -> Row:
    out = d / "run"
    config = base.write_config(
        d / "c.yaml", out_dir=str(out), max_steps=400, epochs=1000, checkpoint_every=1000
    )
    proc = subprocess.Popen(
        [str(BIN / "fusioner"), "train", "--config", str(config)],
        cwd=d, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "losses.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the training loop
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    stdout, stderr = proc.communicate(timeout=120)
    ran = Ran(["fusioner", "train"], proc.returncode, stdout, stderr)
    msg = message(ran, r"fusioner train: interrupted")
    traceback = "Traceback" in stderr
    return Row(
        "21.W",
        "",
        "`fusioner train` (400 steps), SIGINT once losses.jsonl appears",
        ran.rc,
        130,
        msg,
        mentions(msg, ["interrupted"]),
        not traceback and (out / "config.yaml").is_file(),
        f"no traceback printed: {not traceback}; the run's config.yaml kept (`--resume` continues)",
    )


@case("21.W", "a read-only out_dir")
def read_only_out_dir(base: Base, d: Path) -> Row:
    config = base.write_config(d / "c.yaml", out_dir="/sys/fusioner-run")  # EPERM, even for root
    ran = run(["fusioner", "train", "--config", str(config)], d)
    msg = message(ran)
    return Row(
        "21.W",
        "",
        "`fusioner train out_dir=/sys/fusioner-run` (a folder the system refuses to create)",
        ran.rc,
        2,
        msg,
        mentions(msg, ["cannot write", "/sys/fusioner-run"]),
        "Traceback" not in ran.err,
        "one line, no traceback",
    )


@case("21.W", "vision_weights=/etc/passwd")
def passwd_weights(base: Base, d: Path) -> Row:
    config = base.write_config(d / "c.yaml", out_dir=str(d / "run"), vision_weights="/etc/passwd")
    ran = run(["fusioner", "train", "--config", str(config)], d)
    msg = message(ran)
    # The backbone loads after the run folder is claimed: it holds config.yaml and the run's marker,
    # and training again with real weights into it must just work.
    left = sorted(p.name for p in (d / "run").iterdir()) if (d / "run").is_dir() else []
    again = run(
        ["fusioner", "train", "--config", str(base.write_config(d / "c2.yaml", out_dir=str(d / "run")))], d
    )
    return Row(
        "21.W",
        "",
        "`fusioner train vision_weights=/etc/passwd`, then the same without it",
        ran.rc,
        2,
        msg,
        mentions(msg, ["/etc/passwd", "cannot read"]),
        "Traceback" not in ran.err and again.rc == 0,
        f"one line, no traceback; RUN held {', '.join(left)}; training again into it: exit {again.rc}",
    )


@case("21.W", "train with a data_path that does not exist")
def data_first(base: Base, d: Path) -> Row:
    config = base.write_config(d / "c.yaml", out_dir=str(d / "run"), data_path=str(d / "nowhere"))
    ran = run(["fusioner", "train", "--config", str(config)], d)
    msg = message(ran)
    return Row(
        "21.W",
        "",
        "`fusioner train data_path=$T/nowhere out_dir=RUN` (RUN new)",
        ran.rc,
        2,
        msg,
        mentions(msg, [str(d / "nowhere")]),
        not (d / "run").exists(),
        "RUN not created (no config.yaml, no run.lock before the data is found)",
    )


@case("21.W", "an upper-case masks/x.PNG")
def upper_case_mask(base: Base, d: Path) -> Row:
    data = base.copy_data(d / "data")
    mask = data / "masks" / f"{base.train_ids[0]}.png"
    mask.rename(mask.with_suffix(".PNG"))
    config = base.write_config(d / "c.yaml", data_path=str(data), cache_dir=str(d / "cache"))
    ran = run(["fusioner", "cache", "--config", str(config)], d)
    msg = message(ran, r"train: \d+ images cached")
    return Row(
        "21.W",
        "",
        f"masks/{base.train_ids[0]}.png renamed to .PNG, then `fusioner cache`",
        ran.rc,
        0,
        msg,
        mentions(msg, [f"train: {len(base.train_ids)} images"]),
        mask.with_suffix(".PNG").is_file(),
        "the .PNG mask paired and read (every train image cached)",
    )


@case("21.W", "a 10,000-run sweep file")
def big_sweep(base: Base, d: Path) -> Row:
    sweep = d / "s.yaml"
    lrs = ", ".join(f"{0.001 + i * 1e-5:.5f}" for i in range(100))
    sweep.write_text(
        f"dataset: folder\ndata_path: {base.data}\nunseen_classes: [cow, sheep]\npreset: tiny\n"
        f"out_dir: {d / 'sweep'}\nlr: [{lrs}]\nseed: [{', '.join(map(str, range(100)))}]\n"
    )
    snippet = (
        "import time; from fusioner.sweep import load_sweep\n"
        f"t = time.process_time(); s = load_sweep({str(sweep)!r})\n"
        "print(f'expanded {len(s.runs)} runs in {time.process_time() - t:.1f} s CPU')\n"
    )
    ran = run([sys.executable, "-c", snippet], d)
    msg = message(ran, r"expanded \d+ runs in [\d.]+ s CPU")
    seconds = float(msg.split(" in ")[1].split()[0]) if msg else float("inf")
    return Row(
        "21.W",
        "",
        "`load_sweep` of 100 lr x 100 seeds (what `fusioner sweep` does before its first run)",
        ran.rc,
        0,
        msg,
        mentions(msg, ["10000 runs"]),
        seconds < 30,
        "bound: under 30 s CPU (was 74 s wall before the config types were cached); status.json after "
        "each run re-reads one run, all runs only every 30x the cost of a full read",
    )


@case("21.W", "predict with names differing only in case")
def case_twins(base: Base, d: Path) -> Row:
    out = d / "out"
    image = str(voc_image("sample_0000"))
    argv = ["fusioner", "predict", image, "--model", str(base.run), "--out", str(out)]
    ran = run([*argv, "--classes", "Cat,dog,cat"], d)
    msg = message(ran)
    return Row(
        "21.W",
        "",
        '`fusioner predict IMG --classes "Cat,dog,cat"`',
        ran.rc,
        2,
        msg,
        mentions(msg, ["duplicate", "Cat, cat"]),
        not out.exists() or not any(out.iterdir()),
        "nothing written",
    )


@case("21.W", "predict on a symlinked input")
def symlinked_input(base: Base, d: Path) -> Row:
    link = d / "photo.jpg"
    os.symlink(voc_image("sample_0000"), link)
    out = d / "out"
    argv = ["fusioner", "predict", str(link), "--model", str(base.run), "--out", str(out)]
    ran = run([*argv, "--classes", "cat,dog"], d)
    msg = message(ran, r"\S+_labels\.png")
    written = sorted(snapshot(out)) if out.is_dir() else []
    return Row(
        "21.W",
        "",
        "`fusioner predict photo.jpg` where photo.jpg -> sample_0000.jpg",
        ran.rc,
        0,
        msg,
        mentions(msg, ["photo_labels.png"]),
        "photo_labels.png" in written,
        f"written: {', '.join(w for w in written if w.endswith('_labels.png'))}",
    )
