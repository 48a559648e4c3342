"""Batched decoding from a prefix of input embeddings, over any Hugging Face causal LM.

The prefix is fed once as ``inputs_embeds``; after that the LM sees one token per row and step
and reads the past from its KV cache. Rows that finish leave the batch (the cache is
re-indexed with them), so a batch of images costs about as much as its longest caption.

Prefixes of different lengths (a soft prompt and a hard prompt of a few tokens) come
left-padded with a ``prefix_mask``; each row's positions then count its real tokens only, so
a row decodes exactly as it would alone. A cross-attending decoder gets its ``context``
(``encoder_hidden_states``...) at every step, re-indexed with the rows.

Two beam searches (``search=``):

- ``"hf"``: as Hugging Face's: ``num_beams`` hypotheses keep growing while finished ones wait in
  a separate list, scored ``sum of token log-probs / length ** length_penalty``. What the
  length counts is ``score_length``: ``"new_tokens"``, the new tokens with the stop token
  (transformers >= 4.36); ``"with_prompt"``, every input id before them too (each row's
  ``prompt_lengths``) but not the stop token, as transformers counted before 4.36 (SaCap's
  vendored 4.21.2, the release ICSD's BLIP code ran). Counting the prompt favours shorter
  captions: with 31 prompt ids, 8 new tokens at -5.0 beat 11 at -6.2, which win when only the
  new tokens count;
- ``"clipcap"``: as ClipCap's and CapDec's ``generate_beam``: finished hypotheses keep their beam
  slot (extended by token 0 at no cost), every slot is re-ranked each step by its mean token
  log-probability, so fewer beams keep growing as beams finish; the best is the one with the
  highest mean. Greedy decoding in this mode is their ``generate2``, which also stops at " .".

:class:`GenerationConfig` is the one definition of a checkpoint's decoding settings; it is
saved in the checkpoint card and turned into :func:`generate`'s arguments by
:meth:`GenerationConfig.generate_kwargs`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from pairfree.errors import PairfreeError

EARLY_STOPPING = (False, True, "never")
SEARCHES = ("hf", "clipcap")
SCORE_LENGTHS = ("new_tokens", "with_prompt")


@dataclass
class GenerationConfig:
    """How a captioner decodes: beam width, length, where a caption stops."""

    num_beams: int = 5
    max_new_tokens: int = 67
    stop: str | None = "."  # decoding stops after this text (CapDec stops at ".")
    also_stop: tuple[str, ...] = ()  # and after these (ViECap: " .", GPT-2's other period)
    length_penalty: float = 1.0  # "hf" beam search only
    search: str = "hf"  # "hf" | "clipcap" (see the module docstring)
    # end-of-text ends a caption, and the text-only recipes (CapDec, the GANs' initialization)
    # train captions to end with it; the original ClipCap, CapDec, CgT-GAN, SaCap never stop there
    stop_at_eos: bool = True
    score_length: str = "new_tokens"  # "hf" beam search: "new_tokens" | "with_prompt" (above)

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, not {self.search!r}")
        if self.score_length not in SCORE_LENGTHS:
            raise ValueError(
                f"score_length must be one of {SCORE_LENGTHS}, not {self.score_length!r}"
            )
        for name in ("num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    def stop_token_ids(self, tokenizer) -> list[int]:
        """The tokens that end a caption: ``stop``'s last token, and in ClipCap's greedy
        decoding (``generate2``) also the last token of " ." (GPT-2's 764)."""
        stops = [self.stop] if self.stop else []
        stops += list(self.also_stop)
        if self.search == "clipcap" and self.num_beams == 1:
            stops.append(" .")
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][-1:] for text in stops]
        return sorted({i for tokens in ids for i in tokens})

    def generate_kwargs(self, tokenizer) -> dict[str, Any]:
        """These settings as keyword arguments of :func:`generate`."""
        return {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "stop_token_ids": self.stop_token_ids(tokenizer),
            "eos_token_id": tokenizer.eos_token_id if self.stop_at_eos else None,
            "length_penalty": self.length_penalty,
            "search": self.search,
            "score_length": self.score_length,
        }


