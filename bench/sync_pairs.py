"""How right SynC's re-assignment is in the shapes world, where every synthetic image's prompt
and known mistakes are on record.

For a re-assigned folder (``pairfree synthesize reassign``, or a run's ``reassigned/``) and
the ``synthesize images`` folder it was made from:

- the retriever: the rank of each caption's own image among all images by text-to-image
  cosine, and of its caption among all captions by image-to-text cosine (from the folder's
  cached encodings);
- the pairs: for the captions' own images and for SynC's kept pairs, the share of the
  caption's objects (shape and color, parsed by the world's grammar) that the image's prompt
  names, how often it names all of them, and how often it names all of them and was drawn
  without a known mistake.

    python bench/sync_pairs.py runs/bench-pcm/runs/sacap-sync--coco-0/reassigned \\
        runs/bench-pcm/synthetic/coco-0-6000/own
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from pairfree.data import read_images
from pairfree.features import FeatureStore
from pairfree.world.language import parse_caption


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def ranks(similarity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each row's rank (0: first) of its target column."""
    return (similarity > similarity.gather(1, target[:, None])).sum(1)


def retrieval(reassigned: Path, source: Path) -> None:
    features = reassigned / "features"
    images = FeatureStore(next(features.glob("images-*")))
    texts = FeatureStore(next(features.glob("captions-*")))
    items = [it for it in read_images(source / "dataset.jsonl") if it.path is not None]
    captions = list(dict.fromkeys(it.references[0] for it in items))
    own: dict[str, int] = {}
    for row, it in enumerate(items):
        own.setdefault(it.references[0], row)
    image = F.normalize(images.tensor()[[images.row(it.image_id) for it in items]], dim=-1)
    text = F.normalize(texts.tensor()[[texts.text_row(c) for c in captions]], dim=-1)
    to_image = ranks(text @ image.T, torch.tensor([own[c] for c in captions]))
    of_own = torch.tensor([own[c] for c in captions])
    to_text = ranks(image[of_own] @ text.T, torch.arange(len(captions)))
    print(f"{len(captions)} captions, {len(items)} images")
    print(f"text -> image, the caption's own image: R@1 {100 * (to_image == 0).float().mean():.1f} "
          f"%, R@15 {100 * (to_image < 15).float().mean():.1f} %, median rank "
          f"{int(to_image.median())}")  # fmt: skip
    print(f"image -> text, the own image's caption: R@1 {100 * (to_text == 0).float().mean():.1f} "
          f"%, R@2 {100 * (to_text < 2).float().mean():.1f} %")  # fmt: skip


def pairs(reassigned: Path, source: Path) -> None:
    manifest = {r["id"]: r for r in read_jsonl(source / "manifest.jsonl")}
    every = read_jsonl(reassigned / "reassignment.jsonl")
    kept = [r for r in every if r["kept"]]

    def named(caption: str, image: str) -> float:
        wanted = Counter(o.key for o in parse_caption(caption).objects)
        drawn = Counter(o.key for o in parse_caption(manifest[image]["prompt"]).objects)
        total = sum(wanted.values())
        return sum(min(n, drawn[k]) for k, n in wanted.items()) / total if total else 0.0

    print("| pairs | n | caption's objects the prompt names | all named | all named, no known "
          "mistake |\n| --- | ---: | ---: | ---: | ---: |")  # fmt: skip
    for name, rows, field in (("own image, every caption", every, "own"),
                              ("own image, kept captions", kept, "own"),
                              ("SynC's image, kept pairs", kept, "assigned")):  # fmt: skip
        shares = [(named(r["caption"], r[field]), not manifest[r[field]]["mistakes"])
                  for r in rows if r[field]]  # fmt: skip
        n = len(shares)
        mean = 100 * sum(x for x, _ in shares) / n
        full = 100 * sum(x == 1.0 for x, _ in shares) / n
        clean = 100 * sum(x == 1.0 and ok for x, ok in shares) / n
        print(f"| {name} | {n} | {mean:.1f} % | {full:.1f} % | {clean:.1f} % |")
    uses = Counter(r["assigned"] for r in kept)
    moved = sum(r["assigned"] != r["own"] for r in kept)
    print(f"kept pairs on another image than their own: {moved} of {len(kept)}; captions per "
          f"image used: mean {len(kept) / len(uses):.2f}, most {max(uses.values())}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reassigned", type=Path, help="a re-assigned folder")
    parser.add_argument("source", type=Path, help="the synthesize-images folder it came from")
    args = parser.parse_args()
    retrieval(args.reassigned, args.source)
    pairs(args.reassigned, args.source)


if __name__ == "__main__":
    main()
