"""Where captioner checkpoints come from and go: a checkpoint directory, a training run's
folder, or a Hugging Face Hub repository; and the model card (README.md) written beside them.

A run folder (``train.output_dir``) holds ``best/`` and ``last/``; loading it picks ``best/``,
else ``last/``, and says so. A Hub repository id (``user/name``) is fetched with
``huggingface_hub.snapshot_download`` into the usual Hugging Face cache, so ``HF_HUB_OFFLINE=1``
loads what is cached without the network.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pairfree.captioner.card import CheckpointCard
from pairfree.captioner.checkpoint import CONFIG_NAME, TRAINING_NAME, WEIGHTS_NAME
from pairfree.errors import PairfreeError, first_line
from pairfree.runs import RunRecord

logger = logging.getLogger(__name__)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(ref: str | Path, *, revision: str | None = None) -> Path:
    """The checkpoint directory ``ref`` names: itself, a run folder's ``best/`` (else
    ``last/``), or a Hub repository's cached snapshot."""
    path = Path(ref)
    if (path / WEIGHTS_NAME).is_file():
        return path
    if path.is_dir():
        for name in ("best", "last"):
            if (path / name / CONFIG_NAME).is_file():
                logger.info("%s is a training run: loading its %s/ checkpoint", path, name)
                return path / name
        raise PairfreeError(f"{path} is neither a captioner checkpoint (no {CONFIG_NAME}) nor a "
                            "training run (no best/ or last/ in it)")  # fmt: skip
    if _REPO_ID.match(str(ref)) and not path.exists():
        return _download(str(ref), revision)
    raise PairfreeError(f"{ref} does not exist (a checkpoint, a run folder, or a Hub repo id)")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as err:
        raise PairfreeError(f"{repo_id} is no local folder, and not in the Hugging Face cache "
                            f"while the Hub cannot be reached (HF_HUB_OFFLINE?): "
                            f"{first_line(err)}") from err  # fmt: skip
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise PairfreeError(f"cannot fetch {repo_id} from the Hugging Face Hub: "
                            f"{first_line(err)}") from err  # fmt: skip


def training_record(checkpoint: Path) -> dict[str, Any] | None:
    """What the run that wrote ``checkpoint`` recorded: the checkpoint's own ``training.json``
    (a saved or downloaded copy), else its run folder's config, last step and evaluations."""
    own = checkpoint / TRAINING_NAME
    if own.is_file():
        return json.loads(own.read_text(encoding="utf-8"))
    try:
        run = RunRecord.read(checkpoint.parent)
    except (PairfreeError, json.JSONDecodeError):
        return None  # not inside a run folder (an imported or hand-made checkpoint)
    if not isinstance(run.config, dict) or "train" not in run.config:
        return None
    return {
        "config": run.config,
        "steps": run.train[-1]["step"] if run.train else None,
        "checkpoint": checkpoint.name,
        "evaluation": {split: text.strip() for split, text in run.evaluations.items()},
    }


def _batch(train: dict[str, Any]) -> str:
    """The run's batch as its config gave it: global, or per device."""
    if train.get("per_device_batch_size"):
        return f"{train['per_device_batch_size']} per device"
    return str(train.get("batch_size", "?"))


def _shareable(name: str) -> str:
    """A Hub id as it is; of a path on the training machine, only its last part (the folders
    are that machine's business, and mean nothing to the card's readers)."""
    return Path(name).name if Path(name).is_absolute() else name


