"""The Gradio page: one model, loaded once when the app is built; :func:`segment` per request.

Every user mistake (no image, a file that is not an image, no / duplicate / too many names) is one
message: in the page, it replaces the previous result (nothing stale stays on screen); for API
clients (``/segment``) it is a ``gr.Error`` (an ``AppError`` in gradio_client). The server logs one
line per mistake, never a traceback, and keeps serving.
"""

from __future__ import annotations

import html
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from fusioner.demo.segment import (
    PRESETS,
    Calibration,
    Segmentation,
    Settings,
    parse_names,
    preset_names,
    read_calibration,
    refiner_name,
    segment,
)
from fusioner.errors import FusionerError
from fusioner.inference import MODES
from fusioner.inputs import to_rgb_array
from fusioner.methods import REFINERS
from fusioner.model import FusionerModel
from fusioner.progress import step

# Beside a checkout (../shared/data/ccp, see README): real street photos to try; absent in a Space.
CCP_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "ccp" / "images"
CCP_EXAMPLES = (("0001.jpg", "skin, hair, shirt, jeans, shoes"), ("0002.jpg", "skin, hair, dress, bag"))
API_NAME = "segment"
log = logging.getLogger("fusioner.demo")
KEEP_DOWNLOADS = 32  # raw label maps kept for download; older ones are deleted

NO_MODEL = """\
# fusioner demo: no model loaded

Start the demo with a trained model: a run directory, a model folder or a Hugging Face Hub id.

```bash
fusioner quickstart --out runs/quickstart            # trains one offline, about 5 minutes on 2 CPU cores
fusioner demo --model runs/quickstart/runs/fusioner
fusioner demo --model NAMESPACE/NAME                 # a model you pushed with `fusioner push`
```

The quickstart's model knows pictograms (animals, objects, plants drawn as emoji), not photos of
people or streets: for photos, train on them (`fusioner train --config configs/folder/ccp.yaml`).

`fusioner demo` without `--model` trains nothing; in a Hugging Face Space, set the variable
`FUSIONER_MODEL` to a Hub id.
"""


