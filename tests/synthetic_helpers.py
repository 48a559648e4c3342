"""A tiny world and one synthetic image per corpus caption, as the synthetic-image recipes'
tests (PCM-Net, SynC) start from."""

from pathlib import Path


def synthesize_world(root: Path, *, n_corpus: int, n_test: int, n_val: int, seed: int):
    """``root/world`` and ``root/own`` (`pairfree synthesize images` of its corpus)."""
    from pairfree.cli import main
    from pairfree.world import make_world

    world = make_world(root / "world", n_train_images=0, n_val=n_val, n_test=n_test,
                       n_corpus=n_corpus, seed=seed)  # fmt: skip
    assert main(["synthesize", "images", str(world.corpus), "--backend", "world:default",
                 "--out", str(root / "own"), "--no-progress"]) == 0  # fmt: skip
    return root, world
