"""The one runner of every synthesis job: work in shards, resumable, split over processes.

A job's items are cut into shards; under ``torchrun`` / ``accelerate launch`` process r takes
shards r, r + world, .... A shard is done when ``OUT/shards/NNNNN.jsonl`` (its records, written
atomically) exists, so a killed job resumes at its first unfinished shard and nothing is made
twice or lost. ``OUT/synthesis.json`` records what the job makes (backend, settings, a digest
of the inputs); a rerun asking for something else is refused, never mixed in. The main process
gathers every shard's records, in order, once all are done.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from pairfree.errors import PairfreeError
from pairfree.io import atomic_write_json, atomic_write_text
from pairfree.job import Job

T = TypeVar("T")


def run_shards(
    out: Path,
    items: Sequence[T],
    process: Callable[[list[T]], list[dict]],
    *,
    request: dict,
    shard_size: int,
    batch_size: int,
    job: Job,
    desc: str,
) -> list[dict] | None:
    """Run ``process`` over batches of ``items``; the records of all shards on the main
    process (in item order, as ``process`` returned them), None elsewhere."""
    if not items:
        raise PairfreeError(f"nothing to make into {out}: no inputs")
    _claim(out, request, job)
    n_shards = -(-len(items) // shard_size)
    todo = [
        s
        for s in range(job.process_index, n_shards, job.num_processes)
        if not _shard_path(out, s).exists()
    ]
    bar = tqdm(
        total=sum(len(items[s * shard_size : (s + 1) * shard_size]) for s in todo),
        desc=desc,
        disable=not job.show_progress,
    )
    for shard in todo:
        records: list[dict] = []
        chunk = list(items[shard * shard_size : (shard + 1) * shard_size])
        for start in range(0, len(chunk), batch_size):
            batch = chunk[start : start + batch_size]
            records += process(batch)
            bar.update(len(batch))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(_shard_path(out, shard), text)
    bar.close()
    job.wait_for_everyone()
    if not job.is_main_process:
        return None
    records = []
    for shard in range(n_shards):
        path = _shard_path(out, shard)
        if not path.exists():
            raise PairfreeError(f"{path} was not written by any process")
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return records


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"{shard:05d}.jsonl"


def _claim(out: Path, request: dict, job: Job) -> None:
    """Record what this job makes, or check that an earlier run in ``out`` made the same."""
    path = out / "synthesis.json"
    request = json.loads(json.dumps(request))
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != request:
            changed = sorted(k for k in set(saved) | set(request) if saved.get(k) != request.get(k))
            raise PairfreeError(
                f"{out} holds a synthesis with other {', '.join(changed)}; use another --out, "
                "or delete it to start over"
            )
    elif job.is_main_process:
        atomic_write_json(path, request)
    job.wait_for_everyone()
