"""The demo's outputs: a markdown table (the one table writer of :mod:`pairfree.evaluate`)
and a self-contained HTML page with example images and captions."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

from pairfree.data import load_image, read_images
from pairfree.demo.methods import MethodResult
from pairfree.evaluate import format_score, markdown_table
from pairfree.world import WorldPaths

COCO_COLUMNS = (("Bleu_4", "B@4"), ("METEOR", "M"), ("ROUGE_L", "R"), ("CIDEr", "C"))
CLIP_COLUMNS = (("CLIPScore", "CLIP-S"),)
TRUTH_COLUMNS = (
    ("object_precision", "obj P"),
    ("object_recall", "obj R"),
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


def html_report(results: Sequence[MethodResult], world: WorldPaths, *, examples: int = 12) -> str:
    """A self-contained HTML page: the metrics table and example images with captions."""
    items = read_images(world.dataset, split="test")[:examples]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td>"
        + "".join(f"<td>{format_score(r.scores.get(k))}</td>" for k, _ in COLUMNS)
        + "</tr>"
        for r in results
    )
    cards = []
    for it in items:
        buf = io.BytesIO()
        load_image(it.path).save(buf, format="PNG")
        src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        generated = "".join(
            f"<li><b>{html.escape(r.method)}</b>: {html.escape(r.captions.get(it.image_id, ''))}</li>"
            for r in results
        )
        refs = "".join(f"<li>{html.escape(t)}</li>" for t in it.references)
        cards.append(
            f'<div class="card"><img src="{src}" alt="{html.escape(it.image_id)}">'
            f"<ul>{generated}</ul><details><summary>references</summary><ul>{refs}</ul>"
            "</details></div>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pairfree demo</title><style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
td {{ text-align: right; }} td:first-child {{ text-align: left; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.card {{ width: 300px; }} .card img {{ width: 192px; image-rendering: pixelated; }}
</style></head><body>
<h1>pairfree demo: text-only captioning in the shapes world</h1>
<p>Captioners trained on captions only (no images), evaluated on held-out images. COCO metrics
and CLIPScore x100; truth metrics are percentages from parsing each caption back into
objects.</p>
<table><tr><th>method</th>{head}</tr>{rows}</table>
<h2>Examples</h2><div class="grid">{"".join(cards)}</div>
</body></html>
"""
