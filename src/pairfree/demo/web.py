"""``pairfree serve``: a web page that captions an uploaded image with a checkpoint, its
decoding settings adjustable; for a world checkpoint, a button draws a random scene of the
world to caption (with the scene's truth beside the caption).

Built with gradio (``pip install 'pairfree[serve]'``); served on 127.0.0.1 unless told
otherwise.

Bad uploads are answered, never crashed on: the upload is decoded by pairfree's own
:func:`~pairfree.data.load_image` (not gradio's), so a file that is not an image, a
decompression bomb, an image over ``PAIRFREE_MAX_IMAGE_PIXELS`` or a sliver gets one line
naming it, and animated or 16-bit images caption as every command reads them. Captions run one
at a time; at most ``queue_size`` requests wait, and the ones beyond are refused at once (HTTP
503, "Queue is full") rather than piling up; an upload over ``max_upload_mb`` gets HTTP 413.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pairfree.data import load_image
from pairfree.data.images import max_image_pixels
from pairfree.demo.report import describe
from pairfree.errors import BadInputError, PairfreeError
from pairfree.pipeline import Captioner

QUEUE_SIZE = 8  # requests waiting for the captioner; beyond it, HTTP 503 at once
MAX_UPLOAD_MB = 20


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError as err:
        raise PairfreeError("pairfree serve needs gradio: pip install 'pairfree[serve]'") from err
    return gr


def _undecoded(gr: Any, box: Any) -> Any:
    """``box`` (a ``gr.Image``) handing over the uploaded file's path undecoded: gradio's own
    preprocessing opens it with PIL, so a file that is not an image would end in gradio's
    traceback instead of pairfree's one line (and under none of pairfree's limits). Set on the
    instance: a subclass of a gradio component makes gradio write a ``.pyi`` beside this file."""

    def preprocess(payload: Any) -> str | None:
        if payload is None:
            return None
        if payload.path is None:  # a data: URL from an API client
            raise gr.Error("send the image as a file upload", print_exception=False)
        return str(payload.path)  # gradio has checked it is one of its own uploads

    box.preprocess = preprocess
    return box


def build_app(captioner: Captioner, *, seed: int = 0, queue_size: int = QUEUE_SIZE) -> Any:
    """The gradio app of ``captioner``: captions one at a time, ``queue_size`` waiting."""
    gr = _gradio()
    max_image_pixels()  # a bad PAIRFREE_MAX_IMAGE_PIXELS is refused now, not at an upload
    lock = threading.Lock()  # one caption at a time: the settings are the captioner's
    default = captioner.generation
    card = captioner.card
    world = card is not None and card.clip.startswith("world:")
    rng = np.random.default_rng(seed)

    def caption(image: str | Image.Image | None, beams: float, max_tokens: float) -> str:
        if image is None:
            return "(upload an image first)"
        if not isinstance(image, Image.Image):  # an upload; a drawn scene is already a picture
            try:
                image = load_image(image)
            except BadInputError as err:  # named as uploaded, not by gradio's temporary path
                name = Path(image).name
                reason = err.reason.replace(str(image), name)
                raise gr.Error(f"{name}: {reason}", print_exception=False) from None
        with lock:
            captioner.generation = replace(default, num_beams=int(beams),
                                           max_new_tokens=int(max_tokens))  # fmt: skip
            try:
                return captioner(image)
            finally:
                captioner.generation = default

    def random_scene() -> tuple[Image.Image, str]:
        from pairfree.world.render import render_scene
        from pairfree.world.variants import world_preset

        config = world_preset("default")
        scene = config.sample_scene(rng)
        return render_scene(scene, rng, size=config.image_size), describe(scene)

    title = "pairfree captioner" + (f" ({card.recipe}, CLIP {card.clip})" if card else "")
    with gr.Blocks(title="pairfree") as app:
        gr.Markdown(f"# {title}\nUpload an image (or draw a world scene) and caption it.")
        with gr.Row():
            image = _undecoded(gr, gr.Image(type="filepath", label="image", elem_id="image"))
            with gr.Column():
                beams = gr.Slider(1, 10, value=default.num_beams, step=1, label="beams")
                max_tokens = gr.Slider(1, 100, value=default.max_new_tokens, step=1,
                                       label="max new tokens")  # fmt: skip
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                text = gr.Textbox(label="caption", elem_id="caption", interactive=False)
                if world:
                    scene_button = gr.Button("Random world scene", elem_id="scene-button")
                    truth = gr.Textbox(label="true scene", elem_id="truth", interactive=False)
        button.click(caption, [image, beams, max_tokens], text)
        if world:
            scene_button.click(random_scene, None, [image, truth]).then(
                caption, [image, beams, max_tokens], text
            )
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    return app


def launch(
    app: Any, host: str, port: int, *, max_upload_mb: int = MAX_UPLOAD_MB, block: bool = True
) -> None:
    """Serve ``app`` on ``host:port``, uploads over ``max_upload_mb`` refused (HTTP 413);
    ``block=False`` returns once it listens (tests)."""
    app.launch(server_name=host, server_port=port, show_error=True, quiet=not block,
               max_file_size=f"{max_upload_mb}mb", prevent_thread_lock=not block)  # fmt: skip
