"""Decoding: beam search against brute force and Hugging Face, batching, KV cache, sampling."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutput

from bench import clipcap_original
from pairfree.captioner import generation
from pairfree.captioner.generation import generate

VOCAB = 6
STOP = 2
EOS = 5
HIDDEN = 16
# Tokens the wide test LM reaches within a few steps, so that rows end at different steps.
WIDE_STOP = 31
WIDE_EOS = 12


def tiny_lm(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    """A random GPT-2 with peaked next-token distributions (large init), so ties are rare."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=2,
        n_positions=32,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def lm() -> GPT2LMHeadModel:
    return tiny_lm(VOCAB)


@pytest.fixture(scope="module")
def wide_lm() -> GPT2LMHeadModel:
    return tiny_lm(40)


@pytest.fixture(scope="module")
def prefixes() -> torch.Tensor:
    return torch.randn(5, 3, HIDDEN, generator=torch.Generator().manual_seed(0))


def brute_force_ranking(
    lm: GPT2LMHeadModel,
    prefix: torch.Tensor,
    max_len: int,
    length_penalty: float,
    prompt: int | None = None,
) -> list[tuple[float, list[int]]]:
    """Every possible output (ending at a terminator or at max_len), scored like beam search:
    its sum of log-probs over its new tokens, or with ``prompt`` (score_length="with_prompt")
    over that many prompt ids and its new tokens but the terminator."""
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=max_len)))
    embeds = torch.cat(
        (prefix[None].expand(len(seqs), -1, -1), lm.get_input_embeddings()(seqs)), dim=1
    )
    with torch.no_grad():
        logits = lm(inputs_embeds=embeds).logits[:, prefix.shape[0] - 1 : -1]
    token_lp = logits.log_softmax(-1).gather(-1, seqs[..., None]).squeeze(-1)
    cumulative = token_lp.cumsum(dim=1)
    scored = {}
    for seq, cum in zip(seqs.tolist(), cumulative, strict=True):
        ends = [i for i, t in enumerate(seq) if t in (STOP, EOS)]
        length = ends[0] + 1 if ends else max_len
        hyp = tuple(seq[:length])
        counted = length if prompt is None else prompt + length - bool(ends)
        scored[hyp] = float(cum[length - 1]) / counted**length_penalty
    ranking = sorted(scored.items(), key=lambda kv: -kv[1])
    return [(score, list(h[:-1]) if h[-1] == EOS else list(h)) for h, score in ranking]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("prompt", [None, 3, 31])  # new tokens; prompt ids counted too
def test_exhaustive_beam_search_finds_the_brute_force_best(lm, prefixes, length_penalty, prompt):
    max_len = 4
    beams = VOCAB**max_len  # enough to keep every live hypothesis at every step
    prefixes = prefixes[:2]
    scoring = {} if prompt is None else {"score_length": "with_prompt"}
    out = generate(
        lm,
        prefixes,
        num_beams=beams,
        max_new_tokens=max_len,
        stop_token_ids=[STOP],
        eos_token_id=EOS,
        length_penalty=length_penalty,
        num_return_sequences=3,
        prompt_lengths=None if prompt is None else [prompt] * len(prefixes),
        **scoring,
    )
    for i, prefix in enumerate(prefixes):
        ranking = brute_force_ranking(lm, prefix, max_len, length_penalty, prompt)
        assert out[3 * i : 3 * i + 3] == [seq for _, seq in ranking[:3]]


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"),
    [(1.0, False), (2.0, False), (1.0, True), (1.0, "never"), (-1.0, "never")],
)
def test_beam_search_matches_hugging_face(wide_lm, prefixes, length_penalty, early_stopping):
    kwargs = dict(num_beams=3, max_new_tokens=8, length_penalty=length_penalty)
    kwargs["early_stopping"] = early_stopping
    ours = generate(wide_lm, prefixes, stop_token_ids=[WIDE_STOP], eos_token_id=WIDE_EOS, **kwargs)
    for prefix, seq in zip(prefixes, ours, strict=True):
        hf = wide_lm.generate(
            inputs_embeds=prefix[None],
            eos_token_id=[WIDE_STOP, WIDE_EOS],
            pad_token_id=WIDE_EOS,
            **kwargs,
        )[0].tolist()
        while hf and hf[-1] == WIDE_EOS:  # HF pads with (and keeps) the eos token
            hf.pop()
        assert seq == hf


