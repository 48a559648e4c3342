"""Print a world's scene and caption statistics beside COCO's published figures.

python bench/world_realism.py --preset coco --scenes 3000
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from pairfree.world.statistics import COCO_ANCHORS, world_statistics
from pairfree.world.variants import world_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="coco", help="world preset (default: coco)")
    parser.add_argument("--scenes", type=int, default=3000, help="scenes to sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stats = asdict(world_statistics(world_preset(args.preset), scenes=args.scenes, seed=args.seed))
    print(f"| figure | world `{args.preset}` ({args.scenes} scenes) | COCO | source |")
    print("|---|---|---|---|")
    for name, value in stats.items():
        if name == "scenes":
            continue
        anchor, source = COCO_ANCHORS.get(name, (None, ""))
        print(f"| {name} | {value:.2f} | {'' if anchor is None else anchor} | {source} |")


if __name__ == "__main__":
    main()
