import json

import numpy as np
import pytest
import torch

from pairfree.errors import BadInputError, PairfreeError, SkipLog
from pairfree.features import FeatureStore, Item, StoreInfo, write_store
from pairfree.job import Job

INFO = StoreInfo(encoder="fake:1", kind="text", normalized=False)


def fake_encode(texts):
    """Deterministic 'embedding' so equality across runs is exact."""
    return torch.tensor(
        [[len(t), sum(map(ord, t)) % 97, t.count("a")] for t in texts], dtype=torch.float32
    )


def items(n):
    return [Item(id=str(i), value=f"caption number {i} about a cat") for i in range(n)]


class Interrupt(Exception):
    pass


QUIET = Job(progress=False)


class OneOf:
    """A stand-in for accelerate's PartialState: process ``index`` of ``count``, run in turn."""

    def __init__(self, index: int, count: int) -> None:
        self.process_index, self.num_processes = index, count
        self.is_main_process = index == 0

    def wait_for_everyone(self) -> None:
        pass


def test_one_shot_store_reads_back(tmp_path):
    store = write_store(tmp_path / "s", items(10), fake_encode, INFO, shard_size=4, job=QUIET)
    assert len(store) == 10 and store.dim == 3 and store.ids == [str(i) for i in range(10)]
    assert store.texts[3] == "caption number 3 about a cat"
    np.testing.assert_array_equal(
        store.tensor().numpy(), fake_encode([it.value for it in items(10)]).numpy()
    )
    assert store[7].tolist() == fake_encode([items(10)[7].value])[0].tolist()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert (
        manifest["count"] == 10 and manifest["num_shards"] == 3 and manifest["encoder"] == "fake:1"
    )


def test_resume_skips_finished_shards_and_equals_one_shot(tmp_path):
    calls = []

    def flaky(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise Interrupt
        return fake_encode(texts)

    with pytest.raises(Interrupt):
        write_store(tmp_path / "s", items(10), flaky, INFO, shard_size=4, job=QUIET)
    with pytest.raises(PairfreeError, match="incomplete"):
        FeatureStore(tmp_path / "s")
    calls.clear()
    counted = []

    def counting(texts):
        counted.append(len(texts))
        return fake_encode(texts)

    resumed = write_store(tmp_path / "s", items(10), counting, INFO, shard_size=4, job=QUIET)
    assert counted == [4, 2]  # shard 0 was finished before the interruption
    once = write_store(tmp_path / "o", items(10), fake_encode, INFO, shard_size=4, job=QUIET)
    assert torch.equal(resumed.tensor(), once.tensor()) and resumed.ids == once.ids


def test_store_refuses_a_different_plan(tmp_path):
    write_store(tmp_path / "s", items(5), fake_encode, INFO, shard_size=4, job=QUIET)
    with pytest.raises(PairfreeError, match="different store"):
        write_store(tmp_path / "s", items(6), fake_encode, INFO, shard_size=4, job=QUIET)


def test_two_processes_cover_every_item_once(tmp_path):
    assert (
        write_store(
            tmp_path / "s",
            items(9),
            fake_encode,
            INFO,
            shard_size=2,
            job=Job(OneOf(1, 2), progress=False),
        )
        is None
    )
    store = write_store(
        tmp_path / "s",
        items(9),
        fake_encode,
        INFO,
        shard_size=2,
        job=Job(OneOf(0, 2), progress=False),
    )
    assert store.ids == [str(i) for i in range(9)]
    once = write_store(tmp_path / "o", items(9), fake_encode, INFO, shard_size=2, job=QUIET)
    assert torch.equal(store.tensor(), once.tensor())


def test_bad_items_are_skipped_and_recorded(tmp_path):
    def load(it):
        if it.id == "3":
            raise BadInputError("corpus.txt", "empty caption", line=4)
        return it.value

    log = SkipLog()
    store = write_store(
        tmp_path / "s",
        items(6),
        fake_encode,
        INFO,
        load=load,
        shard_size=4,
        job=Job(skip_log=log, progress=False),
    )
    assert store.ids == ["0", "1", "2", "4", "5"] and len(log) == 1
    assert store.skipped[0]["line"] == 4
    with pytest.raises(BadInputError, match="corpus.txt:4"):
        write_store(
            tmp_path / "t",
            items(6),
            fake_encode,
            INFO,
            load=load,
            job=Job(skip_log=SkipLog(strict=True), progress=False),
        )


def test_duplicate_ids_are_rejected(tmp_path):
    with pytest.raises(PairfreeError, match="duplicate id '1'"):
        write_store(tmp_path / "s", [Item("1", "a"), Item("1", "b")], fake_encode, INFO, job=QUIET)


def test_grid_features_are_stored_as_float16_by_default_and_memory_mapped(tmp_path):
    from PIL import Image

    from pairfree.clip import load_clip
    from pairfree.encoding import encode_images

    clip = load_clip("world:builtin")
    paths = []
    for i, color in enumerate(["red", "blue", "green"]):
        paths.append((f"im{i}", tmp_path / f"{i}.png"))
        Image.new("RGB", (64, 64), color).save(paths[-1][1])
    store = encode_images(clip, paths, tmp_path / "grid", grid=True, shard_size=2, job=QUIET)
    assert store.kind == "image_grid" and len(store) == 3
    assert all(isinstance(s, np.memmap) and s.dtype == np.float16 for s in store.iter_shards())
    expected = clip.encode_image_grid([Image.open(p) for _, p in paths])
    assert store[2].shape == tuple(expected.shape[1:]) == clip.grid_shape
    np.testing.assert_allclose(store[2], expected[2].numpy(), rtol=2e-3, atol=2e-3)

    asked = encode_images(clip, paths, tmp_path / "grid32", grid=True, dtype="float32", job=QUIET)
    assert all(s.dtype == np.float32 for s in asked.iter_shards())
    plain = encode_images(clip, paths, tmp_path / "embeddings", job=QUIET)
    assert all(s.dtype == np.float32 for s in plain.iter_shards())


def test_rows_are_found_by_id_and_by_text_across_shards_and_skips(tmp_path):
    def load(it):
        if it.id == "2":
            raise BadInputError("corpus.txt", "empty caption", line=3)
        return it.value

    values = ["a cat", "a dog", "skipped", "a cat", "a bird"]  # "a cat" twice
    store = write_store(tmp_path / "s", [Item(str(i), v) for i, v in enumerate(values)],
                        fake_encode, INFO, load=load, shard_size=2,
                        job=Job(skip_log=SkipLog(), progress=False))  # fmt: skip
    assert store.ids == ["0", "1", "3", "4"]
    for item_id in store.ids:
        assert item_id in store and store.ids[store.row(item_id)] == item_id
        assert store[store.row(item_id)].tolist() == fake_encode([values[int(item_id)]])[0].tolist()
    assert "2" not in store and 2 not in store
    with pytest.raises(PairfreeError, match=r"no row for id '2'"):
        store.row("2")
    assert store.text_row("a bird") == 3 and store.text_row("a dog") == 1
    assert store.text_row("a cat") == 2  # a repeated text maps to its last row
    with pytest.raises(PairfreeError, match="no row for the caption 'a fish'"):
        store.text_row("a fish")


def test_an_image_store_has_no_text_rows(tmp_path):
    info = StoreInfo(encoder="fake:1", kind="image", normalized=False)
    store = write_store(tmp_path / "s", items(3), fake_encode, info, job=QUIET)
    assert store.row("1") == 1
    with pytest.raises(PairfreeError, match="holds image features, not texts"):
        store.text_row("caption number 1 about a cat")
