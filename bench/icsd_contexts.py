"""What ICSD's multi-context and single-context training images hold, against the world's test
images: objects per image, how many of them the paired caption names, and how often ICSD's
augmentation (a random crop of 50-100 % of the area) leaves an object out of the picture. Reads a world ICSD run's synthetic data (the demo's or
``bench/world.py``'s); draws nothing new.

    python bench/icsd_contexts.py runs/bench-world --seed 0
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torchvision.transforms import RandomResizedCrop

from pairfree.demo import DemoConfig
from pairfree.evaluate import markdown_table
from pairfree.recipes.icsd import pre_caption
from pairfree.world.language import parse_caption
from pairfree.world.scene import Scene
from pairfree.world.synth import WorldTextToImage
from pairfree.world.variants import world_preset


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def row(name: str, pairs: list[tuple[Scene, str]]) -> list[str]:
    """(scene of the image, caption paired with it) -> the table's cells."""
    scenes = {id(scene): scene for scene, _ in pairs}
    named, covered, true = [], [], []
    for scene, caption in pairs:
        present = {(o.shape, o.color) for o in scene.objects}
        said = [(o.shape, o.color) for o in parse_caption(caption).objects]
        named.append(len(said))
        covered.append(len(set(said) & present) / len(present))
        true.append(sum(s in present for s in said) / max(1, len(said)))
    per_image = statistics.mean(len(s.objects) for s in scenes.values())
    cells = [per_image, statistics.mean(named), 100 * statistics.mean(covered),
             100 * statistics.mean(true)]  # fmt: skip
    return [name, str(len(scenes)), str(len(pairs)), *(f"{c:.2f}" for c in cells)]


def crop_losses(scenes: list[Scene], size: int, n: int = 5000) -> tuple[float, float]:
    """% of objects whose cell center a random 50-100 % crop leaves out; % of crops losing one."""
    torch.manual_seed(0)
    lost = total = losing = 0
    for k in range(n):
        scene = scenes[k % len(scenes)]
        top, left, h, w = RandomResizedCrop.get_params(torch.zeros(3, size, size), (0.5, 1.0),
                                                       (3 / 4, 4 / 3))  # fmt: skip
        out = 0
        for obj in scene.objects:
            y, x = ((c + 0.5) * size / 3 for c in obj.position)
            out += not (top <= y < top + h and left <= x < left + w)
        lost, total, losing = lost + out, total + len(scene.objects), losing + (out > 0)
    return 100 * lost / total, 100 * losing / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the demo's or bench/world.py's --out folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    cfg = DemoConfig(out=str(args.out), preset=args.preset, seed=args.seed)
    root = cfg.synthetic_dir / "icsd"
    draw = WorldTextToImage(world_preset(args.preset))

    images = {r["source"]: r for r in read_jsonl(root / "images" / "manifest.jsonl")
              if r["status"] == "ok" and not r["nsfw"]}  # fmt: skip
    multi = []
    for summary in read_jsonl(root / "summaries" / "summaries.jsonl"):
        if summary["id"] in images:
            record = images[summary["id"]]
            scene = draw.scene_for(record["prompt"], record["seed"])
            multi += [(scene, pre_caption(c, 30)) for c in summary["captions"]]
    single = [(draw.scene_for(r["prompt"], r["seed"]), pre_caption(r["prompt"], 30))
              for r in read_jsonl(root / "single" / "manifest.jsonl") if r["status"] == "ok"]  # fmt: skip
    data = json.loads((cfg.world().dataset).read_text(encoding="utf-8"))
    scenes = [(Scene.from_dict(im["scene"]), im) for im in data["images"] if im["split"] == "test"]
    test = [(scene, s["raw"]) for scene, im in scenes for s in im["sentences"]]
    header = ["images", "count", "pairs", "objects per image", "objects a caption names",
              "% of the image's objects named", "% of named objects in the image"]  # fmt: skip
    rows = [row("multi-context (ICSD)", multi), row("single-context", single),
            row("world test images (references)", test)]  # fmt: skip
    print(f"world {args.preset!r}, seed {args.seed}")
    print(markdown_table(header, rows))
    print()
    for name, pairs in (("multi-context", multi), ("single-context", single)):
        lost, losing = crop_losses(list({id(s): s for s, _ in pairs}.values()), 64)
        print(f"augmentation of the {name} images: {lost:.1f} % of objects outside the crop; "
              f"{losing:.1f} % of crops lose one")  # fmt: skip


if __name__ == "__main__":
    main()