def transformers_4_21_beam_search(
    lm: GPT2LMHeadModel,
    prompt_ids: list[int],
    counted: int,
    *,
    beams: int,
    max_new: int,
    stop: int,
    length_penalty: float,
    early_stopping: bool,
) -> list[int]:
    """The beam search SaCap ran (transformers 4.21.2's ``beam_search`` with its
    ``BeamSearchScorer``), re-derived one input at a time without a cache. The decoder reads
    ``prompt_ids``; a hypothesis' length is ``counted`` input ids (the original's padded input,
    which may be longer than the ids the decoder attends to) plus its tokens, without the stop
    token that ended it. Returns the best new tokens, with the stop token where it stopped."""
    running = [([], 0.0 if b == 0 else -1e9) for b in range(beams)]
    best_of: list[tuple[float, list[int], bool]] = []  # (score, new tokens, stopped)

    def add(new: list[int], total: float, stopped: bool) -> None:
        best_of.append((total / (counted + len(new)) ** length_penalty, new, stopped))
        best_of.sort(key=lambda h: -h[0])
        del best_of[beams:]

    decided = False
    for _ in range(max_new):
        candidates = []
        for b, (new, total) in enumerate(running):
            seen = torch.tensor([prompt_ids + new])
            with torch.no_grad():
                logits = lm(seen, attention_mask=torch.ones_like(seen)).logits[0, -1]
            step = logits.log_softmax(-1).tolist()
            candidates += [(total + lp, b, t) for t, lp in enumerate(step)]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beams]
        following = []
        for rank, (total, b, t) in enumerate(candidates):
            if t == stop:
                if rank < beams:  # a stop token ranked below the beams is passed over
                    add(running[b][0], total, stopped=True)
            else:
                following.append((running[b][0] + [t], total))
            if len(following) == beams:
                break
        length_so_far = counted + len(running[0][0])  # the input ids before this step's token
        running = following
        if len(best_of) == beams and (
            early_stopping or best_of[-1][0] >= candidates[0][0] / length_so_far**length_penalty
        ):
            decided = True
            break
    if not decided:  # at the maximum length the running beams are hypotheses too
        for new, total in running:
            add(new, total, stopped=False)
    _, new, stopped = best_of[0]
    return new + [stop] if stopped else new


@pytest.mark.parametrize(("length_penalty", "early_stopping"), [(1.0, False), (2.0, False),
                                                                 (1.0, True)])  # fmt: skip
def test_prompt_counting_beam_search_matches_transformers_4_21(
    wide_lm, length_penalty, early_stopping
):
    """score_length="with_prompt" is the beam search SaCap's vendored transformers ran, for
    prompts of real ids counted as they are and counted padded (SaCap's 31 ids)."""
    ids = torch.randint(40, (16, 4), generator=torch.Generator().manual_seed(0))
    prompts = wide_lm.get_input_embeddings()(ids).detach()
    # a stop token the model often reaches, so that beams finish at different steps
    free = generate(wide_lm, prompts, num_beams=3, max_new_tokens=9)
    stop = Counter(t for seq in free for t in seq[1:4]).most_common(1)[0][0]
    kwargs = dict(num_beams=3, max_new_tokens=9, stop_token_ids=[stop],
                  length_penalty=length_penalty, early_stopping=early_stopping)  # fmt: skip
    new_tokens = generate(wide_lm, prompts, **kwargs)
    differ = 0
    for counted in (4, 31):
        ours = generate(wide_lm, prompts, score_length="with_prompt",
                        prompt_lengths=[counted] * len(ids), **kwargs)  # fmt: skip
        for row, seq in zip(ids.tolist(), ours, strict=True):
            assert seq == transformers_4_21_beam_search(
                wide_lm, row, counted, beams=3, max_new=9, stop=stop,
                length_penalty=length_penalty, early_stopping=early_stopping,
            )  # fmt: skip
        differ += sum(a != b for a, b in zip(ours, new_tokens, strict=True))
    assert differ > 0  # counting the prompt picks other captions


