"""Kill a training subprocess right after a checkpoint, then resume it, and compare it with an
uninterrupted run (shared by the recipe resume tests)."""

import signal
import time
from pathlib import Path


def kill_after_checkpoint_then_resume(run_cli, args, run_dir: Path, step: int) -> None:
    """Start ``run_cli(args)``, SIGKILL it once checkpoint ``step`` exists, rerun to the end."""
    proc = run_cli(args)
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (run_dir / "last").exists(), "killed too late to test resume"
    resumed = run_cli(args)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out


def resumed_run_equals_uninterrupted(
    run_cli, args_for, root: Path, step: int, checkpoints: tuple[str, ...] = ("last",)
) -> None:
    """``root/killed`` (``args_for`` its folder), killed after checkpoint ``step`` and resumed,
    ends with the weights of ``root/ref``, run without a stop beside it (the two processes at
    once: each starts python and torch, which a single core would do twice over)."""
    ref = run_cli(args_for(root / "ref"))
    kill_after_checkpoint_then_resume(run_cli, args_for(root / "killed"), root / "killed", step)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    for name in checkpoints:
        assert_same_weights(root / "ref" / name, root / "killed" / name)


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    """The two checkpoints' weights are bit-identical."""
    import torch
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
