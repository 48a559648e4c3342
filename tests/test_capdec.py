import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from pairfree.captioner import Conditioning, condition, modality_offset
from pairfree.captioner.conditioning import uniform_ball
from pairfree.data import mix_open_text, open_text_sentences, randomize_gender
from pairfree.errors import PairfreeError


def inject_noise(x, variance, *, kind="gaussian", normalize=True, offset=None, generator=None):
    """CapDec's training-side conditioning, through the one conditioning function."""
    spec = Conditioning(
        normalize=normalize,
        noise_variance=variance,
        noise_kind=kind,
        offset=offset.tolist() if offset is not None else None,
        offset_mode="train" if offset is not None else "none",
    )
    return condition(x, spec, training=True, generator=generator)


def test_gaussian_noise_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4000, 64, generator=g) * 3
    x = inject_noise(t, 0.016, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(4000))  # normalized after
    # undo the final normalization: the pre-normalization vector is normalize(t) + eps
    noisy = F.normalize(t, dim=-1) + torch.randn(
        4000, 64, generator=torch.Generator().manual_seed(1)
    ) * math.sqrt(0.016)
    torch.testing.assert_close(x, F.normalize(noisy, dim=-1))
    eps = noisy - F.normalize(t, dim=-1)
    assert abs(eps.var(dim=0).mean().item() - 0.016) < 0.001  # per-dimension variance


def test_uniform_ball_noise_stays_inside_the_radius_and_fills_it():
    r = math.sqrt(0.016)
    ball = uniform_ball(torch.Size([20000, 8]), r, torch.Generator().manual_seed(0))
    norms = ball.norm(dim=-1)
    assert norms.max() <= r + 1e-6
    # uniform in volume: P(|x| < r/2) = (1/2)^d
    assert abs((norms < r / 2).float().mean().item() - 0.5**8) < 0.003
    x = inject_noise(torch.randn(10, 8), 0.016, kind="uniform")
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(10))


def test_no_normalize_and_zero_variance():
    t = torch.randn(5, 8) * 4
    assert torch.equal(inject_noise(t, 0.0, normalize=False), t)
    torch.testing.assert_close(inject_noise(t, 0.0), F.normalize(t, dim=-1))
    with pytest.raises(PairfreeError, match="noise kind"):
        inject_noise(t, 0.1, kind="laplace")


def test_offset_is_added_where_configured():
    t = torch.randn(6, 8)
    offset = torch.full((8,), 0.3)
    x = inject_noise(t, 0.0, offset=offset)
    torch.testing.assert_close(x, F.normalize(F.normalize(t, dim=-1) + offset, dim=-1))
    images, texts = torch.randn(50, 8) + 2, torch.randn(50, 8) - 2
    gap = modality_offset(images, texts)
    torch.testing.assert_close(
        gap, F.normalize(images, dim=-1).mean(0) - F.normalize(texts, dim=-1).mean(0)
    )


MALE = ["a man riding a horse", "a boy and his father"]
FEMALE = ["a woman holding her bag", "two girls playing"]
NEUTRAL = ["a dog on a bench"]
# CapDec's gender_terms_map, word by word (embeddings_generator.py): every word must be known
CAPDEC_MALE = [
    "boy",
    "brother",
    "dad",
    "husband",
    "man",
    "groom",
    "male",
    "guy",
    "men",
    "males",
    "boys",
    "guys",
    "dads",
    "dude",
    "policeman",
    "policemen",
    "boyfriend",
    "father",
    "son",
    "fireman",
    "he",
    "actor",
    "gentleman",
    "mans",
    "his",
    "actors",
]
CAPDEC_FEMALE = [
    "girl",
    "sister",
    "mom",
    "wife",
    "woman",
    "bride",
    "female",
    "lady",
    "women",
    "girls",
    "ladies",
    "females",
    "moms",
    "actress",
    "nun",
    "policewoman",
    "girlfriend",
    "mother",
    "daughter",
    "she",
    "actress",
    "lady",
    "women",
    "her",
    "actresses",
]  # its "fire woman" is two words, which its word-by-word matching never met


def capdec_randomize(caption: str, rng: random.Random) -> str:
    """CapDec's change_gender_randomly re-derived: each gendered word independently becomes
    the male or the female form with probability 1/2 (our pairs in place of its columns)."""
    from pairfree.data.editing import FEMALE_TO_MALE, MALE_TO_FEMALE

    words = []
    for word in caption.split(" "):
        male = word if word in MALE_TO_FEMALE else FEMALE_TO_MALE.get(word)
        if male is None:
            words.append(word)
        else:
            words.append([male, MALE_TO_FEMALE[male]][rng.randint(0, 1)])
    return " ".join(words)