class ScriptedLM(torch.nn.Module):
    """A decoder whose next-token log-probs are set by hand: from the prompt, "a" at -2.0 and
    "b" at -2.2; then "a" until 7 of them and "b" until 10, each followed by the stop token,
    so that A = 7 x "a" + stop sums to -5.0 over 8 tokens and B = 10 x "b" + stop to -6.2
    over 11. Every other token shares what is left (about -8 each in 1000)."""

    VOCAB, A, B, STOP = 1000, 1, 2, 3

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(self.VOCAB, self.VOCAB)
        self.embed.weight.data = torch.eye(self.VOCAB)  # a row is its token, one-hot
        self.config = GPT2Config(vocab_size=self.VOCAB, n_positions=64)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, inputs_embeds: torch.Tensor, **_) -> CausalLMOutput:
        new = inputs_embeds[:, 1:].argmax(-1).tolist()  # the prompt is one position
        return CausalLMOutput(
            logits=torch.stack([self.next_log_probs(seq) for seq in new])[:, None]
        )

    def next_log_probs(self, seq: list[int]) -> torch.Tensor:
        if not seq:
            chosen = {self.A: -2.0, self.B: -2.2}
        elif seq == [self.A] * len(seq):
            chosen = {self.A if len(seq) < 7 else self.STOP: -3.0 / 7}
        elif seq == [self.B] * len(seq):
            chosen = {self.B if len(seq) < 10 else self.STOP: -0.4}
        else:
            chosen = {}
        rest = 1 - sum(math.exp(v) for v in chosen.values())
        log_probs = torch.full((self.VOCAB,), math.log(rest / (self.VOCAB - len(chosen))))
        for token, value in chosen.items():
            log_probs[token] = value
        return log_probs


def test_counting_the_prompt_picks_the_shorter_caption_of_the_issue_example():
    """8 tokens at -5.0 against 11 at -6.2: by the new tokens the longer one wins (-0.56 vs
    -0.63), counting SaCap's 31 prompt ids the shorter (-5.0 / 38 vs -6.2 / 41)."""
    lm, prompt = ScriptedLM(), torch.eye(ScriptedLM.VOCAB)[None, :1]
    kwargs = dict(num_beams=2, max_new_tokens=15, stop_token_ids=[ScriptedLM.STOP],
                  use_cache=False)  # fmt: skip
    shorter, longer = [1] * 7 + [3], [2] * 10 + [3]
    assert generate(lm, prompt, **kwargs) == [longer]
    assert generate(lm, prompt, score_length="with_prompt", prompt_lengths=[31], **kwargs) == [
        shorter
    ]


def test_prompt_counting_needs_the_prompt_lengths(wide_lm, prefixes):
    from pairfree.errors import PairfreeError

    with pytest.raises(PairfreeError, match="prompt ids"):
        generate(wide_lm, prefixes, num_beams=2, score_length="with_prompt")
    with pytest.raises(ValueError, match="prompt_lengths must be 5 counts of at least 1"):
        generate(wide_lm, prefixes, num_beams=2, score_length="with_prompt",
                 prompt_lengths=[0, 1, 1, 1, 1])  # fmt: skip
    with pytest.raises(ValueError, match="score_length must be one of"):
        generate(wide_lm, prefixes, num_beams=2, score_length="prompt")
    with pytest.raises(ValueError, match="score_length must be one of"):
        generation.GenerationConfig(score_length="prompt")
    # greedy decoding and ClipCap's search have no length to count: nothing is needed
    greedy = generate(wide_lm, prefixes, max_new_tokens=5, score_length="with_prompt")
    assert greedy == generate(wide_lm, prefixes, max_new_tokens=5)


