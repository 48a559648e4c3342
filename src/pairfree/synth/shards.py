"""The one runner of every synthesis job: work in shards, resumable, split over processes.

A job's items are cut into shards; under ``torchrun`` / ``accelerate launch`` process r takes
shards r, r + world, .... A shard is done when ``OUT/shards/NNNNN.jsonl`` (its records, written
atomically) exists, so a killed job resumes at its first unfinished shard and nothing is made
twice or lost. ``OUT/synthesis.json`` records what the job makes (backend, settings, a digest
of the inputs); a rerun asking for something else is refused, never mixed in. The main process
gathers every shard's records, in order, once all are done.

A backend's name does not say which weights answer to it (a folder re-saved after fine-tuning,
a newer Hub revision, another world renderer), so the request carries the backend's
``fingerprint`` (:func:`backend_fingerprint`) too, as feature stores carry their encoder's: a
rerun under other weights or settings is refused in one line and the old shards are left as
they are (delete the folder, or use another ``--out``, to start over).

A record with a ``"pending"`` key (why: an LLM's retries were used up on 5xx, 429 or timeouts)
is no result yet. Its shard is written with it, the job goes on, and ends with an error that
counts the pending inputs; a rerun asks exactly those again. After :data:`GIVE_UP_AFTER`
pending in a row the backend is taken to be down or overloaded and the job stops asking (the
inputs not asked count as pending too), rather than spend every input's retries on it.

:func:`poor_yield` is the one check of what a finished job kept: nothing, or too many rejects.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from pairfree.errors import PairfreeError
from pairfree.io import atomic_write_json, atomic_write_text
from pairfree.job import Job

T = TypeVar("T")
GIVE_UP_AFTER = 16  # inputs in a row left pending: the backend is down or overloaded


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
    """Run ``process`` over batches of ``items`` (one record per item, in order); the records
    of all shards on the main process, None elsewhere. Pending records are asked again; any
    left at the end are a :class:`PairfreeError` on every process."""
    if not items:
        raise PairfreeError(f"nothing to make into {out}: no inputs")
    _claim(out, request, job)
    n_shards = -(-len(items) // shard_size)
    plan = {}  # shard -> (its records so far, the positions still to ask)
    for shard in range(job.process_index, n_shards, job.num_processes):
        size = len(items[shard * shard_size : (shard + 1) * shard_size])
        records = _read_shard(out, shard)
        todo = [i for i, r in enumerate(records) if "pending" in r]
        todo += range(len(records), size)
        if todo:
            plan[shard] = (records + [None] * (size - len(records)), todo)
    bar = tqdm(total=sum(len(todo) for _, todo in plan.values()), desc=desc,
               disable=not job.show_progress)  # fmt: skip
    streak = 0  # pending records in a row
    for shard, (records, todo) in plan.items():
        chunk = items[shard * shard_size : (shard + 1) * shard_size]
        for start in range(0, len(todo), batch_size):
            if streak >= GIVE_UP_AFTER:
                break
            batch = todo[start : start + batch_size]
            for i, record in zip(batch, process([chunk[i] for i in batch]), strict=True):
                records[i] = record
                streak = streak + 1 if "pending" in record else 0
            bar.update(len(batch))
        asked = records[: records.index(None)] if None in records else records
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in asked)
        atomic_write_text(_shard_path(out, shard), text)
        if streak >= GIVE_UP_AFTER:
            break
    bar.close()
    job.wait_for_everyone()
    records = [r for shard in range(n_shards) for r in _read_shard(out, shard)]
    finished = [r for r in records if "pending" not in r]
    if len(finished) < len(items):
        why = Counter(r["pending"] for r in records if "pending" in r).most_common(1)
        raise PairfreeError(
            f"{desc}: {len(items) - len(finished)} of {len(items)} inputs still pending, no "
            f"answer yet ({why[0][0] if why else 'not asked'}); the {len(finished)} finished are "
            f"kept in {out / 'shards'}: rerun the same command to ask for the rest"
        )
    return records if job.is_main_process else None


def backend_fingerprint(backend: object) -> str | None:
    """What a synthesis backend's output depends on besides its name, as a short digest (its
    ``fingerprint``: sampled weights and settings, or a probe of what it makes); None for one
    that cannot tell (a remote server: the model behind its name is the server's word)."""
    value = getattr(backend, "fingerprint", None)
    return value if isinstance(value, str) else None


def poor_yield(
    what: str, kept: int, reasons: Sequence[str], where: Path, max_share: float
) -> str | None:
    """What to warn of when a job kept nothing or rejected over ``max_share`` of its inputs
    (``reasons``: why each reject was rejected, listed in ``where``), or None."""
    total = kept + len(reasons)
    if kept and len(reasons) <= max_share * total:
        return None
    verdict = (f"kept nothing, all {total} rejected" if not kept else
               f"rejected {len(reasons)} of {total} (more than {max_share:.0%})")  # fmt: skip
    common = Counter(r.split(": ")[0] for r in reasons).most_common(1)
    reason = f"; the commonest reason ({common[0][1]}): {common[0][0]!r}" if common else ""
    return f"{what} {verdict}{reason}; every reject and why: {where}"


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"{shard:05d}.jsonl"


def _read_shard(out: Path, shard: int) -> list[dict]:
    """A shard's records so far (none when it was not started)."""
    path = _shard_path(out, shard)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _claim(out: Path, request: dict, job: Job) -> None:
    """Record what this job makes, or check that an earlier run in ``out`` made the same."""
    path = out / "synthesis.json"
    request = json.loads(json.dumps(request))
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != request:
            changed = sorted(k for k in set(saved) | set(request) if saved.get(k) != request.get(k))
            why = (" (the backend's weights or settings changed behind its name)"
                   if "fingerprint" in changed else "")  # fmt: skip
            raise PairfreeError(
                f"{out} holds a synthesis with other {', '.join(changed)}{why}; use another "
                "--out, or delete it to start over"
            )
    elif job.is_main_process:
        atomic_write_json(path, request)
    job.wait_for_everyone()
