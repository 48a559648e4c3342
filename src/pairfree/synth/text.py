"""The text side of synthesis: rephrasing captions (SaCap), grouping them and summarizing the
groups (ICSD), each a resumable, sharded job (:mod:`pairfree.synth.shards`).

Outputs (JSONL, one object per line, in input order):

- ``rephrase``: ``rephrasings.jsonl`` ``{"id", "caption", "rephrasings": [3 texts]}`` (and
  ``"lenient"``, below), and
  ``prompts.jsonl``, the rephrasings as a JSONL corpus ``{"image_id": "<id>-<k>", "caption"}``
  for ``synthesize images`` to draw SaCap's supporting images from;
- ``group``: ``groups.jsonl`` ``{"id", "members": [caption ids], "captions": [texts]}``, the
  anchor caption first;
- ``summarize``: ``summaries.jsonl`` ``{"id", "selected": [caption ids], "captions": [texts],
  "summary"}`` (and ``"lenient"``);

and for the LLM jobs ``rejects.jsonl`` with each answer that could not be used, its reason and
its raw text (the originals drop those answers; here they are counted and kept for a look).
A prompt the LLM gave no answer to yet (its retries used up on timeouts, 429 or 5xx) is no
reject: it stays pending in its shard, the job ends with an error counting them, and a rerun
asks exactly those again (:mod:`pairfree.synth.shards`). A job's summary says when too much
was rejected (:meth:`TextJobSummary.warning`).
Answers are read as the originals read them unless ``strict`` (:mod:`pairfree.synth.tasks`);
a kept record that only the original's reading keeps says why the strict one would not, in
``lenient``, and the job's summary counts them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from pairfree.clip.base import ClipEncoder
from pairfree.data import Caption
from pairfree.encoding import encode_captions
from pairfree.errors import BadInputError, PairfreeError, SkipLog
from pairfree.features import FeatureStore
from pairfree.io import atomic_write_json, read_user_text
from pairfree.job import Job
from pairfree.synth.grouping import nearest_captions
from pairfree.synth.llm import LLM, NoAnswer, Sampling
from pairfree.synth.shards import backend_fingerprint, poor_yield, run_shards, write_jsonl
from pairfree.synth.tasks import (
    Rejected,
    parse_rephrasings,
    parse_selection,
    rephrase_prompt,
    summarize_prompt,
)


@dataclass
class TextJobSummary:
    kept: int
    rejected: int
    out_dir: Path
    what: str
    lenient: int = 0  # kept answers that only the original's reading keeps
    reasons: list[str] = field(default_factory=list)  # why each reject was rejected

    def __str__(self) -> str:
        lenient = f" ({self.lenient} only as the original reads them)" if self.lenient else ""
        return f"{self.what}: kept {self.kept}{lenient}, rejected {self.rejected} -> {self.out_dir}"

    def warning(self, max_reject_share: float = 0.5) -> str | None:
        """What to say when nothing was kept or over ``max_reject_share`` was rejected."""
        return poor_yield(self.what, self.kept, self.reasons, self.out_dir / "rejects.jsonl",
                          max_reject_share)  # fmt: skip


def rephrase_captions(
    llm: LLM,
    captions: Sequence[str],
    out_dir: str | Path,
    *,
    template: str,
    sampling: Sampling,
    batch_size: int = 16,
    shard_size: int = 1024,
    strict: bool = False,
    job: Job | None = None,
) -> TextJobSummary | None:
    """Three rephrasings of every distinct caption (SaCap rephrases each caption once);
    ``strict`` reads the answers pairfree's checked way instead of SaCap's."""
    out = Path(out_dir)
    distinct = list(dict.fromkeys(c.strip() for c in captions if c.strip()))
    items = list(enumerate(distinct))

    def read(answer: str) -> dict:
        parsed = parse_rephrasings(answer, strict=strict)
        return {
            "rephrasings": parsed.texts,
            **({"lenient": parsed.lenient} if parsed.lenient else {}),
        }

    def ask(batch: list[tuple[int, str]]) -> list[dict]:
        answers = llm.generate([rephrase_prompt(c, template) for _, c in batch], sampling)
        return [_judge({"id": str(i), "caption": caption}, answer, read)
                for (i, caption), answer in zip(batch, answers, strict=True)]  # fmt: skip

    request = _request(llm, template, sampling, shard_size, distinct, strict)
    records = run_shards(out, items, ask, request=request, shard_size=shard_size,
                         batch_size=batch_size, job=job or Job(), desc="rephrase")  # fmt: skip
    if records is None:
        return None
    summary = _split(out, records, "rephrasings.jsonl", "rephrase")
    prompts = [
        {"image_id": f"{r['id']}-{k}", "caption": text}
        for r in records
        if "rejected" not in r
        for k, text in enumerate(r["rephrasings"])
        if text.strip()  # an empty rephrasing (kept as SaCap keeps it) has nothing to draw
    ]
    write_jsonl(out / "prompts.jsonl", prompts)
    return summary


@dataclass(frozen=True)
class Group:
    id: str
    members: list[str]  # caption ids, the anchor first
    captions: list[str]


def group_captions(
    ids: Sequence[str],
    texts: Sequence[str],
    embeddings: torch.Tensor,
    out_dir: str | Path,
    *,
    k: int = 30,
    backend: str = "exact",
    dedup: bool = False,
) -> list[Group]:
    """ICSD's groups: every caption with its k - 1 nearest captions (CLIP text cosine).

    With ``dedup``, a group holding the same captions as an earlier one is left out (tight
    clusters, e.g. near-duplicate captions, otherwise make the same group many times and the
    same summary image is paid for again); ICSD keeps them all, hence off by default."""
    if not len(ids) == len(texts) == len(embeddings):
        raise PairfreeError(f"{len(ids)} ids, {len(texts)} texts, {len(embeddings)} embeddings")
    neighbours = nearest_captions(embeddings, min(k, len(ids)), backend=backend)
    groups, seen = [], set()
    for row in neighbours.tolist():
        members = frozenset(row)
        if dedup and members in seen:
            continue
        seen.add(members)
        groups.append(Group(ids[row[0]], [ids[j] for j in row], [texts[j] for j in row]))
    write_jsonl(Path(out_dir) / "groups.jsonl", [asdict(g) for g in groups])
    return groups


def group_corpus(
    clip_spec: str,
    load_clip: Callable[[], ClipEncoder],
    captions: Sequence[Caption],
    out_dir: str | Path,
    features: str | Path,
    *,
    k: int = 30,
    backend: str = "exact",
    dedup: bool = False,
    job: Job,
) -> list[Group]:
    """ICSD's stage 1 and ``pairfree synthesize group``: the captions' CLIP text embeddings,
    encoded once into ``features`` (resumable, sharded over the processes), grouped by
    :func:`group_captions` over the store's ids (a caption written twice with one embedding).
    A grouping of the same captions with the same CLIP (``clip_spec``) and settings is reused
    as it is (``request.json`` beside ``groups.jsonl``), and then ``load_clip`` is never
    called."""
    out = Path(out_dir)
    texts = [c.text for c in captions]
    request = {"clip": clip_spec, "k": k, "index": backend, "dedup": dedup,
               "captions": hashlib.sha256("\n".join(texts).encode()).hexdigest()}  # fmt: skip
    done = out / "request.json"
    if (
        (out / "groups.jsonl").is_file()
        and done.is_file()
        and json.loads(done.read_text()) == request
    ):
        return read_groups(out / "groups.jsonl")
    encode_captions(load_clip(), captions, features, job=job)
    job.wait_for_everyone()
    if job.is_main_process:
        store = FeatureStore(features)
        texts = store.texts or []
        embeds = store.tensor()[[store.text_row(t) for t in texts]]
        group_captions(store.ids, texts, embeds, out, k=k, backend=backend, dedup=dedup)
        atomic_write_json(done, request)
    job.wait_for_everyone()
    return read_groups(out / "groups.jsonl")


def read_rephrasings(path: str | Path, skip_log: SkipLog) -> dict[str, list[str]]:
    """Caption -> its rephrasings, from the ``rephrasings.jsonl`` of :func:`rephrase_captions`;
    a bad line is skipped and recorded with the file and the line."""
    path, out = Path(path), {}
    if not path.is_file():
        raise PairfreeError(f"{path} does not exist (make it with `synthesize rephrase`)")
    for number, line in enumerate(read_user_text(path).splitlines(), 1):
        try:
            record = json.loads(line)
            out[record["caption"]] = list(record["rephrasings"])
        except (json.JSONDecodeError, KeyError, TypeError):
            reason = "not a rephrasing record (a JSON object with caption and rephrasings)"
            skip_log.skip(BadInputError(path, reason, line=number))
    return out


@dataclass(frozen=True)
class Summary:
    id: str  # the group's id
    selected: list[str]  # caption ids the LLM selected
    captions: list[str]  # their texts
    summary: str
    lenient: str | None = None  # why the strict reading would have rejected the answer


def read_summaries(path: str | Path, skip_log: SkipLog) -> list[Summary]:
    """Summaries written by :func:`summarize_groups`; a bad line is skipped and recorded with
    the file and the line."""
    path, out = Path(path), []
    if not path.is_file():
        raise PairfreeError(f"{path} does not exist (make it with `synthesize summarize`)")
    for number, line in enumerate(read_user_text(path).splitlines(), 1):
        try:
            summary = _record(Summary, line)
            if not summary.captions or not isinstance(summary.summary, str):
                raise ValueError("no captions, or no summary text")
            out.append(summary)
        except ValueError as err:
            skip_log.skip(BadInputError(path, f"not a summary record: {err}", line=number))
    return out


T = TypeVar("T")


def _record(cls: type[T], line: str) -> T:
    """One JSON line as the dataclass ``cls``; a ValueError says what is wrong with it."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg})") from None
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    if not isinstance(data, dict) or not set(required) <= set(data) <= names:
        raise ValueError(f"expected a JSON object with the fields {', '.join(required)}")
    return cls(**data)


