"""Two runs into one output: every command that writes holds an exclusive lock on its output
(``OUT.lock`` beside it, naming its owner's pid and host), and a second run is refused in one
line naming the output and the owner, before any model is loaded, leaving the output as it
was. A lock whose owner died on this host is taken over with a warning; one from another host
never is."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pairfree.cli import main
from pairfree.errors import PairfreeError
from pairfree.locks import lock_path, output_lock
from pairfree.world import make_world

HOST = socket.gethostname()

HOLDER = """
import sys
from pairfree.locks import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def held_elsewhere(path: Path):
    """Another process holds the lock of ``path`` until the block ends; yields that process."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=60)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with one error line and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pairfree")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def snapshot(path: Path) -> dict[str, str]:
    """Every file at or under ``path`` with a digest of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ------------------------------------------------------------------------------ the lock


def test_a_second_run_is_refused_naming_the_output_and_the_owner(tmp_path):
    out = tmp_path / "captions.json"
    with output_lock(out) as lock:
        assert lock == tmp_path / "captions.json.lock"
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == HOST
        with pytest.raises(PairfreeError) as refused, output_lock(out):
            pass
        assert f"{out} is being written by another run, pid {os.getpid()} on {HOST}" in str(
            refused.value
        )
        assert lock.exists(), "a refused run must leave the owner's lock alone"
    assert not lock.exists()
    with held_elsewhere(out) as holder, pytest.raises(PairfreeError) as refused, output_lock(out):
        pass
    assert f"pid {holder.pid} on {HOST}" in str(refused.value)
    with output_lock(out):  # free again once the holder has finished
        pass


@pytest.mark.parametrize("stop", [RuntimeError("boom"), KeyboardInterrupt()])
def test_the_lock_is_removed_when_the_run_fails_or_is_interrupted(tmp_path, stop):
    out = tmp_path / "store"
    with pytest.raises(type(stop)), output_lock(out):
        assert lock_path(out).exists()
        raise stop
    assert not lock_path(out).exists()
    with output_lock(out):
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "captions.json"
    with held_elsewhere(out) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid  # left behind
    with caplog.at_level(logging.WARNING, logger="pairfree"), output_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"took over the stale lock {lock} of pid {holder.pid} on {HOST}" in warning
    assert "no longer running" in warning
    assert not lock.exists()


