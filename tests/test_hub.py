"""The Hugging Face-style inference API: from_pretrained on a checkpoint, a run folder or a Hub
repo id (from a local Hub cache the test builds, offline), one image in -> one caption out and
a list -> a list (paths, URLs, PIL images, arrays), save_pretrained's self-contained copy and
model card, push_to_hub."""

from __future__ import annotations

import http.server
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pairfree.cli import main
from pairfree.errors import PairfreeError
from pairfree.pipeline import Captioner


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A CapDec run through `pairfree run` on a tiny world: best/, last/, metrics_test.md, and
    its DeCap projection memory."""
    from pairfree.world import make_world
    from pairfree.world.lm import build_world_lm

    root = tmp_path_factory.mktemp("hub")
    world = make_world(root / "world", n_train_images=0, n_val=0, n_test=4, n_corpus=40, seed=1)
    lm = build_world_lm(root / "lm", n_layer=1, n_embd=32, n_head=2)
    config = root / "capdec.yaml"
    config.write_text(f"recipe: capdec\nevaluation:\n  dataset: {world.dataset}\n  split: test\n")
    out = root / "run"
    args = ["run", str(config), f"corpus.path={world.corpus}", "clip=world:builtin",
            f"model.lm={lm}", "model.prefix_length=2", "train.batch_size=8", "train.max_steps=4",
            "train.warmup_steps=1", "corpus.val_fraction=0.2", f"train.output_dir={out}",
            f"features={root / 'features'}", "generation.num_beams=1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    images = sorted((world.root / "images").glob("test_*.png"))
    return out, images, root / "features"


def test_a_run_folder_loads_its_best_checkpoint_and_says_so(run, caplog):
    out, images, _ = run
    with caplog.at_level(logging.INFO, logger="pairfree.hub"):
        captioner = Captioner.from_pretrained(out)
    assert captioner.source == out / "best"
    assert "loading its best/ checkpoint" in caplog.text
    assert captioner(images[0]) == Captioner.from_pretrained(out / "best")(images[0])
    shutil.rmtree(out / "best")  # a run without best/ falls back to last/
    try:
        assert Captioner.from_pretrained(out).source == out / "last"
    finally:
        shutil.copytree(out / "last", out / "best")
    with pytest.raises(PairfreeError, match="neither a captioner checkpoint"):
        Captioner.from_pretrained(out / "checkpoints")
    with pytest.raises(PairfreeError, match="does not exist"):
        Captioner.from_pretrained(out / "nope")


def test_one_image_gives_one_caption_and_a_list_gives_a_list(run):
    out, images, _ = run
    captioner = Captioner.from_pretrained(out / "last")
    pil = Image.open(images[0]).convert("RGB")
    one = captioner(images[0])
    assert isinstance(one, str) and one
    assert captioner(str(images[0])) == captioner(pil) == captioner(np.asarray(pil)) == one
    assert captioner(np.asarray(pil, dtype=np.float32) / 255.0) == one
    many = captioner(list(images))
    assert isinstance(many, list) and len(many) == len(images) and many[0] == one
    assert captioner.caption(np.stack([np.asarray(pil)] * 2)) == [one, one]  # an [N, H, W, 3] batch
    assert captioner([]) == []
    with pytest.raises(PairfreeError, match="not an image"):
        captioner(42)


def test_an_image_url_is_fetched(run):
    out, images, _ = run
    folder = images[0].parent

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        captioner = Captioner.from_pretrained(out / "last")
        assert captioner(f"{base}/{images[0].name}") == captioner(images[0])
        with pytest.raises(PairfreeError, match="missing.png"):
            captioner(f"{base}/missing.png")
    finally:
        server.shutdown()


def test_save_pretrained_writes_a_self_contained_copy_with_a_model_card(run, tmp_path):
    out, images, features = run
    captioner = Captioner.from_pretrained(out / "best", project_to=features)  # DeCap memory
    expected = captioner(list(images))
    saved = captioner.save_pretrained(tmp_path / "saved", repo_id="someone/world-capdec")
    assert (saved / "memory").is_dir() and (saved / "training.json").is_file()
    card = (saved / "README.md").read_text()
    for fact in ("pipeline_tag: image-to-text", "`capdec`", "`world:builtin`", "training steps | 4",
                 "## Evaluation (test)", "| overall |", "C: CIDEr-D", 'Captioner.from_pretrained("someone/world-capdec")',
                 "| training data | `corpus.txt`"):  # fmt: skip
        assert fact in card, fact
    assert str(Path(out).parent) not in card  # no path of the machine that trained it
    moved = tmp_path / "elsewhere"
    shutil.move(saved, moved)  # relative store paths: the copy works wherever it goes
    again = Captioner.from_pretrained(moved)
    assert again.conditioning.project_to == str(moved / "memory")
    assert again(list(images)) == expected
    # saving the loaded copy again keeps its training record and card
    again.save_pretrained(tmp_path / "twice")
    assert "training steps | 4" in (tmp_path / "twice" / "README.md").read_text()


def hub_cache(root: Path, repo_id: str, files: Path, commit: str = "a" * 40) -> Path:
    """A Hugging Face cache holding ``files`` as ``repo_id``'s main revision (the layout
    ``huggingface_hub`` writes when it downloads a snapshot)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