def read_groups(path: str | Path) -> list[Group]:
    """Groups written by :func:`group_captions`; a bad line names the file and the line."""
    path, groups = Path(path), []
    if not path.is_file():
        raise PairfreeError(f"groups file {path} does not exist (make it with `synthesize group`)")
    for number, line in enumerate(read_user_text(path).splitlines(), 1):
        try:
            groups.append(_record(Group, line))
        except ValueError as err:
            raise BadInputError(path, f"not a group: {err}", line=number) from None
    return groups


def summarize_groups(
    llm: LLM,
    groups: Sequence[Group],
    out_dir: str | Path,
    *,
    template: str,
    sampling: Sampling,
    batch_size: int = 8,
    shard_size: int = 512,
    strict: bool = False,
    job: Job | None = None,
) -> TextJobSummary | None:
    """ICSD's select-and-summarize: for every group, the captions the LLM selected as one
    scene and its summary of them; ``strict`` reads the answers pairfree's checked way
    instead of ICSD's."""
    out = Path(out_dir)

    def reader(group: Group) -> Callable[[str], dict]:
        def read(answer: str) -> dict:
            chosen = parse_selection(answer, len(group.captions), strict=strict)
            return {"selected": [group.members[i] for i in chosen.indices],
                    "captions": [group.captions[i] for i in chosen.indices],
                    "summary": chosen.summary,
                    **({"lenient": chosen.lenient} if chosen.lenient else {})}  # fmt: skip

        return read

    def ask(batch: list[Group]) -> list[dict]:
        answers = llm.generate([summarize_prompt(g.captions, template) for g in batch], sampling)
        return [_judge({"id": group.id}, answer, reader(group))
                for group, answer in zip(batch, answers, strict=True)]  # fmt: skip

    texts = [json.dumps(asdict(g)) for g in groups]
    request = _request(llm, template, sampling, shard_size, texts, strict)
    records = run_shards(out, list(groups), ask, request=request, shard_size=shard_size,
                         batch_size=batch_size, job=job or Job(), desc="summarize")  # fmt: skip
    return None if records is None else _split(out, records, "summaries.jsonl", "summarize")


