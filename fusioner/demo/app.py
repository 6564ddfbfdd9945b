"""The Gradio page: one model, loaded once when the app is built; :func:`segment` per request.

Every user mistake (no image, a file that is not an image, no / duplicate / too many names) is a
``gr.Error``: a message in the page (and an ``AppError`` for API clients), never a traceback, and
the server keeps serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image, ImageOps

from fusioner.demo.segment import (
    Calibration,
    Settings,
    parse_names,
    read_calibration,
    refiner_name,
    segment,
)
from fusioner.errors import FusionerError
from fusioner.inference import MODES
from fusioner.methods import REFINERS
from fusioner.model import FusionerModel

# Beside a checkout (../shared/data/ccp, see README): real street photos to try; absent in a Space.
CCP_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "ccp" / "images"
CCP_EXAMPLES = (("0001.jpg", "skin, hair, shirt, jeans, shoes"), ("0002.jpg", "skin, hair, dress, bag"))
API_NAME = "segment"

NO_MODEL = """\
# fusioner demo: no model loaded

Start the demo with a trained model: a run directory, a model folder or a Hugging Face Hub id.

```bash
fusioner quickstart --out runs/quickstart            # trains one offline, about 10 minutes on 2 CPU cores
fusioner demo --model runs/quickstart/runs/fusioner
fusioner demo --model alice/fusioner-dino-bert       # or any model pushed with `fusioner push`
```

`fusioner demo` without `--model` trains nothing; in a Hugging Face Space, set the variable
`FUSIONER_MODEL` to a Hub id.
"""


def open_upload(payload: dict[str, Any] | None) -> Image.Image:
    """The image component's raw payload (the event runs with ``preprocess=False``) -> an RGB image.

    Gradio's own decoding would turn a file that is not an image into a generic processing error,
    and a subclass of gr.Image makes Gradio write a .pyi file beside this module; so the file is
    opened here, with the message the page should show.
    """
    if not payload or not payload.get("path"):
        raise gr.Error("upload an image (or pick an example) first")
    name = payload.get("orig_name") or Path(payload["path"]).name
    try:
        with Image.open(payload["path"]) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # phone photos: upright, as shown
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise gr.Error(f"{name} is not an image fusioner can read ({type(e).__name__})") from None


def default_examples() -> list[list[str]]:
    """The CCP photos and names of CCP_EXAMPLES that exist here; none elsewhere."""
    return [[str(CCP_IMAGES / f), names] for f, names in CCP_EXAMPLES if (CCP_IMAGES / f).is_file()]


def load_model(source: str) -> FusionerModel:
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
    # Cached outputs (overlays, heat maps) are deleted after an hour, checked every hour. No analytics:
    # the demo sends nothing to Gradio's servers (and works offline).
    with gr.Blocks(title="fusioner demo", delete_cache=(3600, 3600), analytics_enabled=False) as app:
        gr.Markdown(_header(model, model_source, calibration))
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    label="image", type="filepath", sources=["upload", "clipboard"], elem_id="image"
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
                    label="overlay", type="pil", format="png", interactive=False, elem_id="overlay"
                )
                legend = gr.HTML(label="legend", elem_id="legend")
                shares = gr.Dataframe(
                    headers=["name", "pixels (%)", "max probability"],
                    datatype=["str", "number", "number"],
                    label="pixel share",
                    elem_id="shares",
                    interactive=False,
                )
        heatmaps = gr.Gallery(
            label="each name's probability", columns=4, object_fit="contain", elem_id="heatmaps"
        )
        labels = gr.Image(
            label="label map (pixel value i = the i-th name, 0 = background)",
            type="numpy",
            image_mode="L",
            format="png",
            interactive=False,
            elem_id="labels",
            height=240,
        )

        # The parameter names are the API's (gradio_client: predict(image, names, threshold, ...)); a new
        # control is a Settings field, a component in _controls and a parameter here, in that order.
        def run(
            image: dict[str, Any] | None,
            names: str,
            threshold: float,
            seen_bias: float,
            mode: str,
            refine: str = "",
        ) -> tuple[Any, ...]:
            photo = open_upload(image)
            try:
                settings = Settings(float(threshold), float(seen_bias), mode, refine)
                result = segment(model, photo, parse_names(names), settings, calibration)
            except FusionerError as e:
                raise gr.Error(str(e)) from None
            return (
                result.overlay(),
                result.legend_html(),
                result.heatmaps(),
                result.shares(),
                result.labels,
                result.status(),
            )

        inputs = [image, names, *controls]
        outputs = [picture, legend, heatmaps, shares, labels, status]
        button.click(run, inputs, outputs, api_name=API_NAME, preprocess=False)
        names.submit(run, inputs, outputs, api_name=False, preprocess=False)  # Enter: the same request
    return app


def _controls(model: FusionerModel, calibration: Calibration | None) -> list[gr.components.Component]:
    """One component per :class:`Settings` field, in its order."""
    threshold = gr.Slider(
        0.05, 0.95, value=model.threshold, step=0.05, label="threshold (a pixel's best name)"
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
        label="refinement (spectral: SAZS eigen-segments of the patch tokens, training-free)",
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


def launch(model_source: str | None, *, port: int = 7860, host: str = "127.0.0.1") -> None:
    """Build the app and serve it until interrupted (the command behind `fusioner demo`)."""
    app = build_app(model_source)
    # show_error: an unexpected exception's message (not its traceback) reaches the page.
    app.launch(server_name=host, server_port=port, show_error=True)
