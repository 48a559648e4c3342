"""LLM backends behind one protocol, chosen by name: ``generate(prompts, sampling)``.

- ``hf:<hub id or folder>`` (or ``hf:<folder>/<file>.gguf``): a transformers causal LM, batched
  with left padding, bf16/fp16 on a GPU; GGUF checkpoints load with ``gguf_file=``.
  ``chat_template``: ``never`` sends the prompt as it is, after the tokenizer's own special
  tokens (its BOS), as SaCap prompted the base Llama-3-8B (a template the tokenizer may carry
  is not used); ``always`` wraps it as a user turn with the tokenizer's chat
  template; ``auto`` (the loader's default, for chat models) uses the template when there is
  one. Decoding stops at the end-of-text token, the model's own stop tokens and Llama-3's
  ``<|eot_id|>`` where the vocabulary has it (SaCap's terminators).
- ``openai:<model>`` with ``api_base``: any OpenAI-compatible chat-completions server (vLLM,
  llama.cpp's server, TGI, OpenAI itself; how a 70B model on a cluster is used). Requests run
  with bounded concurrency and a timeout, and are retried with exponential backoff on 408, 409,
  429, 5xx, timeouts, dropped connections and refused connections. The key comes from an
  environment variable and is never logged or written anywhere.
- ``world:<preset>``: the shapes world's paraphraser and summarizer answering the two task
  prompts (the testbed's stand-in).

A backend's ``fingerprint`` (its weights, sampled, and how it renders prompts; the world's
answers to fixed probes) keys a synthesis job's shards beside its name, so other weights behind
the same name never resume an old job; an ``openai:`` server has none (None): its model is
what the server says it is.

A prompt that gets no answer comes back as :class:`NoAnswer`. When its retries were used up
(timeouts, 429, 5xx, replies that are not chat completions) it is no answer *yet*: the job keeps
the prompt pending and a rerun asks again. Only the server refusing the prompt itself (HTTP 400,
413, 422: too long for the context, say) or a reply without text (a content filter) is final,
and the caller records it as rejected. A server that cannot be reached at all (connection
refused, unknown host) through the retries, or that refuses every request (401, 403, 404: the
key, the model name or the URL) stops the job instead: finished shards are kept and a rerun
resumes.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from pairfree.backends import BackendRegistry, Factory
from pairfree.clip.batching import fingerprint
from pairfree.errors import PairfreeError, load_failure

logger = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 429}  # and every 5xx
PROMPT_REFUSED = {400, 413, 422}  # the server's verdict on this prompt: final
CHAT_TEMPLATE = ("auto", "never", "always")
STOP_TOKENS = ("<|eot_id|>",)  # stopped at too, where the vocabulary has them (SaCap's)


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.6  # SaCap's
    top_p: float = 0.9
    do_sample: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise PairfreeError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise PairfreeError(f"sampling needs a temperature above 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PairfreeError(f"top_p must be in (0, 1], not {self.top_p}")


@dataclass(frozen=True)
class NoAnswer:
    """Why a prompt got no answer; ``final`` when asking again would not get one either (the
    server refused the prompt), else the prompt stays pending and a rerun asks again."""

    reason: str
    final: bool = False


@runtime_checkable
class LLM(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[str | NoAnswer]:
        """One answer per prompt, or why there is none."""
        ...


class HFCausalLM:
    """A transformers causal LM and its tokenizer, decoding batches with left padding."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str,
        response_prefix: str = "",
        chat_template: str = "auto",
    ) -> None:
        check_chat_template(chat_template)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "always" and not has_template:
            raise PairfreeError(f"{name}: chat_template is 'always' but the tokenizer has none")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.response_prefix = response_prefix  # prefilled at the start of every answer
        self.chat = has_template and chat_template != "never"
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.stop_ids = stop_token_ids(model, tokenizer)
        # what a resumed job must match: the weights (sampled) and how prompts are rendered
        rendering = f"{self.chat}\0{response_prefix}\0{getattr(tokenizer, 'chat_template', '')}"
        self.fingerprint = fingerprint(model, f"{rendering}\0{len(tokenizer)}")

    def _render(self, prompt: str) -> str:
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return text + self.response_prefix
        return prompt + self.response_prefix

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[str | NoAnswer]:
        if not prompts:
            return []
        batch = self.tokenizer(
            [self._render(p) for p in prompts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not self.chat,  # a chat template writes its own special tokens
        ).to(self.model.device)
        torch.manual_seed(sampling.seed)
        options = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        out = self.model.generate(
            **batch,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.do_sample,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            **(options if sampling.do_sample else {}),
        )
        answers = self.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return [self.response_prefix + a for a in answers]


def check_chat_template(value: str) -> None:
    if value not in CHAT_TEMPLATE:
        raise PairfreeError(
            f"chat_template must be one of {', '.join(CHAT_TEMPLATE)}, not {value!r}"
        )


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids decoding stops at: the model's own end tokens, the tokenizer's end of text, and
    those of :data:`STOP_TOKENS` the vocabulary has."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    vocabulary = tokenizer.get_vocab()
    ids = [*ids, tokenizer.eos_token_id, *(vocabulary.get(t) for t in STOP_TOKENS)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def load_hf_llm(
    model: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    response_prefix: str = "",
    chat_template: str = "auto",
    **_: object,
) -> HFCausalLM:
    """``AutoModelForCausalLM.from_pretrained``; a path to a ``.gguf`` file loads that file."""
    check_chat_template(chat_template)  # before the weights load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, extra = model, {}
    if model.endswith(".gguf"):
        source, extra = str(Path(model).parent), {"gguf_file": Path(model).name}
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtypes[dtype], **extra)
    except (OSError, ValueError) as err:
        raise load_failure(f"the LLM {model!r}", source, err) from err
    return HFCausalLM(lm.to(device), tokenizer, name=f"hf:{model}",
                      response_prefix=response_prefix, chat_template=chat_template)  # fmt: skip


class OpenAIChat:
    """An OpenAI-compatible chat-completions endpoint."""

    def __init__(
        self,
        model: str,
        *,
        api_base: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
    ) -> None:
        if not api_base:
            raise PairfreeError(
                "the openai: backend needs the server's API base URL (--api-base on the "
                "command line, synthesis.llm.api_base in a config)"
            )
        self.name = f"openai:{model}"
        self.fingerprint = None  # the model behind a server's name is the server's word
        self.model = model
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.backoff = max_retries, backoff

    def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[str | NoAnswer]:
        body = {
            "model": self.model,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature if sampling.do_sample else 0.0,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
        }
        with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            futures = [pool.submit(self._ask, prompt, body) for prompt in prompts]
            try:
                return [future.result() for future in futures]
            except PairfreeError:  # the server is not there: the prompts waiting need not try
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    def _ask(self, prompt: str, body: dict) -> str | NoAnswer:
        data = json.dumps({**body, "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.max_retries + 1):
            unreachable = False
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read().decode("utf-8"))
                message = reply["choices"][0]["message"]
                if isinstance(message.get("content"), str):
                    return message["content"]
                finish = reply["choices"][0].get("finish_reason")
                return NoAnswer(f"a reply without text (finish_reason {finish!r})", final=True)
            except urllib.error.HTTPError as err:
                if err.code in PROMPT_REFUSED:
                    return NoAnswer(f"the server refused the prompt: HTTP {err.code}"
                                    f"{_detail(err)}", final=True)  # fmt: skip
                if err.code not in RETRY_STATUS and err.code < 500:
                    raise PairfreeError(
                        f"the LLM server {self.url} refuses the requests (HTTP {err.code}): "
                        f"check the URL, the model name {self.model!r} and the key in "
                        f"${self.api_key_env}; what was finished is kept: rerun to resume"
                    ) from None
                problem = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                problem = type(err).__name__ + (
                    f" ({err.reason})" if hasattr(err, "reason") else ""
                )
                if isinstance(err, TimeoutError) or isinstance(
                    getattr(err, "reason", None), TimeoutError
                ):
                    problem = f"timed out after {self.timeout:g} s"
                unreachable = isinstance(err, urllib.error.URLError) and not isinstance(
                    err.reason, TimeoutError
                )  # refused, no such host: no prompt's fault
            except http.client.HTTPException as err:  # a reply cut short
                problem = type(err).__name__
            except (KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError,
                    json.JSONDecodeError):  # fmt: skip
                problem = "a reply without choices[0].message"
            if attempt < self.max_retries:
                time.sleep(min(self.backoff * 2**attempt, 60.0))
        if unreachable:
            raise PairfreeError(
                f"cannot reach the LLM server {self.url} ({problem}, {self.max_retries + 1} "
                "tries); what was finished is kept: rerun the same command to resume"
            )
        logger.debug("%s: no answer after %d tries (%s)", self.url, self.max_retries + 1, problem)
        return NoAnswer(f"{problem}, {self.max_retries + 1} tries")


def _detail(err: urllib.error.HTTPError) -> str:
    """The start of an error reply's text (the server's reason: context too long, ...)."""
    try:
        text = " ".join(err.read(300).decode("utf-8", "replace").split())
    except OSError:
        return ""
    return f" ({text[:200]})" if text else ""


def load_openai(model: str, *, api_base: str = "", **options: object) -> OpenAIChat:
    known = {"api_key_env", "concurrency", "timeout", "max_retries", "backoff"}
    chosen = {k: v for k, v in options.items() if k in known and v is not None}
    return OpenAIChat(model, api_base=api_base, **chosen)


# each factory takes (model, **options) and returns an LLM; the world's stand-in (world:) is an
# entry point of the package (group pairfree.llm)
LLM_BACKENDS = BackendRegistry(
    "LLM",
    "pairfree.llm",
    {"hf": "pairfree.synth.llm:load_hf_llm", "openai": "pairfree.synth.llm:load_openai"},
)


def register_llm_backend(prefix: str, factory: Factory, *, replace: bool = False) -> None:
    """Make ``--llm <prefix>:<model>`` call ``factory(model, **options)``, which returns an
    :class:`LLM` (options: the sampling and connection settings the commands pass)."""
    LLM_BACKENDS.register(prefix, factory, replace=replace)


def load_llm(spec: str, **options: object) -> LLM:
    """The LLM named by ``spec`` (``hf:...``, ``openai:...``, ``world:<preset>``, or a
    registered or installed backend's)."""
    factory, model = LLM_BACKENDS.resolve(spec)
    return factory(model, **options)


@dataclass
class LLMConfig:
    """An LLM and how it is asked: what the ``synthesize rephrase|summarize`` flags say, and
    ICSD's ``synthesis.llm``. Sampling settings are checked when it is made."""

    spec: str = ""  # hf:<model or .gguf>, openai:<model>, world:<preset>, or a registered one
    api_base: str = ""  # an OpenAI-compatible server (openai:)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8  # requests at once (openai:)
    timeout: float | None = None  # seconds to wait for an answer (openai:; None: its default)
    max_retries: int | None = None  # tries after the first on 429, 5xx, timeouts (openai:)
    response_prefix: str = ""  # text the answer starts with (hf:)
    chat_template: str = "auto"  # hf: never | auto | always
    prompt: str | None = None  # a file replacing the task's prompt
    strict_answers: bool = False  # pairfree's checked reading of answers (synth/tasks.py)
    temperature: float = 0.6  # SaCap's
    top_p: float = 0.9
    max_new_tokens: int = 256
    greedy: bool = False
    seed: int = 0
    dtype: str = "float32"
    batch_size: int = 16

    def __post_init__(self) -> None:
        self.sampling()  # bad sampling settings are refused now, before any model loads

    def sampling(self) -> Sampling:
        return Sampling(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            do_sample=not self.greedy,
            seed=self.seed,
        )

    def load(self, device: str | torch.device = "cpu") -> LLM:
        return load_llm(
            self.spec,
            api_base=self.api_base,
            api_key_env=self.api_key_env,
            concurrency=self.concurrency,
            timeout=self.timeout,
            max_retries=self.max_retries,
            response_prefix=self.response_prefix,
            chat_template=self.chat_template,
            dtype=self.dtype,
            device=device,
        )
