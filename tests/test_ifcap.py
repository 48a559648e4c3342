"""IFCap: image-like retrieval, the fusion mapper, entity filtering, the retrieval memory at
inference, and the recipe end to end (train, resume, caption, save, ablations, configs)."""

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from entity_prompt_helpers import WORDS, caption_with_cli, tiny_args, train_cli, write_entity_data
from PIL import Image
from resume_helpers import resumed_run_equals_uninterrupted
from tiny_models import save_tiny_clip
from transformers import AutoModelForCausalLM, AutoTokenizer

from pairfree.captioner import CaptionerConfig, Conditioning, PrefixCaptioner
from pairfree.captioner.decoding import CaptionDecoder
from pairfree.captioner.entities import EntityVocabulary, frequent_entities
from pairfree.config import build_config, read_yaml
from pairfree.errors import PairfreeError
from pairfree.features import FeatureStore
from pairfree.pipeline import Captioner
from pairfree.recipes import get_recipe
from pairfree.recipes.ifcap import IFCapConfig, train_ifcap
from pairfree.retrieval import CaptionIndex, image_like_neighbours, nearest_rows


# --------------------------------------------------------------------------- retrieval
def test_image_like_retrieval_excludes_the_caption_and_is_seeded():
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(0))
    plain = image_like_neighbours(x, 5, noise_variance=0.0, generator=torch.Generator())
    unit = F.normalize(x, dim=-1)
    scores = unit @ unit.T
    scores.fill_diagonal_(-2)
    assert torch.equal(plain, scores.topk(5, dim=1).indices)  # the nearest others
    assert not (plain == torch.arange(300)[:, None]).any()

    def noised(seed):
        return image_like_neighbours(x, 5, noise_variance=0.04,
                                     generator=torch.Generator().manual_seed(seed))  # fmt: skip

    a, b, c = noised(1), noised(1), noised(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not (a == torch.arange(300)[:, None]).any()
    assert not torch.equal(a, plain)  # the noise moves the query
    # a duplicate caption elsewhere in the corpus may be found, as in the original
    dup = torch.cat((x, x[:1]))
    assert image_like_neighbours(dup, 1, noise_variance=0.0, generator=torch.Generator())[0] == 300


def test_the_retrieval_noise_has_the_stated_variance():
    """normalize(normalize(t) + eps), eps ~ N(0, v I) in d dimensions: its cosine with t is
    1 / sqrt(1 + d v) up to O(1/sqrt(d)); a unit-variance query would be far off."""
    from pairfree.captioner import condition

    d, v = 512, 0.04
    t = torch.randn(2000, d, generator=torch.Generator().manual_seed(0))
    q = condition(t, Conditioning(noise_variance=v), training=True,
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    cos = (q * F.normalize(t, dim=-1)).sum(-1).mean().item()
    assert abs(cos - (1 + d * v) ** -0.5) < 0.01, cos


def test_the_exact_and_faiss_searches_agree_and_blocks_do_not_change_answers(monkeypatch):
    from pairfree import retrieval

    g = torch.Generator().manual_seed(3)
    db, queries = torch.randn(400, 16, generator=g), torch.randn(50, 16, generator=g)
    exact = nearest_rows(queries, db, 7)
    assert torch.equal(nearest_rows(queries, db, 7, backend="faiss"), exact)
    monkeypatch.setattr(retrieval, "SCORE_BUDGET", 3 * 400)  # 3 queries at a time
    assert CaptionIndex(db).block == 3
    assert CaptionIndex(db).db is db  # the raw rows are held once, not copied normalized
    assert torch.equal(nearest_rows(queries, db, 7), exact)
    with pytest.raises(PairfreeError, match="unknown search backend"):
        CaptionIndex(db, backend="annoy")
    with pytest.raises(PairfreeError, match="1 <= k <= 400"):
        nearest_rows(queries, db, 401)


# --------------------------------------------------------------------------- fusion mapper
@pytest.fixture(scope="module")
def fusion(tiny_gpt2_dir):
    torch.manual_seed(0)
    config = CaptionerConfig(lm=str(tiny_gpt2_dir), embed_dim=16, prefix_length=3,
                             mapper="fusion", mapper_layers=1, clip_length=2)  # fmt: skip
    model = PrefixCaptioner(config, AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir))
    return model, AutoTokenizer.from_pretrained(tiny_gpt2_dir)


def test_the_fusion_mapper_reads_the_retrieved_captions_and_passes_gradients(fusion):
    model, tokenizer = fusion
    cond = torch.randn(4, 1 + 5, 16)
    prefix = model.prefix_embeds(cond)
    assert prefix.shape == (4, 3, 32)
    other = cond.clone()
    other[:, 1:] = torch.randn(4, 5, 16)
    assert not torch.allclose(model.prefix_embeds(other), prefix)  # the retrieved part counts
    ids = torch.tensor(tokenizer(["a dog", "a cat", "a bus", "a box"])["input_ids"])
    model.zero_grad()
    model(cond, ids, torch.ones_like(ids)).loss.backward()
    mapper = model.mapper
    for part in (mapper.rt_linear.weight, mapper.crossatt.layers[0].attn.to_keys_values.weight,
                 mapper.linear.weight, mapper.prefix_const):  # fmt: skip
        assert part.grad is not None and part.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[batch, 1 \+ retrieved, 16\]"):
        model.prefix_embeds(torch.randn(4, 16))


# --------------------------------------------------------------------------- entity filtering
def test_entity_filtering_keeps_words_mentioned_at_least_k_times_most_frequent_first():
    vocabulary = EntityVocabulary(["dog", "frisbee", "park", "bus"])
    retrieved = [
        "A dog catches a frisbee in a park.",
        "Two dogs play with a frisbee.",
        "A man throws a frisbee to his dog.",
        "Men and a dog near a bus.",
        "A park bench.",
    ]
    # dog 4, frisbee 3, park 2, man 2 (a person word counted as itself), bus 1
    assert frequent_entities(retrieved, vocabulary, 2) == ["dog", "frisbee", "park", "man"]
    assert frequent_entities(retrieved, vocabulary, 3) == ["dog", "frisbee"]
    assert frequent_entities(retrieved, vocabulary, 5) == []
    assert vocabulary.mentions("Two dogs and two dogs.") == ["dog", "dog"]  # every mention


def test_entity_filtering_needs_its_words_and_memory():
    with pytest.raises(PairfreeError, match="entity_words"):
        Conditioning(entity_min_count=3)
    with pytest.raises(PairfreeError, match="retrieval_k"):
        Conditioning(retrieval_k=0)
    with pytest.raises(PairfreeError, match="go together"):
        Conditioning(retrieval_memory="m", retrieval_clip="hf:x")
    with pytest.raises(PairfreeError, match="search a retrieval_memory"):
        Conditioning(retrieval_clip="hf:x", retrieval_keys="k")


def test_the_decoder_feeds_each_image_its_nearest_captions_raw_embeddings(
    fusion, tiny_clip_dir, tmp_path
):
    from pairfree.clip import load_clip
    from pairfree.data import Caption
    from pairfree.encoding import encode_captions

    model, tokenizer = fusion
    clip = load_clip(f"hf:{tiny_clip_dir}")
    texts = ["a red dog", "a blue bus", "a dog and a dog", "a green box", "a dog on a bus"]
    encode_captions(clip, [Caption(t, None, "memory.txt", i + 1) for i, t in enumerate(texts)],
                    tmp_path / "memory")  # fmt: skip
    raw = FeatureStore(tmp_path / "memory").tensor()
    spec = Conditioning(retrieval_memory=str(tmp_path / "memory"), retrieval_k=2,
                        retrieval_captions=3, entity_min_count=2,
                        entity_words=["dog", "bus", "box"])  # fmt: skip
    model.config = replace(model.config, embed_dim=raw.shape[1])
    decoder = CaptionDecoder(model, tokenizer, clip, conditioning=spec)
    image = clip.encode_images([Image.new("RGB", (32, 32), (200, 30, 30))])
    order = (F.normalize(image, dim=-1) @ F.normalize(raw, dim=-1).T)[0].argsort(descending=True)
    cond = decoder.conditions(image)
    assert cond.shape == (1, 3, raw.shape[1])
    assert torch.allclose(cond[0, 0], F.normalize(image, dim=-1)[0], atol=1e-6)  # no noise
    assert torch.equal(cond[0, 1:], raw[order[:2]])  # raw, not normalized, nearest first
    nearest = [texts[i] for i in order[:3].tolist()]
    assert decoder.entities(image) == [
        frequent_entities(nearest, EntityVocabulary(["dog", "bus", "box"]), 2)
    ]
    with pytest.raises(PairfreeError, match="no retrieval_memory"):
        CaptionDecoder(model, tokenizer, clip, conditioning=Conditioning())


# --------------------------------------------------------------------------- the recipe
RETRIEVAL = {"retrieval.k": 3, "retrieval.captions": 4, "retrieval.min_count": 2,
             "retrieval.clip": "null"}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_entity_data(tmp_path_factory.mktemp("ifcap-data"))
    (root / "target.txt").write_text("a cat on a box\na dog in a bus\na box\n")
    return root


def ifcap_args(data, clip_dir, gpt2_dir, out, **extra):
    return tiny_args(data, clip_dir, gpt2_dir, out, **{**RETRIEVAL, **extra})


run_cli = train_cli("ifcap")


def test_ifcap_learns_and_a_saved_copy_captions_from_another_folder(
    data, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    args = ifcap_args(data, tiny_clip_dir, tiny_gpt2_dir, tmp_path / "run",
                      **{"train.schedule": "constant", "train.max_steps": 60})  # fmt: skip
    result = train_ifcap(build_config(IFCapConfig, None, args), progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses

    captioner = Captioner.from_pretrained(tmp_path / "run")
    spec = captioner.conditioning
    assert captioner.model.config.mapper == "fusion"
    assert (spec.retrieval_k, spec.retrieval_captions, spec.entity_min_count) == (3, 4, 2)
    assert spec.entity_words == sorted(WORDS) and spec.entity_classes is None
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    embeds = captioner.clip.encode_images([image])
    assert set(captioner.entities(embeds)[0]) <= set(WORDS)
    caption = captioner(image)
    assert caption and "There are" not in caption

    copy = captioner.save_pretrained(tmp_path / "elsewhere" / "copy")
    assert (copy / "retrieval" / "manifest.json").exists()
    (tmp_path / "run").rename(tmp_path / "moved")
    (tmp_path / "features").rename(tmp_path / "features-moved")  # the memory travels too
    again = Captioner.from_pretrained(copy)
    assert again(image) == caption
    assert torch.equal(again.conditions(embeds), captioner.conditions(embeds))

    # the command line captions with the copy too
    assert caption_with_cli(copy, image, tmp_path) == [caption]


@pytest.fixture(scope="module")
def second_clip_dir(tmp_path_factory):
    """Another tiny CLIP, of another width, standing for IFCap's RN50x64."""
    return save_tiny_clip(tmp_path_factory.mktemp("second-clip"), width=24, layers=1,
                          projection=12, seed=1)  # fmt: skip


def test_a_second_clip_retrieves_in_training_and_travels_with_the_captioner(
    data, tiny_clip_dir, second_clip_dir, tiny_gpt2_dir, tmp_path
):
    """IFCap's RN50x64 retrieval: the second CLIP's caption embeddings are the keys of
    image-like retrieval and of test-time retrieval; the fusion module still reads the
    retrieved captions' embeddings under the captioner's CLIP."""
    from safetensors.torch import load_file

    second = f"hf:{second_clip_dir}"
    args = ifcap_args(data, tiny_clip_dir, tiny_gpt2_dir, tmp_path / "run",
                      **{"retrieval.clip": second, "retrieval.noise_variance": 0.0,
                         "train.max_steps": 4})  # fmt: skip
    train_ifcap(build_config(IFCapConfig, None, args), progress=False)
    captioner = Captioner.from_pretrained(tmp_path / "run")
    spec = captioner.conditioning
    assert spec.retrieval_clip == second and captioner.retrieval_clip.embed_dim == 12
    memory, keys = FeatureStore(spec.retrieval_memory), FeatureStore(spec.retrieval_keys)
    assert keys.texts == memory.texts and keys.encoder == captioner.retrieval_clip.name
    assert memory.tensor().shape[1] == 16 and keys.tensor().shape[1] == 12
    (cached,) = tmp_path.glob("features-retrieved-*.safetensors")  # no noise: exact neighbours
    expected = image_like_neighbours(keys.tensor(), 3, noise_variance=0.0,
                                     generator=torch.Generator())  # fmt: skip
    assert torch.equal(load_file(str(cached))["retrieved"], expected)

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    embeds = captioner.clip.encode_images([image])
    searched = captioner.retrieval_inputs([image])
    order = (F.normalize(searched, dim=-1) @ F.normalize(keys.tensor(), dim=-1).T)[0]
    nearest = captioner.retrieve(embeds, retrieval_embeds=searched)
    assert nearest[0].tolist() == order.argsort(descending=True)[:4].tolist()
    cond = captioner.conditions(embeds, nearest)
    assert torch.equal(cond[0, 1:], memory.tensor()[nearest[0, :3]])
    with pytest.raises(PairfreeError, match="retrieval_embeds"):
        captioner.conditions(embeds)  # the captioner's CLIP cannot search these keys
    caption = captioner(image)
    assert caption == captioner.caption_embeddings(embeds, retrieval_embeds=searched)[0]

    copy = captioner.save_pretrained(tmp_path / "elsewhere" / "copy")
    assert f"| retrieval CLIP | `{second}` |" in (copy / "README.md").read_text()
    (tmp_path / "run").rename(tmp_path / "moved")
    for store in tmp_path.glob("features*"):
        store.rename(tmp_path / f"moved-{store.name}")
    again = Captioner.from_pretrained(copy)
    assert (copy / "retrieval-keys" / "manifest.json").exists()
    assert again(image) == caption


def test_image_like_retrieval_is_cached_and_the_noise_is_its_setting(
    data, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    from safetensors.torch import load_file

    def retrieved(variance):
        args = ifcap_args(data, tiny_clip_dir, tiny_gpt2_dir, tmp_path / f"run-{variance}",
                          **{"train.max_steps": 1, "retrieval.noise_variance": variance})  # fmt: skip
        train_ifcap(build_config(IFCapConfig, None, args), progress=False)
        files = sorted((tmp_path).glob("features-retrieved-*.safetensors"))
        return {f.name: load_file(str(f))["retrieved"] for f in files}

    plain = retrieved(0.0)
    assert len(plain) == 1
    rows = next(iter(plain.values()))
    assert rows.shape == (12, 3) and not (rows == torch.arange(12)[:, None]).any()
    both = retrieved(0.5)
    assert len(both) == 2  # another noise, another cached retrieval
    assert retrieved(0.5).keys() == both.keys()  # the same settings reuse it


def test_ifcap_ablations_train_and_caption(data, tiny_clip_dir, tiny_gpt2_dir, tmp_path):
    image = Image.new("RGB", (32, 32), (30, 30, 200))
    for name, extra in {
        "no-fusion": {"fusion": "false"},
        "no-filtering": {"retrieval.min_count": 0},
        "cross-domain": {"retrieval.memory.path": data / "target.txt"},
    }.items():
        args = ifcap_args(data, tiny_clip_dir, tiny_gpt2_dir, tmp_path / name,
                          **{"train.max_steps": 4, **extra})  # fmt: skip
        train_ifcap(build_config(IFCapConfig, None, args), progress=False)
        captioner = Captioner.from_pretrained(tmp_path / name)
        assert isinstance(captioner(image), str)
        spec = captioner.conditioning
        if name == "no-fusion":
            assert captioner.model.config.mapper == "transformer" and spec.entity_min_count == 2
        if name == "no-filtering":
            assert spec.entity_min_count == 0 and spec.entity_classes is not None
        if name == "cross-domain":
            memory = FeatureStore(spec.retrieval_memory)
            assert memory.texts == ["A cat on a box.", "A dog in a bus.", "A box."]


def test_killed_ifcap_run_resumes_to_the_same_weights(data, tiny_clip_dir, tiny_gpt2_dir, tmp_path):
    extra = {"train.max_steps": 8, "train.checkpoint_every": 2}
    resumed_run_equals_uninterrupted(
        run_cli, lambda out: ifcap_args(data, tiny_clip_dir, tiny_gpt2_dir, out, **extra),
        tmp_path, 4)  # fmt: skip


# --------------------------------------------------------------------------- configs
def test_defaults_are_the_originals_coco_settings():
    """boreng0817/IFCap scripts/train_coco.sh, main.py and image_like_retrieval.py."""
    cfg = IFCapConfig()
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.epochs, cfg.train.warmup_steps) == (
        80, 2e-5, 5, 5000
    )  # fmt: skip
    assert asdict(cfg.model) | {"lm": "gpt2"} == asdict(
        CaptionerConfig(mapper="fusion", mapper_layers=8, prefix_length=10, clip_length=10)
    )
    r = cfg.retrieval
    assert (r.k, r.noise_variance, r.captions, r.min_count) == (5, 0.04, 9, 5)
    assert r.clip == "open_clip:RN50x64/openai"  # image_like_retrieval.py --variant
    assert cfg.noise_variance == 0.016 and cfg.hard_prompt and cfg.fusion
    e = cfg.entities
    assert (e.max_entities, e.mask_rate, e.top_k, e.threshold, e.ensemble) == (
        10, 0.4, 3, 0.4, True
    )  # fmt: skip
    assert cfg.generation.num_beams == 5 and cfg.corpus.cleaning.sentence_case
    assert get_recipe("ifcap").config_class is IFCapConfig


# the originals' per-setting values (README's inference commands, scripts/eval_*.sh):
# epochs trained, l captions retrieved, K (0: the classifier), threshold, beams, the target
SETTINGS = {
    "coco": (5, 9, 5, 0.4, 5, None),
    "flickr30k": (15, 7, 3, 0.3, 1, None),
    "coco_to_flickr30k": (5, 7, 3, 0.3, 1, "data/dataset_flickr30k.json"),
    "flickr30k_to_coco": (15, 9, 4, 0.4, 5, "data/dataset_coco.json"),
    "nocaps_coco": (5, 7, 0, 0.2, 5, None),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_paper_configs_resolve_to_the_papers_settings(name):
    data = read_yaml(Path(__file__).parents[1] / "configs" / "ifcap" / f"{name}.yaml")
    assert data.pop("recipe") == "ifcap"
    evaluation = data.pop("evaluation")
    cfg = get_recipe("ifcap").build_config(data)
    defaults = IFCapConfig()
    epochs, captions, min_count, threshold, beams, target = SETTINGS[name]
    trained_on = "flickr30k" if name.startswith("flickr30k") else "coco"
    assert cfg.corpus.path == f"data/dataset_{trained_on}.json"
    assert cfg.corpus.cleaning.sentence_case and cfg.corpus.val_fraction == 0.0
    t, d = cfg.train, defaults.train
    assert t.epochs == epochs
    assert (t.batch_size, t.lr, t.warmup_steps, t.schedule) == (
        d.batch_size, d.lr, d.warmup_steps, d.schedule
    )  # fmt: skip
    assert asdict(cfg.model) == asdict(defaults.model)
    assert cfg.noise_variance == 0.016 and cfg.hard_prompt and cfg.fusion
    r = cfg.retrieval
    assert (r.k, r.noise_variance, r.captions, r.min_count) == (5, 0.04, captions, min_count)
    assert (r.memory.path or None) == target and r.clip == "open_clip:RN50x64/openai"
    e = cfg.entities
    assert (e.threshold, e.top_k, e.temperature, e.ensemble) == (threshold, 3, 0.01, True)
    assert (e.mask_rate, e.max_entities) == (0.4, 10)
    assert e.vocabulary.endswith("vg_objects.txt")
    assert cfg.generation == replace(defaults.generation, num_beams=beams)
    tested_on = "nocaps" if "nocaps" in name else name.split("_to_")[-1]
    assert tested_on in evaluation["dataset"]


def test_bad_retrieval_settings_fail_before_any_model_loads(data, tmp_path):
    for bad, message in (("retrieval.k=0", "retrieval.k"),
                         ("retrieval.noise_variance=-1", "noise_variance"),
                         ("retrieval.index=annoy", "retrieval.index")):  # fmt: skip
        with pytest.raises(PairfreeError, match=message):
            build_config(IFCapConfig, None, [bad])
    base = [f"corpus.path={data / 'corpus.txt'}", "clip=hf:/no/such/clip",
            f"entities.vocabulary={data / 'vocabulary.txt'}",
            f"train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    with pytest.raises(PairfreeError, match="retrieval.memory.path: .*nope.txt does not exist"):
        train_ifcap(build_config(IFCapConfig, None,
                                 [*base, f"retrieval.memory.path={tmp_path / 'nope.txt'}"]))  # fmt: skip
