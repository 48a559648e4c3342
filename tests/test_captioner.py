"""The prefix captioner: loss, frozen LM, overfitting, checkpoints, importing ClipCap originals."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from pairfree.captioner import (
    CaptionerConfig,
    CheckpointCard,
    Conditioning,
    GenerationConfig,
    PrefixCaptioner,
    import_clipcap_state_dict,
    load_captioner,
    load_original_checkpoint,
    save_captioner,
)
from pairfree.errors import BadInputError, PairfreeError

CARD = CheckpointCard("capdec", "hf:none")

EMBED_DIM = 16
CAPTIONS = [
    "a red circle.",
    "two blue squares above a tree.",
    "a small green cross on the left.",
    "a dog.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_dir):
    return AutoTokenizer.from_pretrained(tiny_gpt2_dir)


def make_captioner(lm_dir, **overrides) -> PrefixCaptioner:
    torch.manual_seed(0)
    kwargs = dict(lm=str(lm_dir), embed_dim=EMBED_DIM, prefix_length=4)
    return PrefixCaptioner(CaptionerConfig(**{**kwargs, **overrides}))


def batch(tokenizer, captions=CAPTIONS):
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    condition = torch.randn(len(captions), EMBED_DIM, generator=torch.Generator().manual_seed(1))
    return condition, enc.input_ids, enc.attention_mask


def test_loss_is_caption_cross_entropy_ignoring_prefix_and_padding(tiny_gpt2_dir, tokenizer):
    model = make_captioner(tiny_gpt2_dir).eval()
    condition, ids, mask = batch(tokenizer)
    assert (mask == 0).any()
    out = model(condition, ids, mask)
    k = model.config.prefix_length
    assert out.logits.shape == (*ids.shape, model.lm.config.vocab_size)

    with torch.no_grad():  # manual: no mask (causality keeps padding out of real positions)
        embeds = torch.cat((model.prefix_embeds(condition), model.lm.transformer.wte(ids)), dim=1)
        logits = model.lm(inputs_embeds=embeds).logits[:, k - 1 : -1]
    real = mask.bool()
    manual = F.cross_entropy(logits[real], ids[real])
    torch.testing.assert_close(out.loss, manual)

    repadded = ids.masked_fill(~real, 123)
    again = model(condition, repadded, mask)
    torch.testing.assert_close(again.loss, out.loss)
    torch.testing.assert_close(again.logits[real], out.logits[real])


def test_sequence_log_probs(tiny_gpt2_dir, tokenizer):
    model = make_captioner(tiny_gpt2_dir).eval()
    condition, ids, mask = batch(tokenizer)
    per_token = model.sequence_log_probs(condition, ids, mask)
    total = model.sequence_log_probs(condition, ids, mask, length_normalize=False)
    assert per_token.requires_grad and per_token.shape == (len(CAPTIONS),)
    torch.testing.assert_close(per_token, total / mask.sum(1))
    for i in range(len(CAPTIONS)):
        n = int(mask[i].sum())
        alone = model(condition[i : i + 1], ids[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(per_token[i], -alone.loss)


def test_only_prefix_freezes_the_lm(tiny_gpt2_dir, tokenizer):
    model = make_captioner(tiny_gpt2_dir, only_prefix=True)
    model.train()
    assert model.mapper.training and not model.lm.training
    assert not any(p.requires_grad for p in model.lm.parameters())
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    mapper_before = {k: v.clone() for k, v in model.mapper.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model(*batch(tokenizer)).loss.backward()
    optimizer.step()
    assert all(torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())
    assert all(not torch.equal(v, mapper_before[k]) for k, v in model.mapper.state_dict().items())


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_overfits_four_pairs_and_greedy_reproduces_them(tiny_gpt2_dir, tokenizer, mapper):
    model = make_captioner(tiny_gpt2_dir, mapper=mapper, mapper_layers=2, clip_length=2)
    condition, ids, mask = batch(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        loss = model(condition, ids, mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model(condition, ids, mask).loss.item() < 0.05
    period = tokenizer.encode(".")
    generated = model.generate(condition, max_new_tokens=20, stop_token_ids=period)
    assert tokenizer.batch_decode(generated) == CAPTIONS


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_save_load_round_trip(tiny_gpt2_dir, tokenizer, tmp_path, mapper):
    model = make_captioner(tiny_gpt2_dir, mapper=mapper, mapper_layers=2).eval()
    condition, ids, mask = batch(tokenizer)
    out_dir = tmp_path / "ckpt"
    first = CheckpointCard("capdec", "hf:one", Conditioning(noise_variance=0.016))
    second = CheckpointCard("capdec", "hf:two", Conditioning(normalize=False), GenerationConfig(3))
    save_captioner(model, tokenizer, out_dir, first)
    save_captioner(model, tokenizer, out_dir, second)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # replaced, no temp dirs left

    loaded, loaded_tokenizer, card = load_captioner(out_dir)
    assert card == second
    assert loaded.config == model.config and not loaded.training
    assert loaded_tokenizer(CAPTIONS[1]).input_ids == tokenizer(CAPTIONS[1]).input_ids
    with torch.no_grad():
        assert torch.equal(loaded(condition, ids, mask).logits, model(condition, ids, mask).logits)
    kwargs = dict(num_beams=3, max_new_tokens=8, stop_token_ids=tokenizer.encode("."))
    assert loaded.generate(condition, **kwargs) == model.generate(condition, **kwargs)


def test_load_rejects_bad_checkpoints(tiny_gpt2_dir, tokenizer, tmp_path):
    with pytest.raises(BadInputError, match="config.json"):
        load_captioner(tmp_path)
    model = make_captioner(tiny_gpt2_dir)
    save_captioner(model, tokenizer, tmp_path / "mlp", CARD)
    other = tmp_path / "other"
    save_captioner(make_captioner(tiny_gpt2_dir, prefix_length=2), tokenizer, other, CARD)
    (other / "model.safetensors").write_bytes((tmp_path / "mlp" / "model.safetensors").read_bytes())
    with pytest.raises(BadInputError, match="model.safetensors"):
        load_captioner(other)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda card: card["conditioning"].pop("normalize"), "missing .*conditioning.normalize"),
        (lambda card: card["conditioning"].update(normalise=False), "unknown .*normalise"),
        (lambda card: card.pop("clip"), "missing config key card.clip"),
        (lambda card: card["generation"].update(beams=3), "unknown .*generation.beams"),
    ],
)
def test_checkpoint_card_is_read_strictly(tiny_gpt2_dir, tokenizer, tmp_path, edit, message):
    """A missing or misspelled card key is an error naming it, never a silent default."""
    save_captioner(make_captioner(tiny_gpt2_dir), tokenizer, tmp_path, CARD)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["card"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match=message) as caught:
        load_captioner(tmp_path)
    assert "config.json" in str(caught.value)


def test_cards_written_before_the_prompt_keys_load_as_they_meant(
    tiny_gpt2_dir, tokenizer, tmp_path
):
    save_captioner(make_captioner(tiny_gpt2_dir), tokenizer, tmp_path, CARD)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("project_in_training", "prompt_phrases", "prompt_topk"):
        config["card"]["conditioning"].pop(key)
    config["card"]["generation"].pop("score_length")  # they scored beams by the new tokens
    config.pop("family")  # and the family: every checkpoint was a prefix captioner then
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _, card = load_captioner(tmp_path)
    assert isinstance(model, PrefixCaptioner)
    assert card.conditioning == CARD.conditioning and card.conditioning.prompt_phrases is None
    assert card.generation == CARD.generation and card.generation.score_length == "new_tokens"


def test_projection_applies_in_training_only_when_asked():
    from pairfree.captioner.conditioning import Conditioning, condition

    memory = torch.nn.functional.normalize(
        torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    inference_only = Conditioning(project_to="memory")
    both = Conditioning(project_to="memory", project_in_training=True)
    projected = condition(x, both, training=False, memory=memory)
    torch.testing.assert_close(condition(x, both, training=True, memory=memory), projected)
    torch.testing.assert_close(
        condition(x, inference_only, training=False, memory=memory), projected
    )
    plain = condition(x, inference_only, training=True, memory=memory)
    torch.testing.assert_close(plain, torch.nn.functional.normalize(x, dim=-1))
    with pytest.raises(PairfreeError, match="project_in_training needs project_to"):
        Conditioning(project_in_training=True)


# A reference of the original ClipCap module layout (rmokady/CLIP_prefix_caption, train.py),
# written independently of pairfree's mappers, to check that imported weights compute the same.


class RefMLP(nn.Module):
    def __init__(self, d: int, hidden: int, out: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self, x):
        return self.model(x)


class RefMultiHeadAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.num_heads
        queries = self.to_queries(x).reshape(b, n, h, c // h)
        keys_values = self.to_keys_values(x).reshape(b, n, 2, h, c // h)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = (torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale).softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c))


class RefMlpTransformer(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class RefTransformerLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RefMultiHeadAttention(dim, 8)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlpTransformer(dim, int(dim * 2.0))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefTransformer(nn.Module):
    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(RefTransformerLayer(dim) for _ in range(num_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class RefTransformerMapper(nn.Module):
    def __init__(self, d: int, dim: int, prefix_length: int, clip_length: int, layers: int):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = RefTransformer(dim, layers)
        self.linear = nn.Linear(d, clip_length * dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim))

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length :]


class RefClipCaptionModel(nn.Module):
    def __init__(self, mapper: str, prefix_length: int, clip_length: int = 3, layers: int = 2):
        super().__init__()
        self.prefix_length = prefix_length
        config = GPT2Config(vocab_size=100, n_positions=32, n_embd=128, n_layer=2, n_head=2)
        self.gpt = GPT2LMHeadModel(config)
        h = config.n_embd
        if mapper == "mlp":
            self.clip_project = RefMLP(EMBED_DIM, h * prefix_length // 2, h * prefix_length)
        else:
            self.clip_project = RefTransformerMapper(
                EMBED_DIM, h, prefix_length, clip_length, layers
            )
        with torch.no_grad():  # move LayerNorms and biases off their init values
            for p in self.clip_project.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def forward(self, tokens, prefix, mask):
        embedding_text = self.gpt.transformer.wte(tokens)
        prefix_projections = self.clip_project(prefix).view(-1, self.prefix_length, 128)
        embedding_cat = torch.cat((prefix_projections, embedding_text), dim=1)
        return self.gpt(inputs_embeds=embedding_cat, attention_mask=mask).logits


REF_LM = GPT2Config(vocab_size=100, n_positions=32, n_embd=128, n_layer=2, n_head=2)


def original_checkpoint(mapper: str):
    torch.manual_seed(0)
    reference = RefClipCaptionModel(mapper, prefix_length=5).eval()
    state_dict = reference.state_dict()
    # transformers < 4.3x also saved GPT-2's causal-mask buffers
    state_dict["gpt.transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    state_dict["gpt.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    tokens = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    prefix = torch.randn(3, EMBED_DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full_mask = torch.cat((torch.ones(3, 5), mask), dim=1)
        expected = reference(tokens, prefix, full_mask)[:, 4:-1]
    return state_dict, (prefix, tokens, mask), expected


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_imported_original_checkpoint_matches_the_reference(mapper, tmp_path):
    state_dict, inputs, expected = original_checkpoint(mapper)
    model = import_clipcap_state_dict(state_dict, mapper=mapper, prefix_length=5, lm_config=REF_LM)
    assert model.config.mapper == mapper and model.config.embed_dim == EMBED_DIM
    if mapper == "transformer":
        assert (model.config.clip_length, model.config.mapper_layers) == (3, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs).logits, expected, atol=1e-5, rtol=1e-5)

    path = tmp_path / "coco_prefix-009.pt"
    torch.save(state_dict, path)
    loaded = load_original_checkpoint(path, lm_config=REF_LM)  # the mapper's sizes inferred
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_importer_refuses_to_guess_the_head_count(tmp_path):
    """No tensor shows GPT-2's head count: a non-released size needs the LM's config, and a
    wrong one would give wrong logits without any error."""
    state_dict, inputs, expected = original_checkpoint("mlp")
    path = tmp_path / "small.pt"
    torch.save(state_dict, path)
    with pytest.raises(BadInputError, match="small.pt.*head count.*--lm-config"):
        load_original_checkpoint(path)
    wrong = GPT2Config(vocab_size=100, n_positions=32, n_embd=128, n_layer=2, n_head=4)
    with torch.no_grad():
        logits = load_original_checkpoint(path, lm_config=wrong)(*inputs).logits
    assert not torch.allclose(logits, expected, atol=1e-3)
    # the released sizes are known: GPT-2 small is 12 layers of width 768, 12 heads
    from pairfree.captioner.convert import _gpt2_config

    meta = {"transformer.wte.weight": torch.empty(50257, 768, device="meta"),
            "transformer.wpe.weight": torch.empty(1024, 768, device="meta"),
            "transformer.h.0.mlp.c_fc.weight": torch.empty(768, 3072, device="meta")}  # fmt: skip
    meta.update({f"transformer.h.{i}.ln_1.weight": torch.empty(768) for i in range(12)})
    config = _gpt2_config(meta)
    assert (config.n_head, config.n_layer, config.n_inner) == (12, 12, 3072)


class Trap:
    """Unpickled, it would create ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class NotATensor:
    pass


