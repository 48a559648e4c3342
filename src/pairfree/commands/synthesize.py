"""``pairfree synthesize``: synthetic training data from a caption corpus."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pairfree.commands.common import add_device, add_strict, at_least, positive_int, report_skips
from pairfree.errors import PairfreeError

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "synthesize",
        help="make synthetic training data from a caption corpus (text-to-image)",
        description="Synthetic data for the synthetic-image recipes (SaCap, ICSD, PCM-Net).",
    )
    kinds = p.add_subparsers(dest="synthesize_command", metavar="KIND", required=True)
    images = kinds.add_parser(
        "images",
        help="one image per caption (and variant) from a text-to-image backend",
        description=(
            "Draw an image for every caption of CORPUS (any corpus format) with a text-to-image "
            "backend: diffusers:<hub id or folder> (Stable Diffusion; SaCap used SD 1.5 with "
            "its default scheduler, ICSD SD 1.4 with DPMSolverMultistepScheduler, both 20 "
            "steps) or world:<preset> (the shapes world). Writes OUT/images/*.png, "
            "OUT/manifest.jsonl (every prompt: seed, NSFW flag, status) and OUT/dataset.jsonl "
            "(the usable pairs, NSFW-flagged (black) images included unless --nsfw drop; "
            "`pairfree encode --dataset OUT/dataset.jsonl` reads it). Each "
            "image's seed is fixed by (--seed, caption, variant). Resumable: rerun the same "
            "command; under torchrun/accelerate launch each process makes its own shards."
        ),
    )
    images.add_argument("corpus", type=Path, help="caption corpus (Karpathy/COCO JSON, txt, ...)")
    images.add_argument("--backend", required=True, help="diffusers:<model> or world:<preset>")
    images.add_argument("--out", type=Path, required=True, help="output folder")
    images.add_argument("--format", default="auto", help="corpus format (default: detect)")
    images.add_argument("--split", default="train", help="split of a Karpathy file")
    images.add_argument("--variants", type=positive_int, default=1, help="images per caption")
    images.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    images.add_argument("--steps", type=positive_int, default=20, help="denoising steps")
    images.add_argument("--guidance-scale", type=float, default=7.5)
    images.add_argument("--negative-prompt", default=None)
    images.add_argument("--scheduler", default=None, help="diffusers scheduler class name")
    images.add_argument("--height", type=positive_int, default=None)
    images.add_argument("--width", type=positive_int, default=None)
    images.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    images.add_argument("--batch-size", type=positive_int, default=8)
    images.add_argument("--shard-size", type=positive_int, default=256, help="prompts per shard")
    images.add_argument(
        "--nsfw",
        choices=["keep", "drop"],
        default="keep",
        help="images the safety checker flagged (black): keep them in dataset.jsonl, as SaCap "
        "does (default), or drop them, as ICSD does",
    )
    images.add_argument(
        "--clip",
        default=None,
        help="also encode the dataset's images with this CLIP into OUT/features (a feature "
        "store, as `pairfree encode --dataset OUT/dataset.jsonl` would make)",
    )
    add_max_reject_share(
        images, "prompts left out of the dataset (skipped, or flagged and dropped)"
    )
    images.add_argument("--no-progress", action="store_true")
    add_device(images)
    add_strict(images)
    images.set_defaults(func=run_images)

    rephrase = kinds.add_parser(
        "rephrase",
        help="three LLM rephrasings of every caption (SaCap)",
        description=(
            "Ask an LLM for 3 rephrasings (<= 15 words each, as JSON) of every distinct caption of "
            "CORPUS, with SaCap's prompt and sampling (temperature 0.6, top-p 0.9), an hf: model "
            "prompted without a chat template (SaCap's base Llama-3-8B). Writes "
            "OUT/rephrasings.jsonl, OUT/prompts.jsonl (the rephrasings as a corpus: `synthesize "
            "images OUT/prompts.jsonl` draws SaCap's supporting images) and OUT/rejects.jsonl "
            "(answers that did not parse, with why). "
            "--llm hf:<model or .gguf file>, openai:<model> --api-base URL (key from "
            "$OPENAI_API_KEY or --api-key-env), or world:<preset>. Resumable and sharded."
        ),
    )
    rephrase.add_argument("corpus", type=Path, help="caption corpus (any corpus format)")
    add_llm_arguments(rephrase, temperature=0.6, max_new_tokens=256, chat_template="never")
    rephrase.set_defaults(func=run_rephrase)

    group = kinds.add_parser(
        "group",
        help="every caption with its nearest captions by CLIP text embedding (ICSD)",
        description=(
            "Encode CORPUS with CLIP and write OUT/groups.jsonl: every caption with its k - 1 "
            "nearest captions by cosine (ICSD: k = 30), the caption first. --index faiss for "
            "large corpora (faiss-cpu; an IVF index above a million captions)."
        ),
    )
    group.add_argument("corpus", type=Path, help="caption corpus (any corpus format)")
    group.add_argument(
        "--clip", required=True, help="CLIP spec, e.g. hf:openai/clip-vit-base-patch32"
    )
    group.add_argument("--out", type=Path, required=True, help="output folder")
    group.add_argument("--k", type=positive_int, default=30, help="captions per group (default 30)")
    group.add_argument("--index", choices=["exact", "faiss"], default="exact")
    group.add_argument(
        "--dedup",
        action="store_true",
        help="leave out a group holding the same captions as an earlier one (ICSD keeps them)",
    )
    group.add_argument("--split", default="train", help="split of a Karpathy file")
    group.add_argument("--no-progress", action="store_true")
    add_device(group)
    add_strict(group)
    group.set_defaults(func=run_group)

    summarize = kinds.add_parser(
        "summarize",
        help="LLM selection and summary of every caption group (ICSD)",
        description=(
            "For every group of GROUPS (OUT/groups.jsonl of `synthesize group`), ask an LLM "
            "with ICSD's prompt to select the captions that describe one scene and summarize "
            "them in <= 50 words. Writes OUT/summaries.jsonl and OUT/rejects.jsonl."
        ),
    )
    summarize.add_argument("groups", type=Path, help="groups.jsonl of `pairfree synthesize group`")
    add_llm_arguments(summarize, temperature=1.0, max_new_tokens=500, chat_template="auto")
    summarize.set_defaults(func=run_summarize)

    reassign = kinds.add_parser(
        "reassign",
        help="give each caption the synthetic image that fits it best; keep the best pairs (SynC)",
        description=(
            "SynC: for every caption of the synthetic dataset SOURCE (a `synthesize images` "
            "folder), its --candidates nearest images by the --clip model's text-to-image "
            "cosine; each candidate retrieves its --back nearest captions, and its score is the "
            "best --sentences cosine of one of them to the caption. The caption takes its "
            "best-scoring candidate (an image may serve several captions); the --keep share of "
            "pairs with the highest scores is kept. Writes OUT as a synthetic dataset "
            "(dataset.jsonl, images/ linked from SOURCE) that the recipes read as they read "
            "SOURCE, reassignment.jsonl (every caption: its own image, the assigned one, the "
            "score, whether kept) and reassign.json. Deterministic; the encodings are cached "
            "in OUT/features. The recipes also run this step themselves: `reassign.*` "
            "(pcmnet), `synthetic.reassign.*` (sacap), `synthesis.reassign.*` (icsd's "
            "single-context images), with these flags' names."
        ),
    )
    reassign.add_argument("source", type=Path, help="a `pairfree synthesize images` folder")
    reassign.add_argument("--out", type=Path, required=True, help="output folder")
    reassign.add_argument("--clip", help="the retrieving model (default SynC's SigLIP2: "
                          "open_clip:hf-hub:timm/ViT-B-16-SigLIP2-256)")  # fmt: skip
    reassign.add_argument("--sentences", help="the sentence encoder of the cycle score: "
                          "hf:<id or folder> or clip:<CLIP spec> (default SynC's: hf:sentence-"
                          "transformers/paraphrase-multilingual-MiniLM-L12-v2)")  # fmt: skip
    reassign.add_argument("--candidates", type=positive_int,
                          help="images each caption considers (K, default 15)")  # fmt: skip
    reassign.add_argument("--back", type=positive_int,
                          help="captions each candidate retrieves back (default 2)")  # fmt: skip
    reassign.add_argument("--keep", type=share,
                          help="share of pairs kept, best scores first (default 0.9)")  # fmt: skip
    reassign.add_argument("--index", choices=["exact", "faiss"], default="exact")
    reassign.add_argument("--no-progress", action="store_true")
    add_device(reassign)
    add_strict(reassign)
    reassign.set_defaults(func=run_reassign)


def add_llm_arguments(
    p: argparse.ArgumentParser, *, temperature: float, max_new_tokens: int, chat_template: str
):
    p.add_argument("--llm", required=True, help="hf:<model>, openai:<model> or world:<preset>")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--api-base", default="", help="OpenAI-compatible server, e.g. http://host:8000/v1"
    )
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the API key")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests at once (openai:)")
    p.add_argument("--timeout", type=seconds, default=None,
                   help="seconds to wait for an answer (openai:; default 60)")  # fmt: skip
    p.add_argument("--max-retries", type=at_least(0), default=None,
                   help="tries after the first on 429, 5xx and timeouts (openai:; default 5); "
                   "a prompt still without an answer stays pending for a rerun")  # fmt: skip
    p.add_argument("--prompt", type=Path, default=None, help="a file replacing the original prompt")
    p.add_argument("--response-prefix", default="", help="text the answer starts with (hf:)")
    p.add_argument(
        "--chat-template",
        choices=["auto", "never", "always"],
        default=chat_template,
        help=f"hf: prompt as a chat turn with the tokenizer's template: never (a base model), "
        f"always, or auto (when it has one) (default: {chat_template})",
    )
    p.add_argument(
        "--strict-answers",
        action="store_true",
        help="read answers pairfree's checked way (word limits, no template placeholders, "
        "indices in the group once) instead of as the original code reads them",
    )
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--greedy", action="store_true", help="no sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--shard-size", type=positive_int, default=512, help="inputs per shard")
    add_max_reject_share(p, "answers rejected")
    p.add_argument("--no-progress", action="store_true")
    add_device(p)


def add_max_reject_share(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--max-reject-share", type=share, default=0.5,
        help=f"warn when more than this share of {what} (default 0.5); a job that keeps "
        "nothing fails",
    )  # fmt: skip


def share(text: str) -> float:
    """An argparse type: a share, 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share is 0 to 1, not {text}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be above 0 seconds, not {text}")
    return value


