"""`pairfree serve` in a real browser: the page is served on 127.0.0.1, headless Chromium
(driven by playwright, the system's chromium) uploads an image and reads the caption back;
the world's "random world scene" button draws a scene and captions it."""

from __future__ import annotations

import re
import shutil
import socket

import pytest

from pairfree.cli import main
from pairfree.pipeline import Captioner

gradio = pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pairfree.world import make_world
    from pairfree.world.lm import build_world_lm

    root = tmp_path_factory.mktemp("serve")
    world = make_world(root / "world", n_train_images=0, n_val=0, n_test=2, n_corpus=32, seed=2)
    lm = build_world_lm(root / "lm", n_layer=1, n_embd=32, n_head=2)
    out = root / "run"
    assert main(["train", "capdec", f"corpus.path={world.corpus}", "clip=world:builtin",
                 f"model.lm={lm}", "model.prefix_length=2", "train.batch_size=8",
                 "train.max_steps=3", "train.warmup_steps=1", f"train.output_dir={out}",
                 "generation.num_beams=1", "generation.max_new_tokens=12", "-q"]) == 0  # fmt: skip
    return out / "last", sorted((world.root / "images").glob("test_*.png"))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/setup.sh installs it)")
def test_the_page_captions_an_uploaded_image_and_a_random_world_scene(checkpoint):
    from pairfree.demo.web import build_app

    path, image = checkpoint
    captioner = Captioner.from_pretrained(path)
    expected = Captioner.from_pretrained(path)(image)
    app = build_app(captioner)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#image input[type=file]").set_input_files(str(image))
            page.locator("#caption-button").click()
            box, truth = page.locator("#caption textarea"), page.locator("#truth textarea")
            # the page shows what the Python API gives for the same image
            sync_api.expect(box).to_have_value(expected, timeout=60_000)
            page.locator("#scene-button").click()  # a world scene is drawn, its truth shown
            sync_api.expect(truth).to_have_value(re.compile(r"\(row \d, col \d\)"),
                                                 timeout=60_000)  # fmt: skip
            sync_api.expect(page.locator("#image img")).to_have_count(1, timeout=60_000)
            sync_api.expect(box).not_to_have_value("", timeout=60_000)
            browser.close()
    finally:
        app.close()