def test_original_checkpoint_errors_name_the_file(tmp_path):
    state_dict, _, _ = original_checkpoint("mlp")
    path = tmp_path / "coco_prefix-009.pt"
    torch.save(state_dict, path)
    with pytest.raises(BadInputError, match="coco_prefix-009.pt.*prefix_length=40"):
        load_original_checkpoint(path, prefix_length=40, lm_config=REF_LM)
    with pytest.raises(BadInputError, match="transformer"):
        load_original_checkpoint(path, mapper="transformer", lm_config=REF_LM)
    state_dict["gpt.lm_head.weight"] = state_dict["gpt.lm_head.weight"] + 1.0
    untied = tmp_path / "untied.pt"
    torch.save(state_dict, untied)
    with pytest.raises(BadInputError, match="untied.pt.*tied weights differ"):
        load_original_checkpoint(untied, lm_config=REF_LM)
    pickled = tmp_path / "arbitrary.pt"
    torch.save({"model": NotATensor()}, pickled)
    with pytest.raises(BadInputError, match="arbitrary.pt: not tensors saved by torch.save"):
        load_original_checkpoint(pickled)
    trap = tmp_path / "trap.pt"  # unpickling it would create a file
    trap.write_bytes(pickle.dumps({"x": Trap(str(tmp_path / "ran"))}))
    with pytest.raises(BadInputError, match="nothing in it was run"):
        load_original_checkpoint(trap)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty.pt: empty or cut short"):
        load_original_checkpoint(tmp_path / "empty.pt")