class _BufferedLayer(DynamicLayer):
    """A KV cache layer whose keys and values are views into a buffer sized for the whole
    generation, so that a step writes its position in place.

    :class:`DynamicLayer` allocates the whole cache anew at every step, once to append
    (``torch.cat``) and once to re-index (``index_select``); on the CPU a fresh allocation costs
    more than the copy itself (each page is faulted in on first touch). Here, when rows are
    only reordered among the beams of one input (``within_groups``), their first ``shared``
    positions (the prefix, fed before any beam existed) are the same in every row of the group,
    so only the generated positions move, through a scratch buffer allocated once. Other
    re-indexings (beams spawned, finished inputs leaving) copy the rows into a new buffer. With
    beam 5 and a 40-token prefix the cache went from costing more than the step's matrix
    multiplies to a small share of them (``bench/generation.py``).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.capacity = max(capacity, keys.shape[-2])
        self.rows, self.length = keys.shape[0], keys.shape[-2]
        self.shared = self.length
        self.buffer = self._allocate(keys, self.rows, self.capacity)
        self.scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        for buffer, states in zip(self.buffer, (keys, values), strict=True):
            buffer[:, :, : self.length] = states
        self._expose()

    @staticmethod
    def _allocate(
        like: torch.Tensor, rows: int, positions: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (rows, like.shape[1], positions, like.shape[3])
        return like.new_empty(shape), like.new_empty(shape)

    def _expose(self) -> None:
        self.keys, self.values = (b[: self.rows, :, : self.length] for b in self.buffer)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # longer than planned: grow, as DynamicLayer would
            self.capacity = 2 * end
            grown = self._allocate(self.keys, self.rows, self.capacity)
            for new, old in zip(grown, (self.keys, self.values), strict=True):
                new[:, :, : self.length] = old
            self.buffer = grown
        for buffer, states in zip(self.buffer, (key_states, value_states), strict=True):
            buffer[: self.rows, :, self.length : end] = states
        self.length = end
        self._expose()
        return self.keys, self.values

    def reindex(self, rows: torch.Tensor, within_groups: bool) -> None:
        """Row ``i`` becomes the old row ``rows[i]``; ``within_groups``: each row stays with the
        input it was spawned from (a beam reorder), so the shared prefix stays where it is."""
        n, span = len(rows), self.length - self.shared
        if within_groups:
            if span == 0:  # nothing generated yet (or a cross-attention cache): all shared
                return
            held = (0, 0, 0) if self.scratch is None else self.scratch[0].shape
            if held[0] < n or held[2] < span:  # rows, positions
                self.scratch = self._allocate(self.keys, n, self.capacity - self.shared)
            for buffer, scratch in zip(self.buffer, self.scratch, strict=True):
                generated = buffer[:n, :, self.shared : self.length]
                moved = scratch[:n, :, :span]
                torch.index_select(generated, 0, rows, out=moved)
                generated.copy_(moved)
        else:
            new = self._allocate(self.keys, n, self.capacity)
            for old, buffer in zip((self.keys, self.values), new, strict=True):
                torch.index_select(old, 0, rows, out=buffer[:, :, : self.length])
            self.buffer = new
        self.rows = n
        self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Hugging Face's entry point, kept true to the buffers (the stepper calls reindex)."""
        self.reindex(beam_idx.to(self.device), within_groups=False)


