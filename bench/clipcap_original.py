"""ClipCap's and CapDec's decoding restated as their code runs it: one image at a time, the whole
sequence (prefix + the tokens so far) through the LM at every step, and the LM's logits at
every position of it, of which the last is used.

``beam_search`` is their ``generate_beam`` and ``greedy`` their ``generate2`` (without its
top-p bookkeeping, which cannot change the argmax). They are the baseline of
``bench/generation.py`` and the reference ``tests/test_generation.py`` holds pairfree's
``search="clipcap"`` to.
"""

from __future__ import annotations

from collections.abc import Container

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def beam_search(
    lm: PreTrainedModel, prefix: torch.Tensor, beams: int, max_new_tokens: int, stop: int
) -> list[list[int]]:
    """Every beam's tokens for one prefix ``[k, h]``, the best (highest mean log-prob) first.

    A beam that produced ``stop`` keeps its slot: it may only add token 0 at no cost and its
    length stops growing, while every slot's continuations are ranked by mean log-probability.
    """
    embed = lm.get_input_embeddings()
    sequence = prefix[None]
    log_probs = lm(inputs_embeds=sequence).logits[:, -1].softmax(-1).log()
    scores, first = log_probs[0].topk(beams)
    tokens = first[:, None]
    lengths = torch.ones(beams, device=prefix.device)
    stopped = first == stop
    sequence = sequence.expand(beams, -1, -1)
    for _ in range(max_new_tokens - 1):
        if stopped.all():
            break
        sequence = torch.cat((sequence, embed(tokens[:, -1:]).to(sequence.dtype)), dim=1)
        log_probs = lm(inputs_embeds=sequence).logits[:, -1].softmax(-1).log()
        log_probs[stopped] = -float("inf")
        log_probs[stopped, 0] = 0.0
        lengths = lengths + (~stopped).float()
        mean = (scores[:, None] + log_probs) / lengths[:, None]
        best, flat = mean.view(-1).topk(beams)
        source, token = flat // log_probs.shape[1], flat % log_probs.shape[1]
        lengths, stopped, sequence = lengths[source], stopped[source], sequence[source]
        tokens = torch.cat((tokens[source], token[:, None]), dim=1)
        scores = best * lengths
        stopped = stopped | (token == stop)
    order = (scores / lengths).argsort(descending=True)
    return [tokens[i, : int(lengths[i])].tolist() for i in order.tolist()]


@torch.no_grad()
def greedy(
    lm: PreTrainedModel, prefix: torch.Tensor, max_new_tokens: int, stops: Container[int]
) -> list[int]:
    """The argmax continuation of one prefix ``[k, h]``, ending at (and keeping) a stop token."""
    embed = lm.get_input_embeddings()
    sequence, tokens = prefix[None], []
    for _ in range(max_new_tokens):
        token = int(lm(inputs_embeds=sequence).logits[0, -1].argmax())
        tokens.append(token)
        if token in stops:
            break
        step = embed(torch.tensor([[token]], device=prefix.device)).to(sequence.dtype)
        sequence = torch.cat((sequence, step), dim=1)
    return tokens