def finish(summary, max_reject_share: float) -> int:
    """Print a job's summary; warn when it rejected too much, fail when it kept nothing."""
    from pairfree.errors import PairfreeError

    print(summary)
    problem = summary.warning(max_reject_share)
    if problem and not summary.kept:
        raise PairfreeError(problem)
    if problem:
        logger.warning(problem)
    return 0


@contextmanager
def _llm_job(args: argparse.Namespace, inputs: list) -> Iterator[tuple]:
    """(job, LLM config, device) of an LLM subcommand, after checking where it writes, holding
    the lock of its output folder."""
    from pairfree.io import check_output
    from pairfree.job import Job
    from pairfree.locks import output_lock
    from pairfree.synth.llm import LLMConfig

    config = LLMConfig(  # sampling checked here, before anything is written or loaded
        spec=args.llm,
        api_base=args.api_base,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
        response_prefix=args.response_prefix,
        chat_template=args.chat_template,
        prompt=args.prompt,
        strict_answers=args.strict_answers,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        seed=args.seed,
        dtype=args.dtype,
        batch_size=args.batch_size,
    )
    check_output(args.out, inputs=inputs, folder=True)
    with output_lock(args.out):
        job = Job.create(progress=not args.no_progress)
        yield job, config, args.device if job.num_processes == 1 else job.state.device


