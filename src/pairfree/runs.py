"""A training run folder as the trainer writes it (``config.json``, ``metrics.jsonl``,
``run.json``, ``metrics_<split>.md``), read back for the model card and the report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairfree.errors import PairfreeError


@dataclass
class RunRecord:
    """What a training run folder holds, read once."""

    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)  # logged training steps
    evals: list[dict[str, Any]] = field(default_factory=list)  # validations: step + metrics
    run: dict[str, Any] = field(default_factory=dict)  # run.json: sessions
    evaluations: dict[str, str] = field(default_factory=dict)  # split -> markdown table

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        config = path / "config.json"
        if not config.is_file():
            raise PairfreeError(f"{path} is not a training run (no config.json)")
        record = cls(path, json.loads(config.read_text(encoding="utf-8")))
        metrics = path / "metrics.jsonl"
        lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
        for number, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                if number == len(lines):
                    continue  # a line cut by an interruption
                raise PairfreeError(f"{metrics}:{number}: not JSON ({err.msg})") from None
            if (not isinstance(item, dict) or not isinstance(item.get("step"), int)
                    or not isinstance(item.get("eval", {}), dict)):  # fmt: skip
                raise PairfreeError(f"{metrics}:{number}: not a metrics record (an object with "
                                    "a whole-number step)")  # fmt: skip
            if "eval" in item:
                record.evals.append({"step": item["step"], **item["eval"]})
            else:
                record.train.append(item)
        if (path / "run.json").is_file():
            record.run = json.loads((path / "run.json").read_text(encoding="utf-8"))
        for table in sorted(path.glob("metrics_*.md")):
            record.evaluations[table.stem.removeprefix("metrics_")] = table.read_text("utf-8")
        return record