def test_stop_token_is_kept_and_eos_dropped(wide_lm, prefixes):
    free = generate(wide_lm, prefixes, max_new_tokens=20)
    eos = free[0][2]  # tokens that greedy decoding is known to reach
    stop = next(t for t in free[1][1:] if t != eos)
    out = generate(wide_lm, prefixes, max_new_tokens=20, stop_token_ids=[stop], eos_token_id=eos)
    ended = {"stop": 0, "eos": 0}
    for seq, full in zip(out, free, strict=True):
        cut = next((i for i, t in enumerate(full) if t in (stop, eos)), None)
        if cut is None:
            assert seq == full
        elif full[cut] == eos:
            assert seq == full[:cut]
            ended["eos"] += 1
        else:
            assert seq == full[: cut + 1]
            ended["stop"] += 1
    assert ended["stop"] and ended["eos"]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_at_a_time(wide_lm, prefixes, num_beams):
    kwargs = dict(
        num_beams=num_beams, max_new_tokens=10, stop_token_ids=[WIDE_STOP], eos_token_id=WIDE_EOS
    )
    batched = generate(wide_lm, prefixes, **kwargs)
    single = [generate(wide_lm, p[None], **kwargs)[0] for p in prefixes]
    assert batched == single
    assert len({len(s) for s in batched}) > 1  # rows really finished at different steps


def test_greedy_equals_beam_search_with_one_beam(wide_lm, prefixes):
    """generate() decodes num_beams=1 greedily; run the beam-search routine itself with 1 beam."""
    greedy = generate(wide_lm, prefixes, max_new_tokens=12, stop_token_ids=[WIDE_STOP])
    stepper = generation._Stepper(wide_lm, prefixes, use_cache=True)
    with torch.no_grad():
        one_beam = generation._beam_search(
            stepper,
            stepper.start(),
            num_beams=1,
            num_return_sequences=1,
            max_new_tokens=12,
            stop_ids=torch.tensor([WIDE_STOP]),
            length_penalty=1.0,
            early_stopping=False,
        )
    assert one_beam == greedy
    four_beams = generate(
        wide_lm, prefixes, num_beams=4, max_new_tokens=12, stop_token_ids=[WIDE_STOP]
    )
    assert four_beams != greedy


def test_kv_cache_equals_recomputing_the_sequence(wide_lm, prefixes):
    """Greedy with the cache against a plain loop that re-runs the whole sequence each step."""
    max_new = 10
    expected = []
    for prefix in prefixes:
        embeds, seq = prefix[None], []
        for _ in range(max_new):
            with torch.no_grad():
                token = int(wide_lm(inputs_embeds=embeds).logits[0, -1].argmax())
            seq.append(token)
            if token == WIDE_STOP:
                break
            next_embed = wide_lm.get_input_embeddings()(torch.tensor([[token]]))
            embeds = torch.cat((embeds, next_embed), dim=1)
        expected.append(seq)
    assert (
        generate(wide_lm, prefixes, max_new_tokens=max_new, stop_token_ids=[WIDE_STOP]) == expected
    )
    beam = dict(
        num_beams=4, max_new_tokens=max_new, stop_token_ids=[WIDE_STOP], num_return_sequences=4
    )
    assert generate(wide_lm, prefixes, **beam) == generate(
        wide_lm, prefixes, use_cache=False, **beam
    )


