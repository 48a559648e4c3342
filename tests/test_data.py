"""Corpus readers, corpus cleaning and image loading on tiny files in the real formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pairfree.data import (
    CORPUS_FORMATS,
    IMAGE_EXTENSIONS,
    CleaningConfig,
    clean_captions,
    collect_image_paths,
    image_id_for,
    load_image,
    read_captions,
    read_images,
    read_references,
    split_sentences,
)
from pairfree.errors import BadInputError, PairfreeError, SkipLog


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _karpathy_image(cocoid, split, filepath, sentences, sentid=0):
    return {
        "filepath": filepath,
        "filename": f"COCO_{filepath}_{cocoid:012d}.jpg",
        "imgid": cocoid % 100,
        "split": split,
        "cocoid": cocoid,
        "sentids": list(range(sentid, sentid + len(sentences))),
        "sentences": [
            {"tokens": s.lower().split(), "raw": s, "imgid": cocoid % 100, "sentid": sentid + i}
            for i, s in enumerate(sentences)
        ],
    }


@pytest.fixture
def karpathy_coco(tmp_path):
    return _write_json(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                _karpathy_image(11, "train", "train2014", ["A dog runs.", "A brown dog."], 0),
                _karpathy_image(22, "restval", "val2014", ["A cat sleeps."], 2),
                _karpathy_image(33, "val", "val2014", ["A bird flies."], 3),
                _karpathy_image(44, "test", "val2014", ["Two men talk.", "Men talking."], 4),
            ],
        },
    )


@pytest.fixture
def nocaps(tmp_path):
    images = [
        {"id": 0, "open_images_id": "0013ea2087020901", "file_name": "0013ea2087020901.jpg"},
        {"id": 1, "open_images_id": "00223cd3dc0e63ba", "file_name": "00223cd3dc0e63ba.jpg"},
        {"id": 2, "open_images_id": "0032f5c8a5d2a8c0", "file_name": "0032f5c8a5d2a8c0.jpg"},
    ]
    for image, domain in zip(images, ("in-domain", "near-domain", "out-domain"), strict=True):
        image["domain"] = domain
    annotations = [
        {"image_id": 0, "id": 0, "caption": "A red car on a road."},
        {"image_id": 2, "id": 1, "caption": "A jellyfish in the sea."},
        {"image_id": 0, "id": 2, "caption": "A car parked outside."},
        {"image_id": 1, "id": 3, "caption": "A man with an accordion."},
    ]
    data = {"licenses": [], "info": {}, "images": images, "annotations": annotations}
    return _write_json(tmp_path / "nocaps_val_4500_captions.json", data)


def _coco(tmp_path, annotations):
    images = [
        {"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", "height": 4, "width": 4},
        {"id": 522418, "file_name": "COCO_val2014_000000522418.jpg", "height": 4, "width": 4},
    ]
    data = {"info": {}, "images": images, "annotations": annotations}
    return _write_json(tmp_path / "captions_val2014.json", data)


@pytest.fixture
def coco(tmp_path):
    return _coco(
        tmp_path,
        [
            {"image_id": 391895, "id": 770337, "caption": "A man riding a bike. "},
            {"image_id": 522418, "id": 681330, "caption": "A woman cutting a cake."},
            {"image_id": 391895, "id": 771687, "caption": "A person on a dirt bike."},
        ],
    )


# ---------------------------------------------------------------- Karpathy


def test_karpathy_train_split_is_train_plus_restval(karpathy_coco):
    captions = read_captions(karpathy_coco, split="train")
    assert [(c.text, c.image_id) for c in captions] == [
        ("A dog runs.", "11"),
        ("A brown dog.", "11"),
        ("A cat sleeps.", "22"),
    ]
    assert all(c.source == str(karpathy_coco) for c in captions)


def test_karpathy_val_and_test_images(karpathy_coco, tmp_path):
    (val,) = read_images(karpathy_coco, split="val")
    assert val.image_id == "33" and val.references == ("A bird flies.",)
    assert val.path == tmp_path / "val2014" / "COCO_val2014_000000000033.jpg"
    (test,) = read_images(karpathy_coco, split="test", image_root=tmp_path / "coco")
    assert test.path == tmp_path / "coco" / "val2014" / "COCO_val2014_000000000044.jpg"
    assert test.references == ("Two men talk.", "Men talking.")
    assert read_references(karpathy_coco, split="test") == {"44": ["Two men talk.", "Men talking."]}


def test_karpathy_flickr_ids_are_file_stems(tmp_path):
    image = {"filename": "1000092795.jpg", "imgid": 0, "split": "test"}
    image["sentences"] = [{"raw": "Two young guys with shaggy hair.", "sentid": 0}]
    path = _write_json(tmp_path / "dataset_flickr30k.json", {"images": [image], "dataset": "f"})
    (item,) = read_images(path, split="test")
    assert item.image_id == "1000092795" == image_id_for(item.path)
    assert item.path == tmp_path / "1000092795.jpg"


def test_karpathy_empty_caption_and_missing_field(tmp_path):
    good = _karpathy_image(11, "train", "train2014", ["A dog runs.", "  "], 0)
    no_file = _karpathy_image(22, "train", "train2014", ["A cat."], 2)
    del no_file["filename"]
    path = _write_json(tmp_path / "dataset_coco.json", {"images": [good, no_file]})

    log = SkipLog()
    captions = read_captions(path, split="train", skip_log=log)
    assert [c.text for c in captions] == ["A dog runs."]
    assert [(e.item_id, e.reason) for e in log.items] == [
        (1, "empty caption"),
        (22, "record has no 'filename' field"),
    ]
    with pytest.raises(BadInputError, match=r"dataset_coco\.json \(id 1\): empty caption"):
        read_captions(path, split="train")
    with pytest.raises(BadInputError, match="id 1"):
        read_captions(path, split="train", skip_log=SkipLog(strict=True))


# ---------------------------------------------------------------- NoCaps and COCO


def test_nocaps_keeps_domains_and_groups_references(nocaps, tmp_path):
    items = read_images(nocaps, image_root=tmp_path / "imgs")
    assert [(i.image_id, i.domain) for i in items] == [
        ("0", "in-domain"),
        ("1", "near-domain"),
        ("2", "out-domain"),
    ]
    assert items[0].references == ("A red car on a road.", "A car parked outside.")
    assert items[2].path == tmp_path / "imgs" / "0032f5c8a5d2a8c0.jpg"
    assert len(read_captions(nocaps)) == 4


def test_nocaps_test_file_without_annotations(tmp_path):
    image = {"id": 7, "file_name": "abc.jpg", "domain": "out-domain"}
    path = _write_json(tmp_path / "nocaps_test_image_info.json", {"images": [image]})
    (item,) = read_images(path)
    assert item.references == () and item.domain == "out-domain"
    assert read_references(path) == {}


def test_coco_annotations(coco, tmp_path):
    refs = read_references(coco)
    assert refs == {
        "391895": ["A man riding a bike.", "A person on a dirt bike."],
        "522418": ["A woman cutting a cake."],
    }
    items = read_images(coco)
    assert items[0].path == tmp_path / "COCO_val2014_000000391895.jpg"
    assert image_id_for(items[0].path) == items[0].image_id


def test_coco_bad_annotations_are_named_by_id(tmp_path):
    path = _coco(
        tmp_path,
        [
            {"image_id": 391895, "id": 1, "caption": "A man riding a bike."},
            {"image_id": 391895, "id": 2, "caption": ""},
            {"image_id": 999, "id": 3, "caption": "A ghost."},
            {"image_id": 522418, "id": 4},
        ],
    )
    log = SkipLog()
    assert [c.text for c in read_captions(path, skip_log=log)] == ["A man riding a bike."]
    assert [(e.item_id, e.reason) for e in log.items] == [
        (2, "empty caption"),
        (3, "caption of unknown image 999"),
        (4, "record has no 'caption' field"),
    ]
    with pytest.raises(BadInputError, match=r"captions_val2014\.json \(id 2\): empty caption"):
        read_captions(path)


# ---------------------------------------------------------------- line formats


def test_conceptual_captions_tsv(tmp_path):
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text(
        "a very typical bus station\thttp://example.com/a.jpg\n"
        "\n"
        "sierra looked stunning in this top\thttp://example.com/b.jpg\n",
        encoding="utf-8",
    )
    captions = read_captions(path)
    assert [(c.text, c.image_id, c.line) for c in captions] == [
        ("a very typical bus station", "http://example.com/a.jpg", 1),
        ("sierra looked stunning in this top", "http://example.com/b.jpg", 3),
    ]
    with pytest.raises(PairfreeError, match="captions only"):
        read_images(path)


def test_tsv_line_without_tab_and_empty_caption(tmp_path):
    path = tmp_path / "cc.tsv"
    path.write_text("good one\thttp://x/1.jpg\nno tab here\n\thttp://x/3.jpg\n", encoding="utf-8")
    log = SkipLog()
    assert [c.text for c in read_captions(path, skip_log=log)] == ["good one"]
    assert [(e.line, e.reason) for e in log.items] == [
        (2, "expected 'caption<TAB>url', found no tab"),
        (3, "empty caption"),
    ]
    with pytest.raises(BadInputError, match=r"cc\.tsv:2: expected 'caption<TAB>url'"):
        read_captions(path)


def test_plain_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffA dog runs.\n\n  A cat sits.  \r\n".encode() + b"\xff\xfe bad\nLast.")
    log = SkipLog()
    captions = read_captions(path, skip_log=log)
    assert [(c.text, c.line, c.image_id) for c in captions] == [
        ("A dog runs.", 1, None),
        ("A cat sits.", 3, None),
        ("Last.", 5, None),
    ]
    assert [(e.line, e.reason) for e in log.items] == [(4, "not valid UTF-8")]


def test_jsonl(tmp_path):
    path = tmp_path / "captions.jsonl"
    lines = [
        {"caption": "A dog runs.", "image_id": 5},
        {"text": "A cat sits.", "image": "imgs/COCO_val2014_000000000007.jpg"},
        {"caption": "A dog again.", "image_id": 5},
        {"text": "No image here."},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    captions = read_captions(path)
    assert [(c.text, c.image_id, c.line) for c in captions] == [
        ("A dog runs.", "5", 1),
        ("A cat sits.", "7", 2),
        ("A dog again.", "5", 3),
        ("No image here.", None, 4),
    ]
    items = read_images(path, image_root="/data")
    assert [(i.image_id, i.path, i.references) for i in items] == [
        ("5", None, ("A dog runs.", "A dog again.")),
        ("7", Path("/data/imgs/COCO_val2014_000000000007.jpg"), ("A cat sits.",)),
    ]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text(
        '{"caption": "A dog runs."}\n{"caption": "broken\n["not", "an object"]\n'
        '{"caption": "  "}\n{"image_id": 3}\n{"caption": "A cat sits."}\n',
        encoding="utf-8",
    )
    log = SkipLog()
    assert [c.text for c in read_captions(path, skip_log=log)] == ["A dog runs.", "A cat sits."]
    assert [e.line for e in log.items] == [2, 3, 4, 5]
    assert log.items[0].reason.startswith("not valid JSON")
    assert log.items[3].reason == "object has no 'caption' or 'text' field"
    with pytest.raises(BadInputError, match=r"captions\.jsonl:2: not valid JSON"):
        read_captions(path)
    with pytest.raises(BadInputError, match=r"captions\.jsonl:2"):
        read_captions(path, skip_log=SkipLog(strict=True))


# ---------------------------------------------------------------- detection and file errors


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.data", '{"caption": "A dog."}\n{"caption": "A cat."}\n', ["A dog.", "A cat."]),
        ("b.csv", "A dog.\thttp://x/1.jpg\n", ["A dog."]),
        ("c", "A dog.\nA cat.\n", ["A dog.", "A cat."]),
        ("d.ndjson", '{"text": "A dog."}\n', ["A dog."]),
        (
            "e.anno",
            '{\n "images": [{"id": 1, "file_name": "1.jpg"}],\n "annotations": '
            '[{"image_id": 1, "caption": "A dog."}]}',
            ["A dog."],
        ),
    ],
)
def test_auto_detection_from_contents(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert [c.text for c in read_captions(path)] == expected


def test_auto_detection_of_json_datasets(karpathy_coco, nocaps, coco):
    assert read_images(nocaps)[1].domain == "near-domain"
    assert read_images(coco)[0].domain is None
    assert [c.image_id for c in read_captions(karpathy_coco)] == ["11", "11", "22"]


def test_explicit_format_overrides_extension(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text('{"caption": "A dog."}\n', encoding="utf-8")
    assert read_captions(path)[0].text == '{"caption": "A dog."}'
    assert read_captions(path, format="jsonl")[0].text == "A dog."


def test_unknown_formats_and_splits(tmp_path):
    path = _write_json(tmp_path / "other.json", {"categories": []})
    with pytest.raises(PairfreeError, match="karpathy, nocaps, coco, cc, text, jsonl") as info:
        read_captions(path)
    assert str(path) in str(info.value)
    with pytest.raises(PairfreeError, match="unknown corpus format 'csv'"):
        read_captions(path, format="csv")
    with pytest.raises(PairfreeError, match="unknown split 'restval'"):
        read_captions(path, split="restval")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02")
    with pytest.raises(PairfreeError, match="cannot tell"):
        read_captions(binary)
    assert CORPUS_FORMATS == ("karpathy", "nocaps", "coco", "cc", "text", "jsonl")


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(BadInputError, match=r"missing\.json: no such file"):
        read_captions(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n  {"id": 1,}\n]}', encoding="utf-8")
    with pytest.raises(BadInputError, match=r"broken\.json:2: not valid JSON") as info:
        read_images(broken, skip_log=SkipLog())
    assert info.value.line == 2
    with pytest.raises(BadInputError, match="not a coco file"):
        read_captions(_write_json(tmp_path / "x.json", {"images": 3}), format="coco")


# ---------------------------------------------------------------- cleaning


def test_cleaning_defaults_normalize_whitespace_and_drop_empties():
    assert clean_captions(["  A  dog\truns. ", "", "   ", "A dog runs."], CleaningConfig()) == [
        "A dog runs.",
        "A dog runs.",
    ]


def test_cleaning_options():
    texts = ["A man's T-shirt -- is red!", "a man's t-shirt is red", "Hi.", "One. Two three."]
    config = CleaningConfig(strip_punctuation=True, lowercase=True, dedupe=True, min_words=2)
    assert clean_captions(texts, config) == ["a man's t-shirt is red", "one two three"]
    assert clean_captions(texts, CleaningConfig(first_sentence=True, max_words=1)) == [
        "Hi.",
        "One.",
    ]
    assert clean_captions(texts, CleaningConfig(dedupe=True)) == texts  # case-sensitive
    assert clean_captions(["b", "a", "b", "c", "a"], CleaningConfig(dedupe=True)) == ["b", "a", "c"]


def test_cleaning_config_rejects_impossible_ranges():
    with pytest.raises(PairfreeError, match="min_words"):
        CleaningConfig(min_words=-1)
    with pytest.raises(PairfreeError, match="max_words"):
        CleaningConfig(min_words=5, max_words=4)


def test_split_sentences():
    text = 'A dog runs. Mr. Smith said "Hi!" Then 3.5 m, e.g. a cat.\n\nNew para?\nYes.'
    assert split_sentences(text) == [
        "A dog runs.",
        'Mr. Smith said "Hi!"',
        "Then 3.5 m, e.g. a cat.",
        "New para?",
        "Yes.",
    ]
    assert split_sentences("  \n ") == []


# ---------------------------------------------------------------- images


def _save(path: Path, mode: str = "RGB", color=(200, 10, 10), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_load_image_converts_to_rgb(tmp_path):
    gray = load_image(_save(tmp_path / "g.png", "L", 128))
    assert gray.mode == "RGB" and gray.size == (8, 6) and gray.getpixel((0, 0)) == (128,) * 3
    clear = load_image(_save(tmp_path / "t.png", "RGBA", (0, 0, 0, 0)))
    assert clear.getpixel((3, 3)) == (255, 255, 255)  # transparent -> white, not black


def test_load_image_bad_files(tmp_path):
    good = _save(tmp_path / "good.jpg", size=(64, 64))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"definitely not a png")
    empty = tmp_path / "empty.jpg"
    empty.touch()
    cases = [
        (truncated, "cannot decode image"),
        (corrupt, "cannot decode image"),
        (empty, "empty image file"),
        (tmp_path / "missing.jpg", "no such image file"),
    ]
    for path, reason in cases:
        with pytest.raises(BadInputError, match=reason) as info:
            load_image(path)
        assert info.value.source == str(path)


def test_load_image_scales_16_bit_and_float_images_to_8_bits(tmp_path):
    import numpy as np

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32)
    expected = (ramp / 257).round()  # the 8-bit picture a viewer sees
    for name, array in [("g16.png", ramp.astype(np.uint16)), ("i32.tif", ramp.astype(np.int32)),
                        ("f.tif", (ramp / 65535).astype(np.float32))]:  # fmt: skip
        Image.fromarray(array).save(tmp_path / name)
        pixels = np.asarray(load_image(tmp_path / name), dtype=float)[..., 0]
        # PIL's own conversion clips 16-bit values at 255 (white) and floats in [0, 1] to 0
        assert abs(pixels - expected).max() <= 1, name


def test_load_image_reads_the_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (16, 16), color) for color in ((250, 0, 0), (0, 0, 250))]
    for name in ("a.gif", "a.png", "a.webp"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=50)
        picture = load_image(tmp_path / name)
        red, _, blue = picture.getpixel((8, 8))
        assert picture.mode == "RGB" and picture.size == (16, 16) and red > 200 > blue, name


def test_load_image_refuses_a_sliver_before_decoding(tmp_path):
    """A 1-pixel-wide image is small on disk, but CLIP's resize of its short side to 224 px
    would make it billions of pixels."""
    Image.new("L", (1, 20_000)).save(tmp_path / "sliver.png")
    with pytest.raises(BadInputError, match="1x20000 .*aspect ratio"):
        load_image(tmp_path / "sliver.png")
    Image.new("L", (40, 2_000)).save(tmp_path / "tall.png")  # 1:50 (a long strip) still loads
    assert load_image(tmp_path / "tall.png").size == (40, 2_000)


def test_collect_image_paths_from_folders_and_globs(tmp_path):
    a = _save(tmp_path / "imgs" / "b.png")
    b = _save(tmp_path / "imgs" / "a.JPG")
    c = _save(tmp_path / "imgs" / "sub" / "c.webp")
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    (tmp_path / "imgs" / "._a.jpg").write_bytes(b"\x00resource fork")
    other = _save(tmp_path / "other" / "z.bmp")
    explicit = tmp_path / "other" / "photo.unusual"
    explicit.write_bytes(other.read_bytes())

    assert collect_image_paths([tmp_path / "imgs"]) == [b, a, c]
    assert collect_image_paths([str(tmp_path / "imgs" / "*")]) == [b, a, c]
    assert collect_image_paths([str(tmp_path / "**" / "*.bmp")]) == [other]
    # files are taken as named, duplicates once, in argument order
    assert collect_image_paths([explicit, tmp_path / "imgs" / "sub", c, str(other)]) == [
        explicit,
        c,
        other,
    ]


def test_collect_image_paths_bad_arguments(tmp_path):
    good = _save(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    missing, pattern, empty = tmp_path / "nope.jpg", str(tmp_path / "*.gif"), tmp_path / "empty"
    log = SkipLog()
    assert collect_image_paths([missing, good, pattern, empty], skip_log=log) == [good]
    assert [(e.source, e.reason) for e in log.items] == [
        (str(missing), "no such file or folder"),
        (pattern, "pattern matches no image files"),
        (str(empty), f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder"),
    ]
    with pytest.raises(BadInputError, match=r"\*\.gif: pattern matches no image files"):
        collect_image_paths([good, pattern])
    with pytest.raises(BadInputError, match="nope.jpg"):
        collect_image_paths([missing], skip_log=SkipLog(strict=True))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("COCO_val2014_000000391895.jpg", "391895"),
        ("/x/COCO_train2014_000000000009.png", "9"),
        ("000000397133.jpg", "397133"),
        ("1000092795.jpg", "1000092795"),
        ("0013ea2087020901.jpg", "0013ea2087020901"),
        ("my photo.jpeg", "my photo"),
    ],
)
def test_image_id_for(name, expected):
    assert image_id_for(name) == expected
