"""The cross-attention captioner: decoding over padded prompts and grid features, against
brute force, Hugging Face's generate, one row at a time and the training forward pass."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pairfree.captioner.cross_attention import (
    CrossAttentionCaptioner,
    CrossAttentionConfig,
    pad_prompts,
)

HIDDEN, GRID_WIDTH, GRID_TOKENS, EMBED = 16, 8, 5, 6
SEPARATOR = [3]
PAD = 0


def captioner(vocab: int, *, prefix_length: int = 2, seed: int = 0) -> CrossAttentionCaptioner:
    """A random GPT-2 with cross-attention and peaked next-token distributions."""
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64,
                   initializer_range=0.3, add_cross_attention=True, bos_token_id=0,
                   eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    )  # fmt: skip
    config = CrossAttentionConfig(lm="tiny", embed_dim=EMBED, grid_width=GRID_WIDTH,
                                  prefix_length=prefix_length, soft_prompt_hidden=12)  # fmt: skip
    model = CrossAttentionCaptioner(config, lm, separator_ids=SEPARATOR).eval()
    with torch.no_grad():  # large enough that the soft prompt and grid shape the output
        for name, p in model.named_parameters():
            if not name.startswith("lm."):
                p.mul_(3.0)
    return model


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, EMBED, generator=g), torch.randn(n, GRID_TOKENS, GRID_WIDTH, generator=g)


PROMPTS = [[5, 9], [], [7, 4, 11], [8], [6, 6, 6, 6]]


def decode(model, cond, grid, prompts, **options) -> list[list[int]]:
    ids, mask = pad_prompts(prompts, max_tokens=20, pad_id=PAD)
    return model.generate(cond, grid, ids, mask, **options)


@pytest.fixture(scope="module")
def wide() -> CrossAttentionCaptioner:
    return captioner(40)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("prefix_length", [2, 0])
def test_batched_padded_prompts_decode_as_each_row_alone(num_beams, prefix_length):
    model = captioner(40, prefix_length=prefix_length)
    cond, grid = inputs(len(PROMPTS))
    options = dict(num_beams=num_beams, max_new_tokens=8, stop_token_ids=[31], eos_token_id=12)
    batched = decode(model, cond, grid, PROMPTS, **options)
    alone = [
        decode(model, cond[i : i + 1], grid[i : i + 1], [p], **options)[0]
        for i, p in enumerate(PROMPTS)
    ]
    assert batched == alone
    assert len({tuple(x) for x in batched}) > 1  # the rows decode differently
    recomputed = decode(model, cond, grid, PROMPTS, use_cache=False, **options)
    assert recomputed == batched


def test_decoding_reads_the_grid_and_the_soft_prompt(wide):
    cond, grid = inputs(4)
    options = dict(num_beams=1, max_new_tokens=8)
    base = decode(wide, cond, grid, [[5]] * 4, **options)
    assert decode(wide, cond, grid.flip(0), [[5]] * 4, **options) != base
    assert decode(wide, cond.flip(0), grid, [[5]] * 4, **options) != base


def test_beam_search_finds_the_brute_force_best_under_the_training_forward():
    vocab, max_len = 6, 4
    model = captioner(vocab)
    cond, grid = inputs(2, seed=1)
    prompts = [[4, 1], [2]]
    out = decode(model, cond, grid, prompts, num_beams=vocab**max_len, max_new_tokens=max_len,
                 stop_token_ids=[2], num_return_sequences=3)  # fmt: skip
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=max_len)))
    for i, prompt in enumerate(prompts):
        ids, mask = pad_prompts([prompt] * len(seqs), max_tokens=20, pad_id=PAD)
        with torch.no_grad():  # score every sequence with the training forward pass
            logits = model(cond[i].expand(len(seqs), -1), grid[i].expand(len(seqs), -1, -1),
                           ids, mask, seqs, torch.ones_like(seqs)).logits  # fmt: skip
        cumulative = logits.log_softmax(-1).gather(-1, seqs[..., None]).squeeze(-1).cumsum(1)
        scored = {}
        for seq, cum in zip(seqs.tolist(), cumulative, strict=True):
            length = seq.index(2) + 1 if 2 in seq else max_len
            scored[tuple(seq[:length])] = float(cum[length - 1]) / length
        best = sorted(scored, key=lambda h: -scored[h])[:3]
        assert out[3 * i : 3 * i + 3] == [list(h) for h in best]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_matches_hugging_face_generate(wide, num_beams):
    cond, grid = inputs(3, seed=2)
    for i, prompt in enumerate([[5, 9], [7], [8, 1, 2]]):
        ours = decode(wide, cond[i : i + 1], grid[i : i + 1], [prompt], num_beams=num_beams,
                      max_new_tokens=8, stop_token_ids=[31], eos_token_id=12)[0]  # fmt: skip
        ids, mask = pad_prompts([prompt], max_tokens=20, pad_id=PAD)
        with torch.no_grad():
            prefix, _ = wide.prompt_embeds(cond[i : i + 1], ids, mask)
            hf = wide.lm.generate(inputs_embeds=prefix, num_beams=num_beams, max_new_tokens=8,
                                  eos_token_id=[31, 12], pad_token_id=12, do_sample=False,
                                  **wide.context(grid[i : i + 1]))[0].tolist()  # fmt: skip
        while hf and hf[-1] == 12:  # HF keeps (and pads with) the end token
            hf.pop()
        assert ours == hf


def test_loss_is_the_caption_tokens_cross_entropy_only(wide):
    cond, grid = inputs(3, seed=3)
    prompts = [[5, 9], [], [7, 4, 11]]
    captions = torch.tensor([[20, 21, 22, 1], [23, 24, 1, 0], [25, 1, 0, 0]])
    caption_mask = (torch.arange(4) < torch.tensor([[4], [3], [2]])).long()
    ids, mask = pad_prompts(prompts, max_tokens=20, pad_id=PAD)
    out = wide(cond, grid, ids, mask, captions, caption_mask)
    # by hand: each row alone, unpadded, the caption tokens scored after the separator
    nll, count = 0.0, 0
    for i, prompt in enumerate(prompts):
        n = int(caption_mask[i].sum())
        soft = wide.soft_prompt(cond[i : i + 1])
        tokens = torch.tensor([prompt + SEPARATOR + captions[i, :n].tolist()])
        embeds = torch.cat((soft, wide.lm.get_input_embeddings()(tokens)), dim=1)
        logits = wide.lm(inputs_embeds=embeds, **wide.context(grid[i : i + 1])).logits[0]
        start = soft.shape[1] + len(prompt) + len(SEPARATOR) - 1  # predicts the first token
        lp = logits[start : start + n].log_softmax(-1).gather(1, captions[i, :n, None])
        nll, count = nll - lp.sum(), count + n
    torch.testing.assert_close(out.loss, nll / count)
    # the rows' caption logits do not depend on the padding other rows bring
    alone = wide(cond[1:2], grid[1:2], *pad_prompts([[]], max_tokens=20, pad_id=PAD),
                 captions[1:2, :3], caption_mask[1:2, :3])  # fmt: skip
    torch.testing.assert_close(out.logits[1, :3], alone.logits[0], rtol=1e-4, atol=1e-4)


def test_prompts_are_cut_and_left_padded():
    ids, mask = pad_prompts([[1, 2, 3, 4], [5], []], max_tokens=3, pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 5], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_bad_inputs_are_refused(wide):
    cond, grid = inputs(2)
    ids, mask = pad_prompts([[5], [6]], max_tokens=20, pad_id=PAD)
    with pytest.raises(ValueError, match="grid features must be"):
        wide.generate(cond, grid[..., :4], ids, mask)
    with pytest.raises(ValueError, match="soft prompt needs"):
        wide.generate(None, grid, ids, mask)
    with pytest.raises(ValueError, match="no cross-attention"):
        CrossAttentionCaptioner(CrossAttentionConfig(lm="x"), GPT2LMHeadModel(GPT2Config(
            n_embd=8, n_layer=1, n_head=2)), separator_ids=[25])  # fmt: skip


# ------------------------------------------------------------- checkpoints and the pipeline
def text_store(clip, texts, out):
    from pairfree.data.corpus import Caption
    from pairfree.encoding import encode_captions
    from pairfree.job import Job

    captions = [Caption(t, None, "test", i + 1) for i, t in enumerate(texts)]
    encode_captions(clip, captions, out, job=Job(progress=False))
    return str(out)


def test_cross_attention_checkpoint_captions_like_the_model_it_saved(tiny_gpt2_dir, tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from pairfree.captioner import CheckpointCard, Conditioning, GenerationConfig
    from pairfree.captioner.checkpoint import save_captioner
    from pairfree.captioner.cross_attention import load_cross_attention_lm
    from pairfree.cli import main
    from pairfree.clip import load_clip
    from pairfree.pipeline import Captioner

    lm = load_cross_attention_lm(str(tiny_gpt2_dir))  # pretrained weights + new cross-attention
    plain = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    assert torch.equal(lm.transformer.wte.weight, plain.transformer.wte.weight)
    assert any("crossattention" in name for name, _ in lm.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    clip = load_clip("world:builtin")
    width = clip.grid_shape[1]
    config = CrossAttentionConfig(lm=str(tiny_gpt2_dir), embed_dim=clip.embed_dim,
                                  grid_width=width, prefix_length=2, soft_prompt_hidden=16)  # fmt: skip
    torch.manual_seed(0)
    model = CrossAttentionCaptioner(config, lm, separator_ids=tokenizer(":")["input_ids"]).eval()
    memory = text_store(clip, ["a red circle", "a blue square on the left", "a green star"],
                        tmp_path / "memory")  # fmt: skip
    phrases = text_store(clip, ["red circle.", "blue square", "green star", "white heart"],
                         tmp_path / "phrases")  # fmt: skip
    conditioning = Conditioning(project_to=memory, project_in_training=True, prompt_phrases=phrases)
    generation = GenerationConfig(num_beams=2, max_new_tokens=6, stop=".")
    card = CheckpointCard("sacap", "world:builtin", conditioning, generation)
    save_captioner(model, tokenizer, tmp_path / "ckpt", card)

    images = []
    for i, color in enumerate(["red", "blue", "white"]):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 64), color).save(images[-1])
    fresh = Captioner(model, tokenizer, clip, conditioning=conditioning, generation=generation)
    expected = fresh.caption(images)
    loaded = Captioner.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.model, CrossAttentionCaptioner) and loaded.needs_grid
    assert loaded.caption(images) == expected
    assert loaded.caption(images[1:2]) == expected[1:2]  # one at a time = batched
    prompts = loaded.hard_prompts(clip.encode_images([Image.open(p) for p in images]))
    assert all(len(p.split(",")) == 3 and "." not in p for p in prompts)
    # `pairfree caption` does not care which family it loads
    out = tmp_path / "captions.json"
    assert main(["caption", str(tmp_path / "ckpt"), *map(str, images), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    import json

    assert [r["caption"] for r in json.loads(out.read_text())] == expected


def test_the_original_prompt_length_is_what_sacap_and_icsd_beam_search_counted():
    """SaCap's decoder input: 10 soft-prompt placeholder ids, the hard prompt padded to 20
    and ":"; ICSD's (BLIP's): ``[DEC] a picture of``, no soft or hard prompt."""
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=HIDDEN, n_layer=1, n_head=2,
                                    add_cross_attention=True))  # fmt: skip
    sacap = CrossAttentionCaptioner(CrossAttentionConfig(lm="tiny", grid_width=HIDDEN),
                                    lm, separator_ids=SEPARATOR)  # fmt: skip
    assert sacap.original_prompt_length(hard_prompt=True) == 31
    assert sacap.original_prompt_length(hard_prompt=False) == 11  # the ablation: no hard prompt
    icsd = CrossAttentionCaptioner(CrossAttentionConfig(lm="tiny", grid_width=HIDDEN,
                                                        prefix_length=0),
                                   lm, separator_ids=[1, 2, 3, 4])  # fmt: skip
    assert icsd.original_prompt_length(hard_prompt=False) == 4


@pytest.mark.parametrize("phrases", [True, False])
def test_the_pipeline_counts_the_original_prompt_ids(tiny_gpt2_dir, tmp_path, monkeypatch,
                                                     phrases):  # fmt: skip
    from PIL import Image
    from transformers import AutoTokenizer

    from pairfree.captioner import Conditioning, GenerationConfig
    from pairfree.captioner.cross_attention import load_cross_attention_lm
    from pairfree.clip import load_clip
    from pairfree.pipeline import Captioner

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    clip = load_clip("world:builtin")
    config = CrossAttentionConfig(lm=str(tiny_gpt2_dir), embed_dim=clip.embed_dim,
                                  grid_width=clip.grid_shape[1], prefix_length=2,
                                  soft_prompt_hidden=16)  # fmt: skip
    model = CrossAttentionCaptioner(config, load_cross_attention_lm(str(tiny_gpt2_dir)),
                                    separator_ids=tokenizer(":")["input_ids"]).eval()  # fmt: skip
    store = (
        text_store(clip, ["red circle", "blue square"], tmp_path / "phrases") if phrases else None
    )
    generation = GenerationConfig(num_beams=2, max_new_tokens=4, score_length="with_prompt")
    captioner = Captioner(model, tokenizer, clip, conditioning=Conditioning(prompt_phrases=store),
                          generation=generation)  # fmt: skip
    seen = []
    original = CrossAttentionCaptioner.generate
    monkeypatch.setattr(
        CrossAttentionCaptioner,
        "generate",
        lambda self, *a, **kw: (
            seen.append((kw["prompt_lengths"], kw["score_length"])) or original(self, *a, **kw)
        ),
    )
    images = [Image.new("RGB", (64, 64), color) for color in ("red", "blue", "white")]
    assert len(captioner.caption(images)) == 3
    assert seen == [([2 + 20 + 1 if phrases else 2 + 1] * 3, "with_prompt")]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_bert_decoder_with_cross_attention_decodes_padded_rows_as_alone(num_beams):
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    lm = BertLMHeadModel(
        BertConfig(vocab_size=40, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=64, initializer_range=0.3,
                   is_decoder=True, add_cross_attention=True, pad_token_id=0)
    ).eval()  # fmt: skip
    config = CrossAttentionConfig(lm="bert", embed_dim=EMBED, grid_width=GRID_WIDTH,
                                  prefix_length=0)  # fmt: skip
    model = CrossAttentionCaptioner(config, lm, separator_ids=SEPARATOR).eval()
    cond, grid = inputs(len(PROMPTS))
    options = dict(num_beams=num_beams, max_new_tokens=6, stop_token_ids=[31], eos_token_id=12)
    batched = decode(model, None, grid, PROMPTS, **options)
    alone = [decode(model, None, grid[i : i + 1], [p], **options)[0] for i, p in enumerate(PROMPTS)]
    assert batched == alone
    assert decode(model, None, grid, PROMPTS, use_cache=False, **options) == batched


def test_hard_prompt_is_the_top_k_phrases_by_cosine():
    from pairfree.captioner.prompts import hard_prompt, top_phrases

    phrases = ["a dog.", "a cat", "a tree", "a car"]
    embeds = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    image = torch.tensor([[2.0, 0.1], [0.0, -1.0]])  # scale does not matter: cosine
    chosen = top_phrases(image, embeds, phrases, 3)
    assert chosen == [["a dog.", "a tree", "a cat"], ["a dog.", "a car", "a tree"]]
    assert hard_prompt(chosen[0]) == "a dog,a tree,a cat"
    tied = top_phrases(torch.tensor([[1.0, 0.0]]), torch.ones(4, 2), phrases, 2)
    assert tied == [["a dog.", "a cat"]]  # ties keep the vocabulary order


def test_build_cross_attention_leaves_its_config_alone_and_is_seeded(tiny_gpt2_dir):
    from pairfree.captioner.cross_attention import CrossAttentionConfig, build_cross_attention

    config = CrossAttentionConfig(lm=str(tiny_gpt2_dir), prefix_length=2, soft_prompt_hidden=8)
    before = CrossAttentionConfig(**vars(config))
    a, tokenizer = build_cross_attention(config, embed_dim=6, grid_width=5, seed=3)
    b, _ = build_cross_attention(config, embed_dim=6, grid_width=5, seed=3, tokenizer=tokenizer)
    c, _ = build_cross_attention(config, embed_dim=6, grid_width=5, seed=4, tokenizer=tokenizer)
    assert config == before  # nothing written into the caller's config
    assert (a.config.embed_dim, a.config.grid_width, a.config.image_encoder) == (6, 5, False)
    same = [
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    ]
    other = [
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    ]
    assert all(same) and not all(other)  # the new layers come from the seed
