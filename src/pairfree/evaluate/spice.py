"""SPICE (Anderson et al. 2016) through the SPICE-1.0 jar that pycocoevalcap bundles.

SPICE parses captions with Stanford CoreNLP 3.6.0, whose two jars (~400 MB) pycocoevalcap's
``Spice()`` downloads on first use. Nothing is downloaded here: availability is checked up
front, and without the jars SPICE is reported unavailable together with how to enable it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pairfree.errors import PairfreeError

SPICE_JAR = "spice-1.0.jar"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


def default_spice_dir() -> Path:
    """pycocoevalcap's own ``spice/`` folder (``spice-1.0.jar`` plus ``lib/``)."""
    spec = importlib.util.find_spec("pycocoevalcap.spice")
    if spec is None or spec.origin is None:
        raise PairfreeError("pycocoevalcap is not installed: pip install pycocoevalcap")
    return Path(spec.origin).parent


def spice_status(spice_dir: str | Path | None = None) -> tuple[bool, str]:
    """Whether SPICE can run from ``spice_dir`` (a SPICE-1.0 folder), and a message saying why
    not and how to enable it. Only looks at files; never downloads."""
    spice_dir = Path(spice_dir) if spice_dir is not None else default_spice_dir()
    lib = spice_dir / "lib"
    if shutil.which("java") is None:
        return False, "SPICE unavailable: no `java` on PATH; install a Java runtime (8 or newer)."
    if not (spice_dir / SPICE_JAR).is_file():
        return False, (
            f"SPICE unavailable: {spice_dir / SPICE_JAR} not found; pass spice_dir= a SPICE-1.0 "
            "folder (spice-1.0.jar with its lib/), e.g. pycocoevalcap's spice/ folder."
        )
    missing = [jar for jar in CORENLP_JARS if not (lib / jar).is_file()]
    if missing:
        return False, (
            f"SPICE unavailable: {' and '.join(missing)} not found in {lib}. To enable it, "
            f"download {CORENLP_URL} (~400 MB) and copy {' and '.join(CORENLP_JARS)} from it "
            f"into {lib}, or run `python -c 'from pycocoevalcap.spice.get_stanford_models import "
            "get_stanford_models as g; g()'` where the network is reachable."
        )
    return True, f"SPICE available ({spice_dir / SPICE_JAR})"


def spice_per_image(
    gts: Mapping[str, Sequence[str]],
    res: Mapping[str, Sequence[str]],
    spice_dir: str | Path | None = None,
) -> dict[str, float]:
    """SPICE F-score of each image's (tokenized) candidate against its references.

    The command is pycocoevalcap's except for ``-cache``: its LMDB/FST cache fails to load on
    Java 9+ and on platforms without lmdbjni natives, and scores do not depend on it.
    """
    available, message = spice_status(spice_dir)
    if not available:
        raise PairfreeError(message)
    spice_dir = Path(spice_dir) if spice_dir is not None else default_spice_dir()
    ids = list(res)
    items = [
        {"image_id": index, "test": res[i][0], "refs": list(gts[i])} for index, i in enumerate(ids)
    ]
    with tempfile.TemporaryDirectory(prefix="pairfree-spice-") as tmp:
        in_path, out_path = Path(tmp) / "input.json", Path(tmp) / "output.json"
        in_path.write_text(json.dumps(items), encoding="utf-8")
        command = ["java", "-jar", "-Xmx8G", SPICE_JAR, str(in_path)]
        command += ["-out", str(out_path), "-subset", "-silent"]
        run = subprocess.run(command, cwd=spice_dir, capture_output=True, text=True)
        if run.returncode != 0:
            tail = "\n".join(run.stderr.strip().splitlines()[-15:])
            raise PairfreeError(f"SPICE failed (exit {run.returncode}) in {spice_dir}:\n{tail}")
        results = json.loads(out_path.read_text(encoding="utf-8"))
    scores = {int(item["image_id"]): _as_float(item["scores"]["All"]["f"]) for item in results}
    return {i: scores[index] for index, i in enumerate(ids)}


def _as_float(value: object) -> float:
    """SPICE writes "NaN" for undefined scores; pycocoevalcap reads anything unparsable as NaN."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