def run_rephrase(args: argparse.Namespace) -> int:
    from pairfree.data import read_captions
    from pairfree.errors import SkipLog
    from pairfree.synth.stages import rephrase

    skip_log = SkipLog()
    captions = read_captions(args.corpus, skip_log=skip_log)
    with _llm_job(args, [args.corpus]) as (job, config, device):
        summary = rephrase(config, [c.text for c in captions], args.out, job=job,
                           shard_size=args.shard_size, device=device)  # fmt: skip
        if summary is None:
            return 0
        report_skips([e.to_record() for e in skip_log.items], args.out)
        return finish(summary, args.max_reject_share)


def run_summarize(args: argparse.Namespace) -> int:
    from pairfree.synth.stages import summarize
    from pairfree.synth.text import read_groups

    groups = read_groups(args.groups)
    with _llm_job(args, [args.groups]) as (job, config, device):
        summary = summarize(config, groups, args.out, job=job, shard_size=args.shard_size,
                            device=device)  # fmt: skip
        return 0 if summary is None else finish(summary, args.max_reject_share)


def run_group(args: argparse.Namespace) -> int:
    from pairfree.clip import load_clip
    from pairfree.data import read_captions
    from pairfree.features import FeatureStore
    from pairfree.io import check_output
    from pairfree.job import Job
    from pairfree.locks import output_lock
    from pairfree.synth.text import group_corpus

    check_output(args.out, inputs=[args.corpus], folder=True)
    with output_lock(args.out):
        job = Job.create(strict=args.strict, progress=not args.no_progress)
        captions = read_captions(args.corpus, split=args.split, skip_log=job.skip_log)
        groups = group_corpus(args.clip, lambda: load_clip(args.clip, device=args.device), captions,
                              args.out, args.out / "features", k=args.k, backend=args.index,
                              dedup=args.dedup, job=job)  # fmt: skip
        if not job.is_main_process:
            return 0
        grouped = len(FeatureStore(args.out / "features"))
        report_skips([e.to_record() for e in job.skip_log.items], args.out)
        dropped = f" ({grouped - len(groups)} identical groups left out)" if args.dedup else ""
        size = min(args.k, grouped)
        print(f"{len(groups)} groups of {size} captions{dropped} -> {args.out / 'groups.jsonl'}")
        return 0