class _Stepper:
    """Runs the LM one token per row per step and returns next-token logits.

    With ``use_cache`` the past positions come from the KV cache; without it the whole sequence
    is re-run every step, which is slower but needs nothing from the model's cache.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        prefix: torch.Tensor,
        use_cache: bool,
        *,
        prefix_mask: torch.Tensor | None = None,
        context: dict[str, torch.Tensor] | None = None,
        max_new_tokens: int = 0,
    ) -> None:
        self.lm = lm
        self.use_cache = use_cache
        self.capacity = prefix.shape[1] + max_new_tokens  # positions the cache will hold
        self.device = prefix.device
        self.origin = torch.arange(len(prefix), device=self.device)  # the input each row is of
        self.inputs = prefix
        self.mask = None if prefix_mask is None else prefix_mask.to(self.device, torch.long)
        self.context = {k: v.to(self.device) for k, v in (context or {}).items()}
        self.cache = None
        accepts = inspect.signature(lm.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        # transformers >= 5.24 names the KV cache `cache` (in and out); older releases, and
        # models that have not moved yet, call it `past_key_values`
        self.cache_name = "cache" if "cache" in accepts else "past_key_values"

    def start(self) -> torch.Tensor:
        logits = self._run(inputs_embeds=self.inputs, **self._positions(last=False))
        if self.use_cache and not hasattr(self.cache, "reorder_cache"):
            raise TypeError(
                f"{type(self.lm).__name__} returned a cache that cannot be re-indexed; "
                "generate with use_cache=False"
            )
        if self.use_cache:
            self._buffer_cache()
        return logits

    def _buffer_cache(self) -> None:
        """Hold a dynamic cache's layers in :class:`_BufferedLayer` objects (a cross-attending
        decoder's self- and cross-attention caches alike); other caches stay as the model made
        them and are re-indexed through their own ``reorder_cache``."""
        cache = self.cache
        if isinstance(cache, EncoderDecoderCache):
            parts = ((cache.self_attention_cache, self.capacity), (cache.cross_attention_cache, 0))
        else:
            parts = ((cache, self.capacity),)
        self.buffered, self.unbuffered = [], []
        for part, capacity in parts:
            layers = getattr(part, "layers", [])
            if type(part) is DynamicCache and all(
                type(layer) is DynamicLayer and layer.get_seq_length() > 0 for layer in layers
            ):
                part.layers = [_BufferedLayer(x.keys, x.values, capacity) for x in layers]
                self.buffered += part.layers
            else:
                self.unbuffered.append(part)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat or reorder) the given rows of the batch."""
        rows = rows.to(self.device)
        if self.use_cache:
            origin = self.origin[rows]
            within_groups = len(origin) == len(self.origin) and bool((origin == self.origin).all())
            self.origin = origin
            for layer in self.buffered:
                layer.reindex(rows, within_groups)
            for part in self.unbuffered:
                part.reorder_cache(rows)
        else:
            self.inputs = self.inputs[rows]
        if self.mask is not None:
            self.mask = self.mask[rows]
        self.context = {k: v[rows] for k, v in self.context.items()}

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)[:, None]
        if self.mask is not None:
            self.mask = torch.cat((self.mask, self.mask.new_ones(len(tokens), 1)), dim=1)
        if self.use_cache:
            positions = self._positions(last=True)
            return self._run(input_ids=tokens, **{self.cache_name: self.cache}, **positions)
        embeds = self.lm.get_input_embeddings()(tokens).to(self.inputs.dtype)
        self.inputs = torch.cat((self.inputs, embeds), dim=1)
        return self._run(inputs_embeds=self.inputs, **self._positions(last=False))

    def _positions(self, *, last: bool) -> dict[str, torch.Tensor]:
        """The attention mask over everything so far and the position ids of the tokens fed
        now (of the last one only with ``last``): padding takes no position."""
        if self.mask is None:
            return {}
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        return {
            "attention_mask": self.mask,
            "position_ids": positions[:, -1:] if last else positions,
        }

    def _run(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.lm(**inputs, **self.context, use_cache=self.use_cache, **self.extra)
        if self.use_cache:
            self.cache = getattr(out, self.cache_name)
        return out.logits[:, -1].float()


@torch.no_grad()
def generate(
    lm: PreTrainedModel,
    prefix: torch.Tensor,
    *,
    num_beams: int = 1,
    max_new_tokens: int = 67,
    stop_token_ids: Sequence[int] = (),
    eos_token_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    search: str = "hf",
    prefix_mask: torch.Tensor | None = None,
    context: dict[str, torch.Tensor] | None = None,
    score_length: str = "new_tokens",
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
) -> list[list[int]]:
    """Continue each prefix ``[B, k, h]`` with greedy decoding, beam search or sampling.

    ``prefix_mask`` ``[B, k]`` marks real prefix positions when prefixes are left-padded;
    ``context`` holds per-row keyword inputs of the LM (``encoder_hidden_states`` ``[B, L, h]``
    for a cross-attending decoder). ``score_length`` is what a ``"hf"`` beam hypothesis'
    length counts (see the module docstring); ``"with_prompt"`` counts ``prompt_lengths[b]``
    prompt ids for row b (at least one: the ids of the original code's decoder input, which
    need not be the prefix's real positions).

    Returns the new token ids of ``B * num_return_sequences`` sequences, grouped by input (beam
    hypotheses best first). A sequence ends at any of ``stop_token_ids`` (kept) or at
    ``eos_token_id`` (dropped), or after ``max_new_tokens``. ``early_stopping`` ends a beam search
    as Hugging Face's does: ``False`` once no running beam is likely to beat the finished ones,
    ``True`` as soon as ``num_beams`` hypotheses finished, ``"never"`` only when none can.
    ``search="clipcap"`` runs ClipCap's beam search instead (see the module docstring).
    """
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if score_length not in SCORE_LENGTHS:
        raise ValueError(f"score_length must be one of {SCORE_LENGTHS}, got {score_length!r}")
    prompt = None
    if score_length == "with_prompt" and search == "hf" and num_beams > 1:
        prompt = _prompt_lengths(prompt_lengths, len(prefix))
    _check_args(
        prefix,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        early_stopping=early_stopping,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        num_return_sequences=num_return_sequences,
    )
    stop = set(stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long)
    if prefix_mask is not None and prefix_mask.shape != prefix.shape[:2]:
        raise ValueError(f"prefix_mask {tuple(prefix_mask.shape)} for prefix {tuple(prefix.shape)}")
    for name, value in (context or {}).items():
        if len(value) != len(prefix):
            raise ValueError(f"context {name!r} has {len(value)} rows for {len(prefix)} prefixes")
    _check_fits(lm, prefix.shape[1], num_beams=num_beams, max_new_tokens=max_new_tokens,
                search=search)  # fmt: skip
    stepper = _Stepper(lm, prefix, use_cache, prefix_mask=prefix_mask, context=context,
                       max_new_tokens=max_new_tokens)  # fmt: skip
    logits = stepper.start()
    if num_beams > 1 and search == "clipcap":
        sequences = _clipcap_beam_search(
            stepper,
            logits,
            num_beams=num_beams,
            num_return_sequences=num_return_sequences,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
        )
    elif num_beams > 1:
        sequences = _beam_search(
            stepper,
            logits,
            num_beams=num_beams,
            num_return_sequences=num_return_sequences,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            prompt_lengths=prompt,
        )
    else:
        pick = _sampler(temperature, top_k, generator) if do_sample else _argmax
        sequences = _decode(
            stepper,
            logits,
            pick,
            num_return_sequences=num_return_sequences,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
        )
    if eos_token_id is not None:
        for seq in sequences:
            if seq and seq[-1] == eos_token_id:
                seq.pop()
    return sequences


def _clipcap_beam_search(
    stepper: _Stepper,
    logits: torch.Tensor,
    *,
    num_beams: int,
    num_return_sequences: int,
    max_new_tokens: int,
    stop_ids: torch.Tensor,
) -> list[list[int]]:
    """ClipCap's ``generate_beam``, batched over inputs and run on the KV cache.

    Every input keeps ``num_beams`` slots. A slot that produced a stop token stays in the race
    with its score frozen (it may only add token 0, at log-probability 0, and its length stops
    growing); each step all ``num_beams * V`` continuations are ranked by mean token
    log-probability (ClipCap's ``softmax().log()``, not ``log_softmax``). An input is done when
    all its slots are stopped (ClipCap stops there); it then leaves the batch, and its slots are
    ranked by mean log-probability.
    """
    batch, k = logits.shape[0], num_beams
    vocab = logits.shape[-1]
    device = logits.device
    stop_ids = stop_ids.to(device)
    scores, first = logits.softmax(-1).log().topk(k, -1)  # [n, k] for the n inputs still going
    tokens = first[..., None]  # [n, k, t]
    lengths = torch.ones(batch, k, device=device)
    stopped = torch.isin(first, stop_ids)
    items = torch.arange(batch, device=device)  # the input each of the n is
    parent = items[:, None].expand(batch, k)  # the LM row each slot continues
    final: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for step_number in range(max_new_tokens):
        done = stopped.all(dim=1) | (step_number == max_new_tokens - 1)
        for i in done.nonzero().squeeze(1).tolist():
            final[int(items[i])] = (scores[i], lengths[i], tokens[i])
        going = ~done
        if not going.any():
            break
        items, scores, lengths, stopped, tokens, parent = (
            x[going] for x in (items, scores, lengths, stopped, tokens, parent)
        )
        stepper.select(parent.reshape(-1))
        n = len(items)
        step = stepper.step(tokens[..., -1].reshape(-1)).softmax(-1).log_().view(n, k, vocab)
        if stopped.any():
            step[stopped] = -float("inf")
            step[..., 0][stopped] = 0.0
        grown = lengths + (~stopped).float()
        mean = step.add_(scores[..., None]).div_(grown[..., None])  # in place: n * k * V floats
        best, index = mean.view(n, k * vocab).topk(k, -1)
        source, token = index // vocab, index % vocab
        lengths = grown.gather(1, source)
        history = tokens.gather(1, source[..., None].expand_as(tokens))
        tokens = torch.cat((history, token[..., None]), -1)
        stopped = stopped.gather(1, source) | torch.isin(token, stop_ids)
        scores = best * lengths
        parent = torch.arange(n, device=device)[:, None] * k + source
    sequences = []
    for b in range(batch):
        scores_b, lengths_b, tokens_b = final[b]
        for slot in (scores_b / lengths_b).argsort(descending=True)[:num_return_sequences].tolist():
            sequences.append(tokens_b[slot, : int(lengths_b[slot])].tolist())
    return sequences


class DoesNotFitError(PairfreeError, ValueError):
    """Decoding settings the decoder cannot run: more beams than words, more positions than it
    has. A user-facing error (the command line prints it in one line)."""


def _check_fits(
    lm: PreTrainedModel, prefix_length: int, *, num_beams: int, max_new_tokens: int, search: str
) -> None:
    vocab = lm.config.vocab_size
    if search == "clipcap" and num_beams > vocab:  # its beams start from distinct first tokens
        raise DoesNotFitError(f"{num_beams} beams for a vocabulary of {vocab} tokens")
    config = lm.config
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None
    )
    needed = prefix_length + max_new_tokens - 1  # the last new token is never fed back
    if positions is not None and needed > positions:
        raise DoesNotFitError(
            f"a prefix of {prefix_length} and {max_new_tokens} new tokens need {needed} "
            f"positions; the decoder has {positions} (lower the maximum caption length)"
        )


