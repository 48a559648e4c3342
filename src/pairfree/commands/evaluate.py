"""``pairfree evaluate``: COCO-style metrics (and CLIPScore, NoCaps domains) for predictions."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import add_device, add_image_root


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predictions against references (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, "
        "CLIPScore, CHAIR)",
        description=(
            "Score COCO results JSON [{image_id, caption}] against the references of a "
            "Karpathy/COCO/NoCaps JSON with pycocoevalcap's scorers and PTB tokenizer (Java). "
            "SPICE runs when the Stanford CoreNLP 3.6.0 jars are present and is reported "
            "unavailable otherwise. --clip adds CLIPScore/RefCLIPScore (needs the images); "
            "--instances adds CHAIR-i/CHAIR-s (object hallucination, Rohrbach et al. 2018). "
            "NoCaps files are also scored per domain. Writes OUT.json and OUT.md (x100); by "
            "default OUT is the predictions file's name with .scores (preds.scores.json)."
        ),
    )
    p.add_argument("predictions", type=Path, help="COCO results JSON")
    p.add_argument("references", type=Path, help="Karpathy/COCO/NoCaps JSON with references")
    p.add_argument("--split", default="test", help="split of a Karpathy file (default: test)")
    p.add_argument("--format", default="auto", help="references format (default: detect)")
    add_image_root(p)  # for CLIPScore
    p.add_argument("--clip", default=None, help="CLIP spec for CLIPScore/RefCLIPScore")
    p.add_argument("--spice-dir", default=None, help="folder with SPICE and its CoreNLP jars")
    p.add_argument(
        "--instances",
        type=Path,
        action="append",
        default=None,
        help="COCO instance annotations (instances_val2014.json) for CHAIR; repeat to join "
        "files (train2014 + val2014). Every predicted image must be listed in one",
    )
    p.add_argument(
        "--chair-instances-only",
        action="store_true",
        help="CHAIR's ground truth is the instances alone (default: the instances plus the "
        "objects the references mention, as the paper)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output prefix: writes OUT.json and OUT.md (default: PREDICTIONS.scores; "
        "a .json or .md ending is taken off)",
    )
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from pairfree.data import load_image, read_images
    from pairfree.errors import BadInputError, PairfreeError
    from pairfree.evaluate import evaluate
    from pairfree.io import check_output, read_json
    from pairfree.locks import output_lock

    out = args.out or args.predictions.with_suffix("").with_name(
        args.predictions.with_suffix("").name + ".scores"
    )
    if out.suffix in (".json", ".md"):  # `--out scores.json` means the prefix `scores`
        out = out.with_suffix("")
    json_out, md_out = Path(f"{out}.json"), Path(f"{out}.md")
    for path in (json_out, md_out):
        check_output(path, inputs=[args.predictions, args.references, *(args.instances or ())])
    with output_lock(json_out), output_lock(md_out):
        predictions = read_json(args.predictions)
        if not isinstance(predictions, list):
            raise BadInputError(args.predictions, "expected a JSON list of {image_id, caption} "
                                "objects (COCO's results format)")  # fmt: skip
        items = read_images(  # image files are read (and checked) for CLIPScore only
            args.references,
            format=args.format,
            split=args.split,
            image_root=args.image_root,
            allow_outside_root=args.allow_outside_root,
            files=bool(args.clip),
        )
        references = {it.image_id: list(it.references) for it in items if it.references}
        domains = {it.image_id: it.domain for it in items if it.domain} or None
        clip = images = None
        if args.clip:
            from pairfree.clip import load_clip

            clip = load_clip(args.clip, device=args.device)
            wanted = {str(p["image_id"]) for p in predictions}
            images = {}
            for it in items:
                if it.image_id in wanted:
                    try:
                        images[it.image_id] = load_image(it.path)
                    except BadInputError as err:
                        raise PairfreeError(
                            f"CLIPScore needs every predicted image: {err}"
                        ) from None
        instances = None
        if args.instances:
            from pairfree.evaluate.chair import read_coco_instances

            instances = {}
            for path in args.instances:
                for image_id, objects in read_coco_instances(path).items():
                    instances.setdefault(image_id, set()).update(objects)
        report = evaluate(
            predictions,
            references,
            domains=domains,
            clip=clip,
            images=images,
            spice_dir=args.spice_dir,
            instances=instances,
            chair_references=not args.chair_instances_only,
        )
        print(report.to_markdown())  # first, so a failing write below loses no scores
        json_path, md_path = report.write(out)
        print(f"wrote {json_path} and {md_path}")
        return 0