def test_a_lock_file_naming_a_dead_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    pid = dead_pid()
    lock_path(out).write_text(json.dumps({"pid": pid, "host": HOST, "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="pairfree"), output_lock(out):
        pass
    assert f"pid {pid} on {HOST} since earlier, which is no longer running" in caplog.text
    assert not lock_path(out).exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "run"
    text = json.dumps({"pid": dead_pid(), "host": "elsewhere.example", "started": "earlier"})
    lock_path(out).write_text(text)
    with pytest.raises(PairfreeError) as refused, output_lock(out):
        pass
    message = str(refused.value)
    assert f"{out} is locked by pid" in message and "on elsewhere.example" in message
    assert f"if it has ended, delete {lock_path(out)} and rerun" in message
    assert lock_path(out).read_text() == text


def test_a_folder_output_is_locked_beside_it_and_made_folders_are_removed(tmp_path):
    out = tmp_path / "new" / "deeper" / "store"
    with output_lock(out) as lock:
        assert lock == tmp_path / "new" / "deeper" / "store.lock" and not out.exists()
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("keep")
    link = tmp_path / "alias"
    link.symlink_to(out)
    with output_lock(out), pytest.raises(PairfreeError, match="being written"), output_lock(link):
        pass  # two names of one folder share its lock
    assert (out / "keep.txt").read_text() == "keep" and sorted(os.listdir(out)) == ["keep.txt"]


def test_the_processes_of_one_launch_share_the_lock(tmp_path, monkeypatch):
    """Under torchrun process 0 takes the lock; the others of its launch join it, and those of
    another launch wait for it (their process 0 is refused)."""
    out = tmp_path / "captions.json"
    launch = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RANK", "0")
    with output_lock(out) as lock:
        monkeypatch.setenv("RANK", "1")
        with output_lock(out, join_timeout=5):
            pass
        assert lock.exists(), "only process 0 removes the lock"
        monkeypatch.setenv("MASTER_PORT", "29501")  # another launch
        with pytest.raises(PairfreeError, match="did not take"), output_lock(out, join_timeout=0.2):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(PairfreeError, match=f"pid {os.getpid()} on {HOST}"), output_lock(out):
            pass
    assert not lock.exists()


RACER = """
import json, sys, time
from pairfree.errors import PairfreeError
from pairfree.locks import output_lock
out, log, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
try:
    with output_lock(out):
        began = time.time()
        time.sleep(0.5)
        ended = time.time()
except PairfreeError as err:
    print(err)
    sys.exit(3)
with open(log, "a") as f:
    f.write(json.dumps([began, ended]) + "\\n")
"""


def test_a_lock_held_while_its_owner_writes_its_record_is_refused_naming_the_owner(tmp_path):
    """A run taking over a stale lock holds it before its record is written; a run that looks
    in between waits for the record and names that owner (it used to say "no owner yet")."""
    import fcntl
    import threading

    out = tmp_path / "captions.json"
    lock = lock_path(out)
    lock.write_text("")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, with no record yet
    record = json.dumps({"pid": os.getpid(), "host": HOST}).encode()
    writer = threading.Timer(0.3, lambda: os.write(fd, record))
    writer.start()
    try:
        with (
            pytest.raises(
                PairfreeError, match=f"{out} is being written by another run, pid {os.getpid()}"
            ),
            output_lock(out),
        ):
            pass
    finally:
        writer.join()
        os.close(fd)


def test_racing_processes_never_hold_one_lock_at_once(tmp_path):
    """Six processes race for an output whose lock a dead run left: the stale lock is taken
    over by one of them; each other one is refused (or comes after it has finished)."""
    out, log = tmp_path / "captions.json", tmp_path / "holders.jsonl"
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": HOST}))
    start = time.time() + 3.0  # all start together, once imported
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(out), str(log), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(6)
    ]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    held = sorted(json.loads(line) for line in log.read_text().splitlines())
    assert held and all(code in (0, 3) for code, _, _ in results), results
    assert sum(code == 0 for code, _, _ in results) == len(held)
    for (_, ended), (began, _) in zip(held, held[1:], strict=False):
        assert ended <= began, f"two processes held the lock at once: {held}"
    for code, stdout, _ in results:
        if code == 3:
            assert f"{out} is being written by another run, pid" in stdout
    assert not lock_path(out).exists()


# ----------------------------------------------------------------------- every command


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(
        tmp_path_factory.mktemp("world"), n_train_images=0, n_val=0, n_test=4, n_corpus=24, seed=0
    )


def command_cases(world, gpt2_dir: Path, tmp: Path) -> dict[str, tuple[list[str], list[Path]]]:
    """Every command that writes: (argv, the outputs it locks). Models named here do not
    exist or are never loaded: the refusal comes first."""
    images = sorted(world.images.glob("test_*.png"))
    preds = tmp / "preds.json"
    preds.write_text(json.dumps([{"image_id": 0, "caption": "a red circle"}]))
    groups = tmp / "groups.jsonl"
    groups.write_text(json.dumps({"id": "0", "members": ["0"], "captions": ["a"]}) + "\n")
    pt = tmp / "original.pt"
    pt.write_bytes(b"")
    run_dir, config = tmp / "run", tmp / "experiment.yaml"
    train = [f"corpus.path={world.corpus}", "clip=hf:not-loaded", f"model.lm={gpt2_dir}",
             f"train.output_dir={run_dir}"]  # fmt: skip
    config.write_text(
        f"recipe: capdec\ncorpus: {{path: {world.corpus}}}\nmodel: {{lm: {gpt2_dir}}}\n"
        f"train: {{output_dir: {run_dir}}}\nevaluation: {{dataset: {world.dataset}}}\n"
    )
    corpus, clip, llm = str(world.corpus), "hf:not-loaded", "world:default"
    out = {name: tmp / name for name in ("file.json", "folder", "offset.safetensors", "r.html")}
    return {
        "caption": (["caption", "no-checkpoint", *map(str, images), "--out", str(out["file.json"])],
                    [out["file.json"]]),
        "encode": (["encode", "--captions", corpus, "--clip", clip, "--out", str(out["folder"])],
                   [out["folder"]]),
        "evaluate": (["evaluate", str(preds), str(world.dataset), "--out", str(tmp / "scores")],
                     [tmp / "scores.json", tmp / "scores.md"]),
        "compare": (["compare", str(preds), str(preds), str(world.dataset), "--out",
                     str(out["file.json"])], [out["file.json"]]),
        "offset": (["offset", "--dataset", str(world.dataset), "--clip", clip, "--out",
                    str(out["offset.safetensors"])], [out["offset.safetensors"]]),
        "report": (["report", str(tmp), "--out", str(out["r.html"])], [out["r.html"]]),
        "run": (["run", str(config), "--no-progress"], [run_dir]),
        "train": (["train", "capdec", "--no-progress", *train], [run_dir]),
        "import-checkpoint": (["import-checkpoint", str(pt), "--out", str(out["folder"]),
                               "--mapper", "mlp", "--prefix-length", "2"], [out["folder"]]),
        "synthesize images": (["synthesize", "images", corpus, "--backend", "world:default",
                               "--out", str(out["folder"])], [out["folder"]]),
        "synthesize rephrase": (["synthesize", "rephrase", corpus, "--llm", llm, "--out",
                                 str(out["folder"])], [out["folder"]]),
        "synthesize group": (["synthesize", "group", corpus, "--clip", clip, "--out",
                              str(out["folder"])], [out["folder"]]),
        "synthesize summarize": (["synthesize", "summarize", str(groups), "--llm", llm, "--out",
                                  str(out["folder"])], [out["folder"]]),
        "world make": (["world", "make", str(out["folder"])], [out["folder"]]),
        "world lm": (["world", "lm", str(out["folder"])], [out["folder"]]),
        "world train-clip": (["world", "train-clip", str(out["folder"])], [out["folder"]]),
        "demo": (["demo", "--out", str(out["folder"])], [out["folder"]]),
    }  # fmt: skip


COMMANDS = [
    "caption", "encode", "evaluate", "compare", "offset", "report", "run", "train",
    "import-checkpoint", "synthesize images", "synthesize rephrase", "synthesize group",
    "synthesize summarize", "world make", "world lm", "world train-clip", "demo",
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_an_output_another_process_writes(
    command, world, tiny_gpt2_dir, tmp_path, capsys
):
    argv, outputs = command_cases(world, tiny_gpt2_dir, tmp_path)[command]
    for out in outputs:  # an earlier run's work, to be kept as it is
        if out.suffix:
            out.write_text("an earlier run's output")
        else:
            out.mkdir(exist_ok=True)
            (out / "earlier.txt").write_text("an earlier run's work")
    for out in outputs:
        before = {p: snapshot(p) for p in outputs}
        with held_elsewhere(out) as holder:
            line = one_error_line(capsys, argv)
            assert f"{out} is being written by another run, pid {holder.pid} on {HOST}" in line
            assert {p: snapshot(p) for p in outputs} == before
            assert lock_path(out).exists()
        assert not lock_path(out).exists()
    assert not list(tmp_path.rglob("*.lock")), "the refused run removed no lock, left none"


def test_a_command_runs_once_the_lock_is_free_or_stale(tmp_path, capsys, caplog):
    out = tmp_path / "world"
    argv = ["world", "make", str(out), "--train-images", "0", "--val", "0", "--test", "1",
            "--corpus", "5"]  # fmt: skip
    with held_elsewhere(out) as holder:
        one_error_line(capsys, argv)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # a killed run leaves its lock behind
    with caplog.at_level(logging.WARNING, logger="pairfree"):
        assert main(argv) == 0
    assert f"of pid {holder.pid} on {HOST}" in caplog.text and "no longer running" in caplog.text
    assert (out / "dataset_world.json").exists() and not lock_path(out).exists()


# ---------------------------------------------------------------- a real caption race


@pytest.fixture(scope="module")
def checkpoint(world, tiny_clip_dir, tiny_gpt2_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    args = [
        f"corpus.path={world.corpus}", f"clip=hf:{tiny_clip_dir}", f"model.lm={tiny_gpt2_dir}",
        "model.prefix_length=2", "model.clip_length=2", "model.mapper_layers=1",
        f"train.output_dir={run}", "train.batch_size=8", "train.max_steps=2",
        "train.warmup_steps=1", "corpus.val_fraction=0", "generation.max_new_tokens=5",
    ]  # fmt: skip
    assert main(["train", "capdec", "--no-progress", *args]) == 0
    return run / "last"


@pytest.mark.slow
def test_two_caption_runs_into_one_output_never_both_succeed(world, checkpoint, tmp_path, capsys):
    """Two `pairfree caption` processes, the same file names, other pictures, one --out: the
    second one (started while the first holds the output) is refused naming the first; the
    first finishes with its own captions of its own pictures."""
    images = sorted(world.images.glob("test_*.png"))
    for folder, order in (("a", images), ("b", images[::-1])):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(order):
            shutil.copy(image, tmp_path / folder / f"img{i}.png")
    expected = tmp_path / "a-alone.json"
    assert main(["caption", str(checkpoint), str(tmp_path / "a"), "--out", str(expected),
                 "-q"]) == 0  # fmt: skip
    out = tmp_path / "captions.json"

    def caption(folder: str) -> list[str]:
        return [sys.executable, "-m", "pairfree.cli", "caption", str(checkpoint),
                str(tmp_path / folder), "--out", str(out), "--batch-size", "1", "-q"]  # fmt: skip

    first = subprocess.Popen(caption("a"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    deadline = time.time() + 120
    while not lock_path(out).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # it holds the output: keep it at work
    try:
        assert first.poll() is None and lock_path(out).exists(), "the first run ended too soon"
        second = subprocess.run(caption("b"), capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.communicate()
    assert second.returncode == 2, second.stdout + second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("pairfree")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"{out} is being written by another run, pid {first.pid} on {HOST}" in errors[0]
    assert json.loads(out.read_text()) == json.loads(expected.read_text())
    assert not lock_path(out).exists() and not list(tmp_path.glob("captions.json.partial*"))


@pytest.mark.slow
def test_a_refused_launch_writes_nothing(world, checkpoint, tmp_path):
    """Under torchrun process 0 is refused and the other processes, waiting for its lock,
    write nothing (no partial file of theirs) before the launcher stops them."""
    out = tmp_path / "captions.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
           "pairfree.cli", "caption", str(checkpoint), str(world.images), "--out", str(out),
           "-q"]  # fmt: skip
    with held_elsewhere(out) as holder:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert f"{out} is being written by another run, pid {holder.pid}" in done.stderr
    assert not list(tmp_path.glob("captions.json*")), list(tmp_path.iterdir())