def model_card(
    card: CheckpointCard,
    captioner: dict[str, Any],
    record: dict[str, Any] | None,
    *,
    repo_id: str | None = None,
) -> str:
    """README.md of a saved captioner: what it is, how it was trained and scored, how to load
    it (Hugging Face's model-card format, with its metadata header)."""
    family = captioner.get("family", "prefix")
    lm = _shareable(captioner.get("captioner", {}).get("lm", "?"))
    config = (record or {}).get("config", {})
    corpus = config.get("corpus") if isinstance(config.get("corpus"), dict) else {}
    data = "not recorded"
    if corpus.get("path"):
        data = f"`{_shareable(corpus['path'])}`"
        data += f", split `{corpus['split']}`" if corpus.get("split") else ""
    train = config.get("train", {})
    where = repo_id or "path/to/this/folder"
    retrieval = card.conditioning.retrieval_clip  # IFCap's second CLIP
    lines = [
        "---",
        "library_name: pairfree",
        "pipeline_tag: image-to-text",
        "tags: [image-captioning, pairfree, " + card.recipe + "]",
        "---",
        "",
        f"# {card.recipe} image captioner",
        "",
        f"An image captioner trained with [pairfree](https://pypi.org/project/pairfree/)'s "
        f"`{card.recipe}` recipe, without human-paired image-caption data.",
        "",
        "| | |",
        "| --- | --- |",
        f"| recipe | `{card.recipe}` |",
        f"| CLIP | `{card.clip}` |",
        *([f"| retrieval CLIP | `{retrieval}` |"] if retrieval else []),
        f"| decoder | {_decoder(family, lm, captioner.get('captioner', {}))} |",
        f"| training data | {data} |",
        f"| training steps | {(record or {}).get('steps') or 'not recorded'} |",
        f"| batch size, lr | {_batch(train)}, {train.get('lr', '?')} |",
        f"| decoding | beam {card.generation.num_beams}, at most "
        f"{card.generation.max_new_tokens} tokens |",
        "",
    ]
    evaluation = (record or {}).get("evaluation") or {}
    for split, table in evaluation.items():
        lines += [f"## Evaluation ({split})", "", table, ""]
    if evaluation:
        lines += ["B@n: BLEU-n, M: METEOR, R: ROUGE-L, C: CIDEr-D, S: SPICE (x100, as in the "
                  "papers).", ""]  # fmt: skip
    lines += [
        "## Use",
        "",
        "```python",
        "from pairfree import Captioner",
        "",
        f'captioner = Captioner.from_pretrained("{where}")',
        'print(captioner("image.jpg"))          # one caption',
        'print(captioner(["a.jpg", "b.jpg"]))   # a list',
        "```",
        "",
        f"or `pairfree caption {where} image.jpg`.",
        "",
    ]
    return "\n".join(lines)


# a Hub token's shape, and whatever follows "Bearer " (an Authorization header echoed back)
_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}|(?<=Bearer )[^\s'\",)]+")


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each of ``secrets`` and anything shaped like a Hub token replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _TOKEN_SHAPE.sub("[redacted]", text)


@contextmanager
def _logs_redacted(secrets: Sequence[str]) -> Iterator[None]:
    """While it lasts, every log record (huggingface_hub's included, any logger) is made with
    the secrets redacted from its message and its traceback."""
    previous = logging.getLogRecordFactory()

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: logging reports it later
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message, secrets), None
        if record.exc_info:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip(),
                                     secrets)  # fmt: skip
        return record

    logging.setLogRecordFactory(make)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload pairfree captioner",
) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (made if missing); its URL.

    The token (given, or the one huggingface_hub finds) never reaches a log or the error: a
    client error is raised as one redacted line with no chain, as its own message may quote
    the request's Authorization header."""
    from huggingface_hub import HfApi, get_token

    secrets = [token or "", get_token() or ""]
    with _logs_redacted(secrets):
        try:
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                     commit_message=commit_message)  # fmt: skip
        except Exception as err:  # anything the client raises may quote the token
            reason = redact(first_line(err), secrets)
            failure = PairfreeError(f"cannot push to {repo_id}: {reason}")
        else:
            failure = None
    if failure is not None:  # raised outside the handler: no chain back to the client's error
        raise failure
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def _decoder(family: str, lm: str, config: dict) -> str:
    if family == "pcm":  # trained from scratch over its own word vocabulary
        layers = f"{config.get('encoder_layers', '?')} + {config.get('decoder_layers', '?')}"
        return f"PCM-Net encoder-decoder ({layers} layers, width {config.get('width', '?')})"
    return f"`{lm}` ({'cross-attention' if family == 'cross_attention' else 'prefix'})"
