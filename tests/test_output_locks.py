"""Two runs into one output: an output's exclusive lock (``OUT.lock`` beside it, naming its
owner's pid and host) refuses a second run in one line naming the output and the owner. A lock
whose owner died on this host is taken over with a warning; one from another host never is."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pairfree.errors import PairfreeError
from pairfree.locks import lock_path, output_lock

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
