"""A self-contained HTML report of training runs: loss and validation curves (inline SVG), the
config, seed, versions, command line and wall time of each run, its evaluation tables, and a
glossary of the metrics. ``pairfree report RUN_DIR...`` writes it; the demo adds its world
examples to the same page.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pairfree.io import strict_json
from pairfree.runs import RunRecord

GLOSSARY = (
    ("B@n", "BLEU-n: n-gram precision of the caption against its references, with a brevity "
     "penalty (x100)."),
    ("M", "METEOR 1.5: unigram matches with stems and synonyms, recall-weighted (x100)."),
    ("R", "ROUGE-L: longest common subsequence F-measure (x100)."),
    ("C", "CIDEr-D: tf-idf weighted n-gram agreement with the references (x100; can exceed 100)."),
    ("S", "SPICE: F-score over scene-graph tuples (needs Stanford CoreNLP)."),
    ("CLIP-S", "CLIPScore: 100 x 2.5 x max(cosine(image, caption), 0) under the CLIP named; can "
     "exceed 100. RefCLIP-S adds the references."),
    ("CHAIR-i / CHAIR-s", "object hallucination (Rohrbach et al., EMNLP 2018): % of object "
     "mentions / % of captions naming an object the image lacks (COCO instances plus the "
     "references' objects; in the world, a shape the scene lacks). Lower is better."),
    ("obj P / obj R / exact", "shapes world only: % of named objects that are in the image, % "
     "of the image's objects that are named, % of captions whose whole scene is right."),
    ("val_loss", "length-normalized caption negative log-likelihood on the held-out split."),
    ("val_CIDEr+BLEU_4", "ICSD's checkpoint selection: validation CIDEr plus BLEU-4."),
)  # fmt: skip
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def svg_chart(series: dict[str, list[tuple[float, float]]], *, title: str) -> str:
    """A line chart of each named series of (step, value) points, as inline SVG."""
    points = [(x, y) for values in series.values() for x, y in values if math.isfinite(y)]
    if not points:
        return ""
    width, height, pad = 520, 220, 46
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / (x1 - x0) * (width - 2 * pad)
        py = height - pad + (y0 - y) / (y1 - y0) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">'
             f"{html.escape(title)}</text>",
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
             'stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>']  # fmt: skip
    for value, y in ((y0, height - pad), (y1, pad)):
        parts.append(f'<text x="{pad - 4}" y="{y + 4}" text-anchor="end" font-size="10">'
                     f"{value:.4g}</text>")  # fmt: skip
    for value, x in ((x0, pad), (x1, width - pad)):
        parts.append(f'<text x="{x}" y="{height - pad + 14}" text-anchor="middle" '
                     f'font-size="10">{value:.0f}</text>')  # fmt: skip
    parts.append(f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle" '
                 'font-size="10">step</text>')  # fmt: skip
    for k, (name, values) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        line = " ".join(at(x, y) for x, y in values if math.isfinite(y))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                     f'points="{line}"/>')  # fmt: skip
        parts.append(f'<text x="{width - pad}" y="{pad + 12 * k}" text-anchor="end" '
                     f'font-size="11" fill="{color}">{html.escape(name)}</text>')  # fmt: skip
    return "".join(parts) + "</svg>"


def _finite(value: Any) -> float | None:
    """A logged value as a number to draw: None for NaN and infinities (the trainer logs them
    as null), strings, booleans and anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _points(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], y) for r in records if (y := _finite(r.get(key))) is not None]


def run_section(run: RunRecord) -> str:
    """One run's part of the report. Every text in it is escaped (a run's folder name, config
    and metric names are anyone's), and a loss or metric that is NaN, infinite or missing is
    left out of its chart rather than stopping the page."""
    series = {k: _points(run.train, k) for k in sorted({k for r in run.train for k in r
                                                         if "loss" in k})}  # fmt: skip
    series.update({k: _points(run.evals, k)
                   for k in sorted({k for e in run.evals for k in e if "loss" in k})})  # fmt: skip
    charts = [svg_chart(series, title="loss")]
    others = sorted({k for e in run.evals for k in e if k != "step" and "loss" not in k})
    for key in others:
        charts.append(svg_chart({key: _points(run.evals, key)}, title=key))
    config = run.config if isinstance(run.config, dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    sessions = [s for s in run.run.get("sessions", []) if isinstance(s, dict)]
    wall = sum(w for s in sessions if (w := _finite(s.get("wall_s"))) is not None)
    versions = sessions[-1].get("versions") if sessions else None
    facts = [
        ("recipe", config.get("recipe", "?")),
        ("seed", train.get("seed", "?")),
        ("steps", run.train[-1]["step"] if run.train else "none logged"),
        ("wall time", f"{wall:.0f} s over {len(sessions)} session(s)" if sessions else "?"),
        ("command", " ".join(map(str, sessions[0].get("command") or ["?"])) if sessions else "?"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())
         if isinstance(versions, dict) else "?"),
    ]  # fmt: skip
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in facts)  # fmt: skip
    tables = "".join(
        f"<h3>evaluation: {html.escape(split)}</h3>{markdown_to_html(text)}"
        for split, text in run.evaluations.items()
    )
    return (
        f'<section class="run"><h2>{html.escape(str(run.path))}</h2>'
        f'<table class="facts">{rows}</table><div class="charts">{"".join(charts)}</div>'
        f"{tables}<details><summary>config</summary><pre>"
        f"{html.escape(json.dumps(strict_json(run.config), indent=2, allow_nan=False))}"
        "</pre></details></section>"
    )


def markdown_to_html(text: str) -> str:
    """The metrics tables pairfree writes (pipe tables, then notes) as HTML."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    notes = [line[2:] for line in text.splitlines() if line.startswith("- ")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    body = [c for c in cells[1:] if not all(set(x) <= set("-: ") for x in c)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (cells[0] if cells else []))
    table = f"<table><tr>{head}</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
    ) + "</table>"  # fmt: skip
    return table + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)


def glossary() -> str:
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in GLOSSARY)
    return f"<h2>Glossary</h2><dl>{items}</dl>"


STYLE = """body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc;
padding: 4px 8px; } th { text-align: left; background: #f4f4f4; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } .note { color: #666; font-size: 90%; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } .card { width: 300px; }
.card img { width: 192px; image-rendering: pixelated; } .right { color: #2ca02c; }
.wrong { color: #d62728; } dt { font-weight: bold; } pre { font-size: 80%; }"""


def run_report(runs: Sequence[str | Path], *, title: str = "pairfree runs", extra: str = "") -> str:
    """The whole page for ``runs`` (run folders); ``extra`` is HTML placed before the runs."""
    sections = "".join(run_section(RunRecord.read(r)) for r in runs)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{extra}"
            f"{sections}{glossary()}</body></html>\n")  # fmt: skip
