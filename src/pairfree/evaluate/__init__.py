"""Paper-style caption evaluation: COCO metrics, SPICE, CLIPScore, CHAIR, NoCaps domains,
reports."""

from pairfree.evaluate.chair import chair_scores, object_mentions, read_coco_instances
from pairfree.evaluate.clipscore import clip_scores, clip_scores_per_image
from pairfree.evaluate.coco import METRICS, caption_metrics, nocaps_metrics
from pairfree.evaluate.report import EvaluationReport, evaluate, format_score, markdown_table
from pairfree.evaluate.spice import spice_status

__all__ = [
    "METRICS",
    "EvaluationReport",
    "caption_metrics",
    "chair_scores",
    "clip_scores",
    "clip_scores_per_image",
    "evaluate",
    "format_score",
    "markdown_table",
    "nocaps_metrics",
    "object_mentions",
    "read_coco_instances",
    "spice_status",
]