def test_buffered_cache_layer_holds_what_hugging_faces_dynamic_layer_holds():
    """Beams spawned, reordered within their input (only generated positions move), grown past
    the planned length and dropped: the buffered layer's keys and values stay equal to those
    of the DynamicLayer it replaces."""
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)
    reference = DynamicLayer()
    reference.update(keys, values)
    buffered = generation._BufferedLayer(keys, values, capacity=6)
    steps = [
        ([0, 1, 2], True),  # nothing generated yet: nothing moves
        ([0, 1, 2], True),  # a scratch buffer for 3 rows
        ([0, 0, 1, 1, 2, 2], False),  # beams spawned (the scratch is then too small)
        ([1, 0, 3, 3, 5, 4], True),  # reordered within each input, one beam copied twice
        ([0, 1, 2, 2, 4, 5], True),
        ([2, 3], False),  # the first and last inputs finished
        ([1, 0], True),
    ]
    for rows, within in steps:
        rows = torch.tensor(rows)
        reference.reorder_cache(rows)
        buffered.reindex(rows, within)
        new_k, new_v = (
            torch.randn(len(rows), 2, 1, 5, generator=g),
            torch.randn(len(rows), 2, 1, 5, generator=g),
        )
        expected = reference.update(new_k, new_v)
        got = buffered.update(new_k, new_v)
        for e, o in zip(expected, got, strict=True):
            assert torch.equal(e, o)
    assert buffered.length == 11 and buffered.capacity >= 11  # grew past the planned 6
    assert buffered.scratch is not None  # the within-input path ran


def test_decoding_keeps_the_kv_cache_in_buffers_and_moves_only_generated_positions(
    wide_lm, prefixes, monkeypatch
):
    """GPT-2's cache is held in buffered layers (the fast path is not silently skipped), and a
    beam step re-indexes within each input, so the prefix positions are never copied."""
    calls = []
    reindex = generation._BufferedLayer.reindex

    def counting(self, rows, within_groups):
        calls.append(within_groups)
        reindex(self, rows, within_groups)

    monkeypatch.setattr(generation._BufferedLayer, "reindex", counting)
    kw = dict(num_beams=3, max_new_tokens=6, stop_token_ids=[WIDE_STOP], num_return_sequences=3)
    for search in generation.SEARCHES:
        calls.clear()
        cached = generate(wide_lm, prefixes, search=search, **kw)
        assert calls.count(True) > calls.count(False) > 0  # spawned once, then within inputs
        assert cached == generate(wide_lm, prefixes, search=search, use_cache=False, **kw)


def test_sampling_is_seeded_and_top_k_one_is_greedy(wide_lm, prefixes):
    kwargs = dict(do_sample=True, max_new_tokens=8, num_return_sequences=4, temperature=1.5)

    def sample(seed: int, **extra) -> list[list[int]]:
        return generate(
            wide_lm, prefixes, generator=torch.Generator().manual_seed(seed), **kwargs, **extra
        )

    first = sample(0)
    assert len(first) == len(prefixes) * 4
    assert first == sample(0)
    assert first != sample(1)
    greedy = generate(wide_lm, prefixes, max_new_tokens=8)
    top1 = sample(0, top_k=1)
    assert top1 == [g for g in greedy for _ in range(4)]


def test_top_k_restricts_the_choices(wide_lm, prefixes):
    with torch.no_grad():
        allowed = wide_lm(inputs_embeds=prefixes).logits[:, -1].topk(2).indices
    out = generate(
        wide_lm,
        prefixes,
        do_sample=True,
        top_k=2,
        temperature=5.0,
        max_new_tokens=1,
        num_return_sequences=16,
        generator=torch.Generator().manual_seed(0),
    )
    firsts = torch.tensor([seq[0] for seq in out]).view(len(prefixes), 16)
    assert (firsts[..., None] == allowed[:, None, :]).any(-1).all()
    assert all(len(set(row.tolist())) == 2 for row in firsts)  # both top-2 tokens get drawn


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=True, num_beams=2),
        dict(temperature=0.5),
        dict(num_return_sequences=2),
        dict(num_beams=2, num_return_sequences=3),
        dict(early_stopping="sometimes", num_beams=2),
        dict(max_new_tokens=0),
    ],
)
def test_bad_arguments_are_rejected(wide_lm, prefixes, kwargs):
    with pytest.raises(ValueError):
        generate(wide_lm, prefixes, **kwargs)


