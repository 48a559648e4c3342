"""Write a world to disk in the formats real datasets come in.

``out_dir`` gets:

- ``images/<split>_<index>.png``;
- ``dataset_world.json``: Karpathy format (``images[].{filepath, filename, imgid, split,
  sentids, sentences[].{raw, tokens, imgid, sentid}}``) plus each image's ``scene`` and, in
  worlds with held-out words, its ``domain`` (in / near / out);
- ``corpus.txt``: the text-only corpus, one caption per line, from scenes that are sampled
  but never rendered (their random streams are disjoint from the images');
- ``scenes.json``: image id (the file name without ``.png``) -> scene;
- ``phrases.txt``: the object phrases of the world's grammar ("red circle", "circle", ...),
  held-out words excluded: SaCap's hard-prompt vocabulary;
- ``entities.txt``: every single-word object noun of the world's language, synonyms and
  held-out words included (as Visual Genome's vocabulary holds objects a corpus never
  names): ViECap's entity vocabulary and classes;
- ``world.json``: the parameters. A rerun with the same parameters resumes, keeping the
  images already written; a rerun with others is refused.

Train images are the unpaired image pool of the GAN recipes; their captions are in the JSON
only for paired upper bounds. Every file is written atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from pairfree.errors import BadInputError, PairfreeError, SkipLog
from pairfree.io import atomic_path, atomic_write_json, atomic_write_text
from pairfree.world.language import SHAPE_WORDS, caption_scene, reference_captions
from pairfree.world.render import render_scene
from pairfree.world.scene import Scene
from pairfree.world.variants import WorldConfig, world_preset

_STREAMS = {"train": 0, "val": 1, "test": 2, "corpus": 3}


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    images: Path
    dataset: Path
    corpus: Path
    scenes: Path
    phrases: Path
    entities: Path


def _stream(seed: int, name: str, index: int) -> np.random.Generator:
    """The random stream of one item, so each item is reproducible on its own."""
    return np.random.default_rng([seed, _STREAMS[name], index])


def _write_png(image: Image.Image, path: Path) -> None:
    """Rename into place without an fsync per file: a killed run never leaves half an
    image, and syncing thousands of tiny files would cost more than drawing them."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1)


def entity_words() -> list[str]:
    """Every single-word shape noun of the world's language (ViECap's entity vocabulary)."""
    return [w for forms in SHAPE_WORDS.values() for w in forms if " " not in w]


def object_phrases(config: WorldConfig) -> list[str]:
    """Every "<color> <shape>" and bare shape the world's training captions can name."""
    shapes, colors = config.seen(config.shapes), config.seen(config.colors)
    return [f"{c} {s}" for s in shapes for c in colors] + list(shapes)


def make_world(
    out_dir: str | Path,
    *,
    preset: str | WorldConfig = "default",
    n_train_images: int = 2000,
    n_val: int = 200,
    n_test: int = 200,
    n_corpus: int = 10000,
    seed: int = 0,
    image_size: int | None = None,
) -> WorldPaths:
    """Sample, render and write a world (see the module docstring). Test images of a world
    with held-out words may contain them; nothing else does."""
    config = world_preset(preset) if isinstance(preset, str) else preset
    if image_size is not None:
        config = replace(config, image_size=image_size)
    counts = {"train": n_train_images, "val": n_val, "test": n_test, "corpus": n_corpus}
    for name, n in counts.items():
        if n < 0:
            raise PairfreeError(f"make_world: the number of {name} items must be >= 0, got {n}")
    root = Path(out_dir)
    paths = WorldPaths(
        root=root,
        images=root / "images",
        dataset=root / "dataset_world.json",
        corpus=root / "corpus.txt",
        scenes=root / "scenes.json",
        phrases=root / "phrases.txt",
        entities=root / "entities.txt",
    )
    params = json.loads(json.dumps({"seed": seed, "counts": counts, "config": asdict(config)}))
    params_path = root / "world.json"
    if params_path.exists():
        if json.loads(params_path.read_text(encoding="utf-8")) != params:
            raise PairfreeError(
                f"{root} already holds a world made with other parameters ({params_path}); "
                "choose another directory"
            )
        stems = (
            f"{split}_{i:06d}" for split in ("train", "val", "test") for i in range(counts[split])
        )
        files = [paths.dataset, paths.corpus, paths.scenes, paths.phrases]
        if all(f.exists() for f in files) and all(
            (paths.images / f"{s}.png").exists() for s in stems
        ):
            if not paths.entities.exists():  # a world made before the file was
                atomic_write_text(paths.entities, "".join(w + "\n" for w in entity_words()))
            return paths  # whole: sampling it again would write the same files
    else:
        atomic_write_json(params_path, params)

    entries, scenes, next_sentid = [], {}, 0
    for split in ("train", "val", "test"):
        for index in range(counts[split]):
            rng = _stream(seed, split, index)
            scene = config.sample_scene(rng, include_held_out=split == "test")
            captions = reference_captions(scene, rng, config.phrasing, config.captions_per_image)
            stem = f"{split}_{index:06d}"
            image_path = paths.images / f"{stem}.png"
            if not image_path.exists():
                image = render_scene(scene, rng, size=config.image_size, style=config.render)
                _write_png(image, image_path)
            imgid = len(entries)
            sentids = list(range(next_sentid, next_sentid + len(captions)))
            next_sentid += len(captions)
            entry = {
                "filepath": paths.images.name,
                "filename": image_path.name,
                "imgid": imgid,
                "split": split,
                "sentids": sentids,
                "sentences": [
                    {
                        "raw": c,
                        "tokens": re.findall(r"[a-z0-9]+", c.lower()),
                        "imgid": imgid,
                        "sentid": s,
                    }
                    for c, s in zip(captions, sentids, strict=True)
                ],
                "scene": scene.to_dict(),
            }
            if config.held_out:
                entry["domain"] = config.domain(scene)
            entries.append(entry)
            scenes[stem] = scene.to_dict()

    corpus = []
    for index in range(n_corpus):
        rng = _stream(seed, "corpus", index)
        corpus.append(caption_scene(config.sample_scene(rng), rng, config.phrasing))
    atomic_write_json(paths.scenes, scenes, indent=None)
    atomic_write_text(paths.corpus, "".join(line + "\n" for line in corpus))
    atomic_write_text(paths.phrases, "".join(p + "\n" for p in object_phrases(config)))
    atomic_write_text(paths.entities, "".join(w + "\n" for w in entity_words()))
    atomic_write_json(
        paths.dataset, {"dataset": "world", "world": config.name, "images": entries}, indent=None
    )
    return paths


def load_scenes(path: str | Path, *, skip_log: SkipLog | None = None) -> dict[str, Scene]:
    """Read ``scenes.json``; a bad scene is skipped into ``skip_log`` (raised without one)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadInputError(path, f"not valid JSON: {e.msg}", line=e.lineno) from e
    if not isinstance(data, dict):
        raise BadInputError(path, "expected a JSON object mapping image ids to scenes")
    scenes = {}
    for image_id, value in data.items():
        try:
            scenes[image_id] = Scene.from_dict(value)
        except ValueError as e:
            error = BadInputError(path, str(e), item_id=image_id)
            if skip_log is None:
                raise error from e
            skip_log.skip(error)
    return scenes