def run_images(args: argparse.Namespace) -> int:
    from pairfree.data import read_captions
    from pairfree.io import check_output
    from pairfree.job import Job
    from pairfree.locks import output_lock
    from pairfree.synth.stages import ImageSynthesisConfig, draw_images

    config = ImageSynthesisConfig(  # settings checked here, before anything is written
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler,
        height=args.height,
        width=args.width,
        dtype=args.dtype,
        backend=args.backend,
        seed=args.seed,
        variants=args.variants,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        keep_nsfw=args.nsfw == "keep",
    )
    check_output(args.out, inputs=[args.corpus], folder=True)
    with output_lock(args.out):
        job = Job.create(strict=args.strict, progress=not args.no_progress)
        captions = read_captions(
            args.corpus, format=args.format, split=args.split, skip_log=job.skip_log
        )
        device = args.device if job.num_processes == 1 else job.state.device
        _, summary = draw_images(config, captions, args.out, job=job, device=device)
        job.wait_for_everyone()  # the main process wrote dataset.jsonl
        if args.clip:
            from pairfree.clip import load_clip
            from pairfree.data import image_sources
            from pairfree.encoding import encode_images

            pairs = image_sources(args.out / "dataset.jsonl", split="train", skip_log=job.skip_log)
            clip = load_clip(args.clip, device=device)
            encode_images(clip, pairs, args.out / "features", job=job)
        if summary is None:
            return 0
        report_skips([e.to_record() for e in job.skip_log.items], args.out)
        return finish(summary, args.max_reject_share)


def run_reassign(args: argparse.Namespace) -> int:
    from pairfree.clip import load_clip
    from pairfree.io import check_output
    from pairfree.job import Job
    from pairfree.locks import output_lock
    from pairfree.synth.reassign import ReassignConfig, reassign_dataset
    from pairfree.synth.sentences import load_sentence_encoder

    given = {k: getattr(args, k) for k in ("clip", "sentences", "candidates", "back", "keep")}
    cfg = ReassignConfig(index=args.index, **{k: v for k, v in given.items() if v is not None})
    if not (args.source / "dataset.jsonl").is_file():
        raise PairfreeError(f"{args.source}: not a synthetic dataset (no dataset.jsonl; run "
                            "`pairfree synthesize images` first)")  # fmt: skip
    check_output(args.out, inputs=[args.source], folder=True)
    with output_lock(args.out):
        job = Job.create(strict=args.strict, progress=not args.no_progress)
        device = args.device if job.num_processes == 1 else job.state.device
        clip = load_clip(cfg.clip, device=device)
        sentences = load_sentence_encoder(cfg.sentences, device=device)
        result = reassign_dataset(args.source, args.out, cfg, clip, sentences, job=job)
        if not job.is_main_process:
            return 0
        report_skips([e.to_record() for e in job.skip_log.items], args.out)
        summary = json.loads((args.out / "reassign.json").read_text())
        print(f"{summary['captions']} captions: {summary['reassigned']} re-assigned to another "
              f"image, {len(result.kept)} kept (of {summary['images_used']} images) -> "
              f"{args.out / 'dataset.jsonl'}")  # fmt: skip
        return 0