def open_upload(payload: dict[str, Any] | None) -> Image.Image:
    """The image component's raw payload (the event runs with ``preprocess=False``) -> an RGB image.

    Gradio's own decoding would turn a file that is not an image into a generic processing error,
    and a subclass of gr.Image makes Gradio write a .pyi file beside this module; so the file is
    opened here, with the message the page should show.
    """
    if not isinstance(payload, dict) or not payload.get("path"):
        raise FusionerError("upload an image (or pick an example) first")
    name = payload.get("orig_name") or Path(payload["path"]).name
    try:
        with Image.open(payload["path"]) as image:
            # The one reader of fusioner.inputs: upright (EXIF), 16-bit scaled, as predict and training.
            return Image.fromarray(to_rgb_array(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FusionerError(f"{name} is not an image fusioner can read ({type(e).__name__})") from None


def default_examples() -> list[list[str]]:
    """The CCP photos and names of CCP_EXAMPLES that exist here; none elsewhere."""
    return [[str(CCP_IMAGES / f), names] for f, names in CCP_EXAMPLES if (CCP_IMAGES / f).is_file()]


def load_model(source: str) -> FusionerModel:
    with step(f"loading model {source}"):  # 15-30 s with real backbones: say so on the console
        model = FusionerModel.from_pretrained(source)
    return model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu")).eval()


def build_app(model_source: str | None, *, examples: Sequence[Sequence[str]] | None = None) -> gr.Blocks:
    """The demo page for ``model_source`` (run directory, model folder or Hub id), loaded once here.

    ``None`` gives a page that explains how to get a model. ``examples``: ``[image path, names]``
    rows (default: :func:`default_examples`).
    """
    if model_source is None:
        with gr.Blocks(title="fusioner demo", analytics_enabled=False) as page:
            gr.Markdown(NO_MODEL)
        return page
    model = load_model(model_source)
    calibration = read_calibration(model_source)
    examples = default_examples() if examples is None else [list(row) for row in examples]
    downloads = Downloads()
    # Cached outputs (overlays, heat maps) are deleted after an hour, checked every hour. No analytics:
    # the demo sends nothing to Gradio's servers (and works offline).
    with gr.Blocks(title="fusioner demo", delete_cache=(3600, 3600), analytics_enabled=False) as app:
        gr.Markdown(_header(model, model_source, calibration))
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    label="image", type="filepath", sources=["upload", "clipboard"], elem_id="image"
                )
                preset = gr.Dropdown(
                    ["", *PRESETS],
                    value="",
                    label="vocabulary preset (fills the names: a benchmark's full list)",
                    elem_id="preset",
                )
                names = gr.Textbox(
                    label="names (comma-separated)", placeholder="skin, hair, jeans, shoes", max_lines=3
                )
                controls = _controls(model, calibration)
                button = gr.Button("Segment", variant="primary")
                if examples:
                    gr.Examples(examples, inputs=[image, names], label="CCP street photos")
            with gr.Column():
                status = gr.Markdown(label="status", elem_id="status")
                picture = gr.Image(
                    label="overlay (names written on their regions)", type="pil", format="png",
                    interactive=False, elem_id="overlay",
                )  # fmt: skip
                legend = gr.HTML(label="legend", elem_id="legend")
                shares = gr.Dataframe(
                    headers=["name", "pixels (%)", "max probability"],
                    datatype=["str", "number", "number"],
                    label="pixel share",
                    elem_id="shares",
                    interactive=False,
                )
        # height "auto": every row of thumbnails shows; a fixed height clipped the second row.
        heatmaps = gr.Gallery(
            label="each name's probability",
            columns=4,
            object_fit="contain",
            height="auto",
            elem_id="heatmaps",
        )
        with gr.Row():
            labels = gr.Image(
                label="label map (the legend's colours)", type="pil", format="png", interactive=False,
                elem_id="labels", height=240,
            )  # fmt: skip
            raw = gr.File(
                label="raw label map (PNG: pixel value i = the i-th name, 0 = background)", elem_id="raw"
            )

        def answer(image: Any, names: str, threshold: Any, seen_bias: Any, mode: Any, refine: Any) -> tuple:
            photo = open_upload(image)
            settings = Settings(
                _number("threshold", threshold), _number("seen_bias", seen_bias), mode, refine
            )
            result = segment(model, photo, parse_names(names), settings, calibration)
            return _outputs(result, downloads)

        # The parameter names are the API's (gradio_client: predict(image, names, threshold, ...)); a new
        # control is a Settings field, a component in _controls and a parameter here, in that order.
        def run(
            image: dict[str, Any] | None,
            names: str,
            threshold: float = model.threshold,
            seen_bias: float = calibration.seen_bias if calibration else 0.0,
            mode: str = "fixed",
            refine: str = "",
        ) -> tuple[Any, ...]:
            """The API: a mistake is a gr.Error (gradio_client raises it as AppError)."""
            try:
                return answer(image, names, threshold, seen_bias, mode, refine)
            except FusionerError as e:
                log.warning("demo: refused a request: %s", e)  # one line, no traceback
                raise gr.Error(str(e), print_exception=False) from None

        def run_page(*inputs: Any) -> tuple[Any, ...]:
            """The page: a mistake replaces the previous result with one message in the status."""
            try:
                return answer(*inputs)
            except FusionerError as e:
                log.warning("demo: refused a request: %s", e)
                message = f'<span style="color:#b91c1c">&#9888; {html.escape(str(e))}</span>'
                return (None, "", [], None, None, None, message)

        inputs = [image, names, *controls]
        outputs = [picture, legend, heatmaps, shares, labels, raw, status]
        button.click(run_page, inputs, outputs, api_name=False, preprocess=False)
        names.submit(run_page, inputs, outputs, api_name=False, preprocess=False)  # Enter: the same
        # The API endpoint: the same request behind a button the page does not show.
        api = gr.Button(visible=False)
        api.click(run, inputs, outputs, api_name=API_NAME, preprocess=False)
        preset.change(
            lambda label: preset_names(label) if label else gr.skip(), preset, names, api_name=False
        )
    return app


class Downloads:
    """The raw label maps offered for download: files in a folder of this app, the oldest deleted
    once more than KEEP_DOWNLOADS exist (Gradio serves its own copy, cached for an hour)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fusioner-demo-"))
        self.count = 0

    def save(self, result: Segmentation) -> str:
        self.count += 1
        path = result.save_raw_labels(self.dir / f"labels-{self.count:06d}.png")
        for old in sorted(self.dir.glob("labels-*.png"))[:-KEEP_DOWNLOADS]:
            old.unlink(missing_ok=True)
        return str(path)


def _outputs(result: Segmentation, downloads: Downloads) -> tuple[Any, ...]:
    return (
        result.overlay(),
        result.legend_html(),
        result.heatmaps(),
        result.shares(),
        result.label_picture(),
        downloads.save(result),
        result.status(),
    )


def _number(key: str, value: Any) -> float:
    """A control's value as a float; API clients may send text ("abc") or nothing."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise FusionerError(f"{key} must be a number, got {value!r}") from None


def _controls(model: FusionerModel, calibration: Calibration | None) -> list[gr.components.Component]:
    """One component per :class:`Settings` field, in its order."""
    threshold = gr.Slider(
        0.05,
        0.95,
        value=model.threshold,
        step=0.05,
        label="threshold (a pixel's best name)",
        elem_id="threshold",
    )
    bias = calibration.seen_bias if calibration else 0.0
    seen_bias = gr.Slider(
        0.0,
        max(4.0, 2 * bias),
        value=bias,
        step=0.1,
        label="GZSS calibration: seen_bias subtracted from the logits of names seen in training",
        visible=calibration is not None,
    )
    mode = gr.Radio(list(MODES), value="fixed", label="inference (fixed: resized; sliding: windows)")
    refine = gr.Radio(
        list(REFINERS),
        value=refiner_name(model),
        label=(
            "refinement, training-free (spectral: logits blended with eigen-segments of the patch tokens; "
            "sazs: each name's mask swapped for the eigen-mask that best matches it)"
        ),
    )
    return [threshold, seen_bias, mode, refine]


def _header(model: FusionerModel, source: str, calibration: Calibration | None) -> str:
    lines = [
        "# fusioner: open-vocabulary segmentation",
        f"Model `{source}`: frozen `{model.vision.name}` + `{model.text.name}`, fusion head at "
        f"{model.image_size} px. Upload a photo, type any names, press Segment.",
    ]
    if calibration:
        lines.append(
            f"Calibration from the run's metrics.json: {len(calibration.seen)} names were seen in training, "
            f"seen_bias {calibration.seen_bias:g} chosen on val."
        )
    return "\n\n".join(lines)


def launch(
    model_source: str | None, *, port: int = 7860, host: str = "127.0.0.1", share: bool = False
) -> None:
    """Build the app and serve it until interrupted (the command behind `fusioner demo`).

    ``share``: also serve through a temporary public gradio.live link (Gradio's tunnel; needs internet).
    """
    app = build_app(model_source)
    # show_error: an unexpected exception's message (not its traceback) reaches the page.
    app.launch(server_name=host, server_port=port, show_error=True, share=share)