def _prompt_lengths(lengths: Sequence[int] | torch.Tensor | None, rows: int) -> torch.Tensor:
    """Each row's prompt ids for ``score_length="with_prompt"``, checked."""
    if lengths is None:
        raise DoesNotFitError(
            "score_length='with_prompt' counts each row's prompt ids, and none were given "
            "(a prefix captioner has none: use 'new_tokens')"
        )
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (rows,) or bool((lengths < 1).any()):
        raise ValueError(
            f"prompt_lengths must be {rows} counts of at least 1, got {lengths.tolist()}"
        )
    return lengths


def _check_args(
    prefix: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    early_stopping: bool | str,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    num_return_sequences: int,
) -> None:
    if prefix.dim() != 3:
        raise ValueError(f"prefix must be [batch, length, hidden], got shape {tuple(prefix.shape)}")
    if num_beams < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError("num_beams, max_new_tokens and num_return_sequences must be >= 1")
    if early_stopping not in EARLY_STOPPING:
        raise ValueError(f"early_stopping must be one of {EARLY_STOPPING}, got {early_stopping!r}")
    if do_sample:
        if num_beams > 1:
            raise ValueError("sampling is supported with num_beams=1 only")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
    else:
        if temperature != 1.0 or top_k is not None:
            raise ValueError("temperature and top_k apply only with do_sample=True")
        if num_return_sequences > num_beams:
            raise ValueError(
                f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})"
            )


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _sampler(
    temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    return pick


def _decode(
    stepper: _Stepper,
    logits: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_return_sequences: int,
    max_new_tokens: int,
    stop_ids: torch.Tensor,
) -> list[list[int]]:
    """Greedy decoding or sampling: one token per row and step; finished rows leave the batch."""
    if num_return_sequences > 1:
        rows = torch.arange(logits.shape[0]).repeat_interleave(num_return_sequences)
        stepper.select(rows)
        logits = logits[rows.to(logits.device)]
    sequences: list[list[int]] = [[] for _ in range(logits.shape[0])]
    alive = torch.arange(logits.shape[0])
    for step in range(max_new_tokens):
        tokens = pick(logits).cpu()
        for i, token in zip(alive.tolist(), tokens.tolist(), strict=True):
            sequences[i].append(token)
        going = ~torch.isin(tokens, stop_ids)
        if step + 1 == max_new_tokens or not going.any():
            break
        if not going.all():
            stepper.select(going.nonzero().squeeze(1))
            alive, tokens = alive[going], tokens[going]
        logits = stepper.step(tokens)
    return sequences


def _beam_search(
    stepper: _Stepper,
    logits: torch.Tensor,
    *,
    num_beams: int,
    num_return_sequences: int,
    max_new_tokens: int,
    stop_ids: torch.Tensor,
    length_penalty: float,
    early_stopping: bool | str,
    prompt_lengths: torch.Tensor | None = None,
) -> list[list[int]]:
    """Beam search over a batch; an input leaves the batch once its search is decided.

    As in Hugging Face's implementation, each step looks at the ``(1 + #stop tokens) * beams``
    best continuations of an input: those among the ``beams`` best that end become finished
    hypotheses (the ``beams`` best are kept), the ``beams`` best that do not end keep running.
    Bookkeeping runs on the CPU; the LM sees only the surviving rows.

    ``prompt_lengths`` (one count per input) scores as transformers did before 4.36
    (``score_length="with_prompt"``): a hypothesis' length is its prompt ids and its tokens
    without the stop token that ended it; at the last step the running beams, rather than the
    ``beams`` best candidates, are the hypotheses that did not stop (unless the search was
    decided at that step); and the stopping rule reads the best candidate (see
    :func:`_beam_done`). Without it the length is the new tokens, the stop token included.
    """
    batch, vocab = logits.shape
    beams = num_beams
    with_prompt = prompt_lengths is not None
    stepper.select(torch.arange(batch).repeat_interleave(beams))
    log_probs = logits.log_softmax(dim=-1).repeat_interleave(beams, dim=0)
    scores = torch.full((batch, beams), float("-inf"))
    scores[:, 0] = 0.0  # the beams start identical: expand only the first one
    tokens = torch.empty((batch * beams, 0), dtype=torch.long)
    items = list(range(batch))
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    n_candidates = min((1 + len(stop_ids)) * beams, beams * vocab)

    def keep(i: int, hyps: list[tuple[float, list[int]]]) -> None:
        finished[i] = sorted(finished[i] + hyps, key=lambda h: -h[0])[:beams]

    for length in range(1, max_new_tokens + 1):
        n = len(items)
        last = length == max_new_tokens
        prompt = prompt_lengths[items] if with_prompt else torch.zeros(n, dtype=torch.long)
        total = (scores.view(-1, 1).to(log_probs.device) + log_probs).view(n, beams * vocab)
        cand_scores, cand = (t.cpu() for t in total.topk(n_candidates, dim=1))
        cand_beam, cand_token = cand // vocab, cand % vocab
        ends = torch.isin(cand_token, stop_ids)
        if not with_prompt:
            ends |= last
        # a hypothesis that ends now is this long (with_prompt: its stop token not counted)
        ended_length = prompt + length - int(with_prompt)

        added: dict[int, list[tuple[float, list[int]]]] = {}
        for a, r in (ends[:, :beams] & cand_scores[:, :beams].isfinite()).nonzero().tolist():
            seq = tokens[a * beams + cand_beam[a, r]].tolist() + [int(cand_token[a, r])]
            score = float(cand_scores[a, r]) / int(ended_length[a]) ** length_penalty
            added.setdefault(items[a], []).append((score, seq))
        for i, hyps in added.items():
            keep(i, hyps)

        order = torch.sort(ends.int(), dim=1, stable=True).indices[:, :beams]
        scores = cand_scores.gather(1, order).masked_fill(ends.gather(1, order), float("-inf"))
        rows = cand_beam.gather(1, order) + torch.arange(n)[:, None] * beams
        next_tokens = cand_token.gather(1, order)

        if early_stopping == "never" and length_penalty > 0:
            reach = prompt + max_new_tokens  # the longest a running beam can grow
        else:
            reach = ended_length if with_prompt else prompt + length
        best = cand_scores[:, 0] if with_prompt else scores[:, 0]
        done = _beam_done(
            best / reach.float() ** length_penalty,
            [finished[i] for i in items],
            beams=beams,
            early_stopping=early_stopping,
        )
        if with_prompt and last:  # the beams still running are hypotheses too
            for a in (~done).nonzero().squeeze(1).tolist():
                full = int(prompt[a]) + length
                running = [
                    (float(scores[a, b]) / full**length_penalty,
                     tokens[rows[a, b]].tolist() + [int(next_tokens[a, b])])
                    for b in range(beams) if scores[a, b].isfinite()
                ]  # fmt: skip
                keep(items[a], running)
        if last or done.all():
            break
        going = ~done
        rows = rows[going].view(-1)
        tokens = torch.cat((tokens[rows], next_tokens[going].view(-1, 1)), dim=1)
        scores = scores[going]
        items = [i for i, d in zip(items, done.tolist(), strict=True) if not d]
        stepper.select(rows)
        log_probs = stepper.step(tokens[:, -1]).log_softmax(dim=-1)

    out = []
    for i, hyps in enumerate(finished):
        if len(hyps) < num_return_sequences:
            raise RuntimeError(
                f"input {i} has only {len(hyps)} finished hypotheses, "
                f"fewer than num_return_sequences={num_return_sequences}"
            )
        out.extend(seq for _, seq in hyps[:num_return_sequences])
    return out


def _beam_done(
    bound: torch.Tensor,
    finished: list[list[tuple[float, list[int]]]],
    *,
    beams: int,
    early_stopping: bool | str,
) -> torch.Tensor:
    """Whether each input's search is decided (Hugging Face's stopping rules): it has
    ``beams`` finished hypotheses and ``early_stopping`` is True, or none of its running beams
    is expected to beat the worst of them.

    ``bound`` is the score a running beam is expected to reach: the best running sum over the
    current length for ``early_stopping=False`` (a heuristic when ``length_penalty > 0``), over
    the longest possible for ``"never"`` (a bound, as log-probs only add up to more negative
    sums). transformers before 4.36 took the best candidate, stopped or not, over the length
    before the step.
    """
    done = []
    for best, hyps in zip(bound.tolist(), finished, strict=True):
        full = len(hyps) == beams
        decided = full and (early_stopping is True or best <= hyps[-1][0])
        done.append(best == float("-inf") or decided)
    return torch.tensor(done, dtype=torch.bool)