def test_a_hub_repo_id_loads_from_the_cache_offline(run, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    out, images, _ = run
    cache = hub_cache(tmp_path / "hf", "someone/world-capdec", out / "last")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE  # conftest: no network in tests
    captioner = Captioner.from_pretrained("someone/world-capdec")
    assert captioner.source.parent.name == "snapshots"
    assert captioner(images[0]) == Captioner.from_pretrained(out / "last")(images[0])
    with pytest.raises(PairfreeError, match="not in the Hugging Face cache"):
        Captioner.from_pretrained("someone/not-there")


def test_push_to_hub_uploads_the_saved_copy(run, monkeypatch):
    import huggingface_hub

    out, _, _ = run
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            names = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload", repo_id, names, commit_message))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = Captioner.from_pretrained(out / "best").push_to_hub("someone/x", private=True, token="t")
    assert url == "https://huggingface.co/someone/x/commit/1"
    assert calls[0] == ("token", "t") and calls[1] == ("create", "someone/x", True, True)
    assert calls[2][0] == "upload" and calls[2][1] == "someone/x"
    assert {"README.md", "config.json", "model.safetensors", "training.json"} <= set(calls[2][2])


def test_devices_default_to_the_gpu_when_there_is_one_and_are_checked(run, capsys):
    import torch

    from pairfree.job import resolve_device

    out, images, _ = run
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(PairfreeError, match="unknown device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(PairfreeError, match="0 CUDA device"):
            resolve_device("cuda:1")
        with pytest.raises(SystemExit) as exited:  # argparse's usage error, before any work
            main(["caption", str(out), str(images[0]), "--device", "cuda"])
        assert exited.value.code == 2 and "0 CUDA device" in capsys.readouterr().err
    # half precision decodes too (bfloat16 runs on a CPU)
    half = Captioner.from_pretrained(out / "last", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert isinstance(half(images[0]), str)
    with pytest.raises(PairfreeError, match="unknown dtype"):
        Captioner.from_pretrained(out / "last", dtype="int4")


# --------------------------------------------------------------------------- hostile snapshots


class Trap:
    """Unpickling this writes ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.fixture
def saved(run, tmp_path):
    """A self-contained copy (its DeCap memory inside it, as memory/) to tamper with."""
    out, images, features = run
    folder = Captioner.from_pretrained(out / "last", project_to=features).save_pretrained(
        tmp_path / "saved"
    )
    return folder, images


def as_snapshot(tmp_path, folder: Path, monkeypatch) -> str:
    """``folder`` served from a Hugging Face cache as the repo ``someone/tampered``."""
    import huggingface_hub.constants as constants

    cache = hub_cache(tmp_path / "hf", "someone/tampered", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return "someone/tampered"


def refused(ref, *fragments) -> str:
    with pytest.raises(PairfreeError) as info:
        Captioner.from_pretrained(ref)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pkl", "extra/weights.pt",
                                  "memory/shard-00000.pth", "notes.exe"])  # fmt: skip
def test_a_checkpoint_holding_a_pickle_or_an_unknown_file_is_refused_unread(
    saved, tmp_path, monkeypatch, name
):
    import pickle

    folder, _ = saved
    marker = tmp_path / "marker"
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_bytes(pickle.dumps(Trap(marker)))
    what = "a pickle" if name != "notes.exe" else "not a file a pairfree checkpoint holds"
    refused(folder, str(folder / name), what)
    refused(as_snapshot(tmp_path, folder, monkeypatch), name, what)
    assert not marker.exists()


def test_serve_refuses_a_tampered_checkpoint_in_one_line_before_serving(saved, monkeypatch,
                                                                       capsys):  # fmt: skip
    import socket

    import pairfree.demo.web as web

    folder, _ = saved
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    monkeypatch.setattr(web, "launch", lambda *a, **k: pytest.fail("served a tampered folder"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", str(folder), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pytorch_model.bin" in err and "pickle" in err, err


def test_a_card_naming_files_outside_the_snapshot_is_refused(saved, run, tmp_path, monkeypatch):
    import json
    import os

    folder, images = saved
    _, _, features = run
    config = json.loads((folder / "config.json").read_text())
    outside = tmp_path / "outside"
    shutil.copytree(folder / "memory", outside)

    def card(**conditioning) -> None:
        edited = json.loads(json.dumps(config))
        edited["card"]["conditioning"].update(conditioning)
        (folder / "config.json").write_text(json.dumps(edited))

    card(project_to="../outside")  # ../ out of the folder
    refused(folder, "config.json", "../outside", "outside the checkpoint")
    refused(as_snapshot(tmp_path, folder, monkeypatch), "../outside", "outside the checkpoint")
    shutil.rmtree(tmp_path / "hf")
    # an absolute path: a training run's checkpoint names its stores so (a local folder is the
    # user's own), but a Hub snapshot may name nothing outside itself
    card(project_to=str(outside))
    assert Captioner.from_pretrained(folder).conditioning.project_to == str(outside)
    refused(as_snapshot(tmp_path, folder, monkeypatch), str(outside), "outside the snapshot")
    shutil.rmtree(tmp_path / "hf")
    # a link out of the folder
    card(project_to="memory")
    shutil.rmtree(folder / "memory")
    os.symlink(outside, folder / "memory")
    refused(folder, "memory", "links outside the checkpoint")
    # a CLIP named by a path on this machine
    (folder / "memory").unlink()
    shutil.copytree(outside, folder / "memory")
    edited = json.loads(json.dumps(config))
    edited["card"]["clip"] = f"hf:{tmp_path / 'some-clip'}"
    (folder / "config.json").write_text(json.dumps(edited))
    refused(as_snapshot(tmp_path, folder, monkeypatch), "some-clip", "outside the snapshot")


def test_a_config_from_a_newer_pairfree_is_refused(saved):
    import json

    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 1  # what this version writes
    (folder / "config.json").write_text(json.dumps(config | {"format_version": 2}))
    refused(folder, "config.json", "format_version 2", "newer pairfree")
    (folder / "config.json").write_text(json.dumps(config | {"adapters": ["x.safetensors"]}))
    refused(folder, "config.json", "'adapters'")
    del config["format_version"]  # checkpoints written before the field existed still load
    (folder / "config.json").write_text(json.dumps(config))
    assert Captioner.from_pretrained(folder).card.recipe == "capdec"


TOKEN = "hf_SeCrEtToKeN0123456789abcdefghijKLMN"


@pytest.mark.parametrize("where", ["create_repo", "upload_folder"])
@pytest.mark.parametrize("error", ["http", "value", "runtime"])
def test_push_to_hub_never_shows_the_token(run, monkeypatch, caplog, where, error):
    """Whatever the Hub client raises, with the token in its message, reaches neither the
    error pairfree raises (nor its chain), nor a log, nor the uploaded model card."""
    import traceback

    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    out, _, _ = run
    uploaded = {}

    def http(message: str) -> HfHubHTTPError:
        import httpx2

        request = httpx2.Request("POST", "https://huggingface.co/api/repos/create",
                                 headers={"authorization": f"Bearer {TOKEN}"})  # fmt: skip
        return HfHubHTTPError(message, response=httpx2.Response(401, request=request))

    make = {"http": http, "value": ValueError, "runtime": RuntimeError}

    class LeakyApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private, exist_ok):
            if where == "create_repo":
                raise make[error](f"401 Unauthorized for Bearer {self.token} on {repo_id}")

        def upload_folder(self, folder_path, repo_id, commit_message):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()
                             if p.is_file()})  # fmt: skip
            logging.getLogger("huggingface_hub").warning("uploading with token=%s", self.token)
            raise make[error](f"upload failed (authorization: Bearer {self.token})")

    monkeypatch.setattr(huggingface_hub, "HfApi", LeakyApi)
    captioner = Captioner.from_pretrained(out / "best")
    with caplog.at_level(logging.DEBUG), pytest.raises(PairfreeError) as info:
        captioner.push_to_hub("someone/x", token=TOKEN)
    chain = "".join(traceback.format_exception(info.value))
    assert "someone/x" in str(info.value) and "[redacted]" in str(info.value), str(info.value)
    assert TOKEN not in chain and TOKEN[3:12] not in chain, chain
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert TOKEN not in logged, logged
    assert all(TOKEN.encode() not in data for data in uploaded.values())


def test_caption_files_resumes_an_interrupted_run_and_skips_bad_images(run, tmp_path):
    """The library's resumable captioning (what `pairfree caption` calls): a run stopped after
    its first batch is finished by a rerun that captions only the rest, giving what one
    uninterrupted run gives; a bad image is skipped and named; other settings are refused."""
    from pairfree.captioning import caption_files, partial_files, remove_partial_files
    from pairfree.job import Job

    out_dir, images, _ = run
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    pairs = (
        [(p.stem, p) for p in images[:2]] + [("broken", broken)] + [(p.stem, p) for p in images[2:]]
    )
    captioner = Captioner.from_pretrained(out_dir)
    quiet = Job(progress=False)
    whole = caption_files(captioner, pairs, tmp_path / "whole.json", batch_size=2, job=quiet)
    assert list(whole.captions) == [p.stem for p in images]  # input order, the bad one left out
    assert whole.captions == {p.stem: captioner(p) for p in images} and whole.resumed == 0
    assert len(whole.skipped) == 1 and whole.skipped[0]["source"].endswith("broken.png")

    calls = []
    real = captioner.caption

    def stop_after_one_batch(pictures, **kwargs):
        calls.append(len(pictures))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(pictures, **kwargs)

    out = tmp_path / "captions.json"
    captioner.caption = stop_after_one_batch
    with pytest.raises(KeyboardInterrupt):
        caption_files(captioner, pairs, out, batch_size=2, job=Job(progress=False))
    captioner.caption = real
    assert [p.name for p in partial_files(out)] == ["captions.json.partial.jsonl"]
    resumed = caption_files(captioner, pairs, out, batch_size=2, job=Job(progress=False))
    assert resumed.resumed == 2 and resumed.captions == whole.captions

    other = Captioner.from_pretrained(out_dir, num_beams=2)
    with pytest.raises(PairfreeError, match="other settings \\(generation\\)"):
        caption_files(other, pairs, out, job=Job(progress=False))
    remove_partial_files(out)
    assert partial_files(out) == []
