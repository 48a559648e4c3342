"""The demo's outputs: a markdown table (the one table writer of :mod:`pairfree.evaluate`)
and a self-contained HTML page: example images with their true scenes and each method's
captions marked by the world's truth, and each run's curves (:mod:`pairfree.evaluate.runs`)."""

from __future__ import annotations

import base64
import html
import io
import random
from collections.abc import Sequence

from pairfree.data import load_image, read_images
from pairfree.demo.methods import MethodResult
from pairfree.evaluate import format_score, markdown_table
from pairfree.evaluate.runs import run_report
from pairfree.world import WorldPaths, load_scenes
from pairfree.world.language import parse_caption
from pairfree.world.truth import is_true

COCO_COLUMNS = (("Bleu_4", "B@4"), ("METEOR", "M"), ("ROUGE_L", "R"), ("CIDEr", "C"))
CLIP_COLUMNS = (("CLIPScore", "CLIP-S"),)
TRUTH_COLUMNS = (
    ("object_precision", "obj P"),
    ("object_recall", "obj R"),
    ("salient_recall", "sal R"),
    ("chair_i", "CHAIR-i"),
    ("exact_scene", "exact"),
    ("size_accuracy", "size"),
    ("position_accuracy", "pos"),
    ("relation_accuracy", "rel"),
)
COLUMNS = COCO_COLUMNS + CLIP_COLUMNS + TRUTH_COLUMNS


def results_table(results: Sequence[MethodResult]) -> str:
    """A markdown table: one row per method, COCO metrics, CLIPScore, truth metrics."""
    rows = [
        [
            r.method,
            *(format_score(r.scores.get(key)) for key, _ in COLUMNS),
            f"{r.train_seconds:.0f}",
        ]
        for r in results
    ]
    return markdown_table(["method", *(label for _, label in COLUMNS), "train s"], rows)


def html_report(
    results: Sequence[MethodResult], world: WorldPaths, *, examples: int = 12, seed: int = 0
) -> str:
    """A self-contained HTML page: the metrics table; example test images with their true
    scene and every method's caption marked right or wrong by the world's truth (the worst
    cases, where most methods are wrong, beside random ones); each run's training curves,
    config and versions; a glossary."""
    items = {it.image_id: it for it in read_images(world.dataset, split="test")}
    scenes = load_scenes(world.scenes)
    right = {
        (r.method, i): is_true(parse_caption(c), scenes[i], complete=scenes[i].salience is None)
        for r in results
        for i, c in r.captions.items() if i in scenes
    }  # fmt: skip
    ids = [i for i in items if i in scenes]
    wrong = {i: sum(not right.get((r.method, i), False) for r in results) for i in ids}
    worst = sorted(ids, key=lambda i: -wrong[i])[: examples // 2]
    rest = [i for i in ids if i not in worst]
    chosen = random.Random(seed).sample(rest, min(len(rest), examples - len(worst)))
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td>"
        + "".join(f"<td>{format_score(r.scores.get(k))}</td>" for k, _ in COLUMNS)
        + "</tr>"
        for r in results
    )

    def card(image_id: str) -> str:
        buf = io.BytesIO()
        load_image(items[image_id].path).save(buf, format="PNG")
        src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        marks = "".join(
            f'<li class="{"right" if right.get((r.method, image_id)) else "wrong"}">'
            f"{'&#10003;' if right.get((r.method, image_id)) else '&#10007;'} "
            f"<b>{html.escape(r.method)}</b>: {html.escape(r.captions.get(image_id, ''))}</li>"
            for r in results
        )
        truth = html.escape(describe(scenes[image_id]))
        return (f'<div class="card"><img src="{src}" alt="{html.escape(image_id)}">'
                f"<p>true scene: {truth}</p><ul>{marks}</ul></div>")  # fmt: skip

    runs = list(dict.fromkeys(r.run_dir for r in results if r.run_dir is not None))
    extra = (
        "<p>Captioners trained without paired data, evaluated on held-out images. COCO "
        "metrics and CLIPScore x100; truth metrics are percentages from parsing each caption "
        "back into objects (&#10003;: everything it says is true and it names every object).</p>"
        f"<table><tr><th>method</th>{head}</tr>{rows}</table>"
        f'<h2>Worst cases (most methods wrong)</h2><div class="grid">'
        f"{''.join(card(i) for i in worst)}</div>"
        f'<h2>Random examples</h2><div class="grid">{"".join(card(i) for i in chosen)}</div>'
    )
    return run_report(runs, title="pairfree demo: captioning in the shapes world", extra=extra)


def describe(scene) -> str:
    """``large red circle (row 0, col 2); small blue star (row 1, col 1)``."""
    return "; ".join(
        f"{o.size} {o.color} {o.shape} (row {o.position[0]}, col {o.position[1]})"
        for o in scene.objects
    )
