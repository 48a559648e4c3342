"""`pairfree serve` in a real browser: the page is served on 127.0.0.1, headless Chromium
(driven by playwright, the system's chromium) uploads an image and reads the caption back;
the world's "random world scene" button draws a scene and captions it."""

from __future__ import annotations

import re
import shutil
import socket
from types import SimpleNamespace

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


# --------------------------------------------------------------------------- bad uploads


def png_header(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` but holds almost nothing: a
    decompression bomb's shape, a few dozen bytes on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture(scope="module")
def served(checkpoint):
    """The real app on 127.0.0.1, launched as ``pairfree serve`` launches it."""
    from pairfree.demo.web import build_app, launch

    path, image = checkpoint
    captioner = Captioner.from_pretrained(path)
    app = build_app(captioner)
    port = free_port()
    launch(app, "127.0.0.1", port, max_upload_mb=1, block=False)
    yield f"http://127.0.0.1:{port}/", captioner
    app.close()


def ask(url: str, image) -> str:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    return client.predict(handle_file(str(image)), 1, 12, api_name="/caption")  # the card's


def test_bad_uploads_get_one_clear_message_and_the_server_goes_on(served, checkpoint, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    import numpy as np
    from gradio_client.exceptions import AppError
    from PIL import Image

    url, captioner = served
    _, good = checkpoint
    (tmp_path / "notes.png").write_text("not an image at all")
    png_header(tmp_path / "bomb.png", 50_000, 50_000)  # 2.5 G pixels, 80 bytes on disk
    png_header(tmp_path / "sliver.png", 1, 1_000_000)
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")  # over the limit set below
    cases = [("notes.png", "cannot decode image"), ("bomb.png", "exceeds limit"),
             ("sliver.png", "aspect ratio"), ("big.png", "PAIRFREE_MAX_IMAGE_PIXELS")]  # fmt: skip
    for name, reason in cases:
        if name == "big.png":
            monkeypatch.setenv("PAIRFREE_MAX_IMAGE_PIXELS", str(200 * 200))
        with pytest.raises(AppError) as info:
            ask(url, tmp_path / name)
        message = str(info.value)
        assert reason in message and name in message, message
        assert "/tmp/gradio" not in message and "Traceback" not in message, message
    monkeypatch.delenv("PAIRFREE_MAX_IMAGE_PIXELS")
    # an animation captions as its first frame; a 16-bit picture as its 8-bit self
    frames = [Image.open(good).convert("RGB"), Image.new("RGB", Image.open(good).size)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = Image.open(tmp_path / "anim.gif").convert("RGB")
    assert ask(url, tmp_path / "anim.gif") == captioner(first)
    gray = np.asarray(Image.open(good).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(tmp_path / "deep.png")
    assert ask(url, tmp_path / "deep.png") == captioner(Image.open(good).convert("L"))
    assert ask(url, good) == captioner(good)  # still answering


def test_an_upload_over_the_size_limit_is_refused_with_413(served, tmp_path):
    import httpx

    url, _ = served
    (tmp_path / "large.png").write_bytes(b"\0" * (2 * 1024 * 1024))
    with open(tmp_path / "large.png", "rb") as f:
        reply = httpx.post(url + "gradio_api/upload", files={"files": f}, timeout=30)
    assert reply.status_code == 413, reply.text


def test_a_flood_of_requests_is_queued_up_to_a_bound_and_the_rest_get_503(checkpoint):
    """The queue holds a few requests; the ones beyond it are told at once (HTTP 503, "Queue
    is full") instead of piling up, and the server keeps answering afterwards."""
    import threading
    import uuid

    import httpx

    from pairfree.demo.web import build_app, launch

    path, image = checkpoint
    captioner = Captioner.from_pretrained(path)
    release = threading.Event()

    class Slow:  # holds the first caption until every request is in
        def __init__(self) -> None:
            self.generation, self.card, self.source = captioner.generation, captioner.card, path

        def __call__(self, picture):
            release.wait(60)
            return captioner(picture)

    app = build_app(Slow(), queue_size=2)
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    base = f"http://127.0.0.1:{port}/gradio_api/"
    try:
        with open(image, "rb") as f:
            uploaded = httpx.post(base + "upload", files={"files": f}, timeout=30).json()[0]
        payload = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, 1, 12]
        codes = []
        for _ in range(8):
            body = {"data": payload, "fn_index": 0, "session_hash": uuid.uuid4().hex[:10]}
            reply = httpx.post(base + "queue/join", json=body, timeout=10)
            codes.append(reply.status_code)
            if reply.status_code != 200:
                assert reply.status_code == 503 and "Queue is full" in reply.text, reply.text
        # one running, two waiting: the rest are refused at once
        assert codes.count(200) <= 4 and codes.count(503) >= 4, codes
        release.set()
        assert ask(f"http://127.0.0.1:{port}/", image) == captioner(image)
    finally:
        release.set()
        app.close()


def test_serve_passes_its_limits_to_the_server(monkeypatch, tmp_path):
    """``pairfree serve --queue --max-upload-mb`` reach the app (the launch is stubbed)."""
    import pairfree.demo.web as web
    from pairfree.cli import main as cli

    seen = {}
    monkeypatch.setattr("pairfree.pipeline.Captioner.from_pretrained",
                        classmethod(lambda cls, path, device: SimpleNamespace(source=path)))  # fmt: skip
    monkeypatch.setattr(web, "build_app", lambda c, queue_size: seen.update(queue=queue_size))
    monkeypatch.setattr(web, "launch", lambda app, host, port, **kw: seen.update(kw))
    port = free_port()
    assert cli(["serve", str(tmp_path), "--port", str(port), "--queue", "3",
                "--max-upload-mb", "5"]) == 0  # fmt: skip
    assert seen == {"queue": 3, "max_upload_mb": 5}