def test_gender_words_flip_independently_with_probability_p_in_qualifying_captions():
    from pairfree.data.editing import FEMALE_TO_MALE, MALE_TO_FEMALE

    assert set(CAPDEC_MALE) <= MALE_TO_FEMALE.keys()
    assert set(CAPDEC_FEMALE) <= FEMALE_TO_MALE.keys()
    texts = MALE * 500 + FEMALE * 500 + NEUTRAL * 10
    both = randomize_gender(texts, "both", p=0.5, seed=0)
    assert both[2000:] == NEUTRAL * 10
    # "a boy and his father": three gendered words, each flipped on its own
    variants = Counter(both[1:1000:2])
    assert len(variants) == 8 and all(40 < n < 90 for n in variants.values())
    assert "a girl and his mother" in variants  # per word, not per caption
    # the same distribution as CapDec's per-word coin (a flip with p = 1/2 = a random form)
    rng = random.Random(1)
    reference = Counter(capdec_randomize(MALE[1], rng) for _ in range(500))
    assert set(reference) == set(variants)

    male_only = randomize_gender(texts, "male-only", p=1.0)
    assert male_only[:2] == ["a woman riding a horse", "a girl and her mother"]
    assert male_only[1000:] == texts[1000:]
    mixed = randomize_gender(["a man and a woman"], "female-only", p=1.0)
    assert mixed == ["a woman and a man"]  # qualifies by its female word; every word flips
    assert randomize_gender(texts, "none") == texts
    assert randomize_gender(["A Man walks."], "both", p=1.0) == ["A Woman walks."]
    with pytest.raises(PairfreeError):
        randomize_gender(texts, "sideways")


def test_open_text_keeps_sentences_of_4_to_20_words(tmp_path):
    long = " ".join(["Word"] + ["word"] * 20)
    (tmp_path / "book.txt").write_text(
        f"Too short. This sentence has exactly six words. {long}. A dog sat on the old red mat today.\n"
    )
    got = open_text_sentences(tmp_path / "book.txt")
    assert all(4 <= len(s.split()) <= 20 for s in got)
    assert any(s.startswith("This sentence has exactly six words") for s in got)
    assert not any(s.startswith("Too short") for s in got) and not any(
        "word word" in s for s in got
    )
    mixed = mix_open_text(["c1", "c2", "c3", "c4"], got * 5, ratio=0.5, seed=0)
    assert mixed[:4] == ["c1", "c2", "c3", "c4"] and len(mixed) == 6


def test_one_conditioning_spec_drives_training_and_inference():
    """Noise and a train-mode offset touch text embeddings in training only; an
    inference-mode offset is subtracted from image embeddings at inference only."""
    x, offset = torch.randn(4, 8), torch.full((8,), 0.25)
    unit = F.normalize(x, dim=-1)
    train_mode = Conditioning(noise_variance=0.0, offset=offset.tolist(), offset_mode="train")
    torch.testing.assert_close(
        condition(x, train_mode, training=True), F.normalize(unit + offset, dim=-1)
    )
    torch.testing.assert_close(condition(x, train_mode, training=False), unit)
    at_inference = Conditioning(offset=offset.tolist(), offset_mode="inference")
    # CapDec's predictions_runner subtracts the offset from the normalized image embedding
    # and feeds the result as it is
    torch.testing.assert_close(condition(x, at_inference, training=False), unit - offset)
    torch.testing.assert_close(condition(x, at_inference, training=True), unit)
    noisy = Conditioning(noise_variance=0.5)
    assert not torch.allclose(condition(x, noisy, training=True), unit)
    assert torch.equal(condition(x, noisy, training=False), unit)  # no noise at inference
    raw = Conditioning(normalize=False)
    assert torch.equal(condition(x, raw, training=False), x)
    assert torch.equal(condition(x, raw, training=True), x)
    # with noise, CapDec renormalizes even when it was told not to normalize
    raw_noisy = Conditioning(normalize=False, noise_variance=0.016)
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * math.sqrt(0.016)
    torch.testing.assert_close(
        condition(x, raw_noisy, training=True, generator=g), F.normalize(x + eps, dim=-1)
    )


def test_conditioning_rejects_what_it_cannot_apply():
    with pytest.raises(PairfreeError, match="needs the offset"):
        Conditioning(offset_mode="train")
    with pytest.raises(PairfreeError, match="offset mode"):
        Conditioning(offset=[0.0], offset_mode="sideways")
    with pytest.raises(PairfreeError, match="memory"):
        condition(torch.randn(2, 4), Conditioning(project_to="store"), training=False)