def test_settings_the_decoder_cannot_run_are_named(wide_lm, prefixes):
    from pairfree.errors import PairfreeError

    positions = wide_lm.config.n_positions  # 32; the prefixes take 3
    assert generate(wide_lm, prefixes[:1], max_new_tokens=positions - 2)  # exactly fits
    with pytest.raises(PairfreeError, match=f"need {positions + 1} positions; the decoder has"):
        generate(wide_lm, prefixes[:1], max_new_tokens=positions - 1)
    with pytest.raises(ValueError, match="41 beams for a vocabulary of 40"):
        generate(wide_lm, prefixes[:1], num_beams=41, search="clipcap")


def test_decoding_uses_the_current_cache_api_without_warnings(wide_lm, prefixes):
    """The KV cache goes through the argument name the installed transformers expects, so
    decoding raises no deprecation (FutureWarning) on the way."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy = generate(wide_lm, prefixes, max_new_tokens=6)
        beams = generate(wide_lm, prefixes, num_beams=3, max_new_tokens=6)
    assert greedy == generate(wide_lm, prefixes, max_new_tokens=6, use_cache=False)
    assert beams == generate(wide_lm, prefixes, num_beams=3, max_new_tokens=6, use_cache=False)


@pytest.mark.parametrize("init", [0.3, 0.02])  # peaked, and nearly flat (near-ties)
def test_clipcap_search_reproduces_the_original_generate_beam(init):
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=40, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=32,
                        initializer_range=init)  # fmt: skip
    lm = GPT2LMHeadModel(config).eval()
    prefixes = torch.randn(60, 3, HIDDEN, generator=torch.Generator().manual_seed(2)) * 3 * init
    # a stop token the model often reaches, so that beams finish at different steps
    free = generate(lm, prefixes, num_beams=5, max_new_tokens=9, num_return_sequences=5)
    stop = Counter(t for seq in free for t in seq[1:4]).most_common(1)[0][0]
    rows = []  # LM rows per step: an input whose beams all stopped leaves the batch
    hook = lm.transformer.register_forward_hook(lambda m, a, out: rows.append(len(out[0])))
    ours = generate(lm, prefixes, num_beams=5, max_new_tokens=9, stop_token_ids=[stop],
                    search="clipcap", num_return_sequences=5)  # fmt: skip
    hook.remove()
    assert rows[:2] == [60, 300] and rows[1:] == sorted(rows[1:], reverse=True)
    assert rows[-1] < 300 or init == 0.02  # the peaked LM finishes some inputs early
    hf_style = generate(lm, prefixes, num_beams=5, max_new_tokens=9, stop_token_ids=[stop])
    differ = 0
    for i, prefix in enumerate(prefixes):
        reference = clipcap_original.beam_search(lm, prefix, 5, 9, stop)
        assert ours[5 * i : 5 * i + 5] == reference
        differ += hf_style[i] != reference[0]
    assert differ > 0  # the two searches are not the same algorithm
    greedy = generate(lm, prefixes, max_new_tokens=9, stop_token_ids=[stop, 17], search="clipcap")
    for prefix, seq in zip(prefixes, greedy, strict=True):
        assert seq == clipcap_original.greedy(lm, prefix, 9, {stop, 17})


def test_clipcap_greedy_also_stops_at_space_period():
    from pairfree.captioner import GenerationConfig
    from pairfree.tokenizers import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    assert GenerationConfig(num_beams=1, search="clipcap").stop_token_ids(tokenizer) == [13, 764]
    assert GenerationConfig(num_beams=5, search="clipcap").stop_token_ids(tokenizer) == [13]
    assert GenerationConfig(num_beams=1).stop_token_ids(tokenizer) == [13]
    no_eos = GenerationConfig(stop_at_eos=False).generate_kwargs(tokenizer)
    assert no_eos["eos_token_id"] is None
