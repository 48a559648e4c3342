"""``pairfree serve``: a web page that captions an uploaded image with a checkpoint, its
decoding settings adjustable; for a world checkpoint, a button draws a random scene of the
world to caption (with the scene's truth beside the caption).

Built with gradio (``pip install 'pairfree[serve]'``); served on 127.0.0.1 unless told
otherwise.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from pairfree.demo.report import describe
from pairfree.errors import PairfreeError
from pairfree.pipeline import Captioner


def build_app(captioner: Captioner, *, seed: int = 0) -> Any:
    """The gradio app of ``captioner``."""
    try:
        import gradio as gr
    except ImportError as err:
        raise PairfreeError("pairfree serve needs gradio: pip install 'pairfree[serve]'") from err
    lock = threading.Lock()  # one caption at a time: the settings are the captioner's
    default = captioner.generation
    card = captioner.card
    world = card is not None and card.clip.startswith("world:")
    rng = np.random.default_rng(seed)

    def caption(image: Image.Image | None, beams: float, max_tokens: float) -> str:
        if image is None:
            return "(upload an image first)"
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
            image = gr.Image(type="pil", label="image", elem_id="image")
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
    return app