def _judge(record: dict, answer: str | NoAnswer, read: Callable[[str], dict]) -> dict:
    """``record`` with what ``read`` makes of the answer, or why it was rejected, or why it
    is pending (no answer yet: a rerun asks again)."""
    if isinstance(answer, NoAnswer):
        return {**record, ("rejected" if answer.final else "pending"): answer.reason}
    try:
        return {**record, **read(answer)}
    except Rejected as why:
        return {**record, "rejected": str(why), "answer": answer}


def _request(
    llm: LLM, template: str, sampling: Sampling, shard_size: int, inputs, strict: bool
) -> dict:
    digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()
    return {"llm": llm.name, "fingerprint": backend_fingerprint(llm), "prompt": template,
            "sampling": asdict(sampling),
            "shard_size": shard_size, "inputs": digest, "strict": strict}  # fmt: skip


def _split(out: Path, records: list[dict], kept_name: str, what: str) -> TextJobSummary:
    kept = [r for r in records if "rejected" not in r]
    rejects = [r for r in records if "rejected" in r]
    write_jsonl(out / kept_name, kept)
    write_jsonl(out / "rejects.jsonl", rejects)
    lenient = sum("lenient" in r for r in kept)
    return TextJobSummary(len(kept), len(rejects), out, what, lenient,
                          [r["rejected"] for r in rejects])  # fmt: skip
