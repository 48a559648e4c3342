"""The shapes-world demo: from nothing to a results table on a laptop CPU in minutes.

``methods`` says what is trained (the method catalog and the world-scale recipe configs),
``run`` trains and scores the methods (text-only runs in parallel processes), ``report``
writes the markdown table and the HTML page. ``bench/world.py`` runs the same methods over
seeds and settings.
"""

from pairfree.demo.methods import (
    DEMO_METHODS,
    FULL_METHODS,
    GAN_METHODS,
    ICSD_METHODS,
    IFCAP_METHODS,
    NOISE_SWEEP,
    PAIRED_UPPER_BOUND,
    PCMNET_METHODS,
    SACAP_METHODS,
    TEXT_METHODS,
    VIECAP_METHODS,
    DemoConfig,
    Method,
    MethodResult,
)
from pairfree.demo.report import html_report, results_table
from pairfree.demo.run import run_demo, run_methods

__all__ = [
    "DEMO_METHODS",
    "FULL_METHODS",
    "GAN_METHODS",
    "NOISE_SWEEP",
    "PAIRED_UPPER_BOUND",
    "ICSD_METHODS",
    "SACAP_METHODS",
    "IFCAP_METHODS",
    "PCMNET_METHODS",
    "VIECAP_METHODS",
    "TEXT_METHODS",
    "DemoConfig",
    "Method",
    "MethodResult",
    "html_report",
    "results_table",
    "run_demo",
    "run_methods",
]
