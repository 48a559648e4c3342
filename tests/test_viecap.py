"""ViECap: entity extraction and masking, the hard prompt, the zero-shot entity classifier,
the prompt-aware prefix captioner, and the recipe end to end (train, resume, caption, save)."""

import json
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from entity_prompt_helpers import WORDS, caption_with_cli, tiny_args, train_cli, write_entity_data
from PIL import Image
from resume_helpers import resumed_run_equals_uninterrupted
from transformers import AutoModelForCausalLM, AutoTokenizer

from pairfree.captioner import CaptionerConfig, PrefixCaptioner
from pairfree.captioner.cross_attention import pad_prompts
from pairfree.captioner.entities import (
    EntityVocabulary,
    classify_entities,
    entity_prompt,
    read_entity_list,
)
from pairfree.config import build_config
from pairfree.data.cleaning import CleaningConfig, clean_caption
from pairfree.errors import BadInputError, PairfreeError
from pairfree.pipeline import Captioner
from pairfree.recipes import get_recipe
from pairfree.recipes.viecap import ViECapConfig, train_viecap
from pairfree.training.entity_prompts import masked_entities
from pairfree.training.text_only import prompted_batch

VOCABULARY = ["dog", "frisbee", "park", "box", "bus", "leaf", "puppy", "traffic light"]


def test_the_hard_prompt_is_the_originals_template():
    assert entity_prompt(["person", "dog"]) == "There are person, dog in image."
    assert entity_prompt(["dog"]) == "There are dog in image."
    assert entity_prompt([]) == "There are something in image."


def test_entities_are_the_captions_known_nouns_singular_with_people_as_person():
    vocabulary = EntityVocabulary(VOCABULARY)
    caption = "Two men and a puppy chase boxes, buses and leaves near a dog in the park."
    assert vocabulary.extract(caption) == ["person", "puppy", "box", "bus", "leaf", "dog", "park"]
    assert vocabulary.extract(caption, limit=3) == ["person", "puppy", "box"]
    assert vocabulary.extract("A woman and a girl with a woman.") == ["person"]
    assert vocabulary.extract("Nothing known here at all.") == []


def test_masking_drops_each_entity_at_its_rate_and_shuffles_the_rest():
    torch.manual_seed(0)
    entities = ["a1", "b2", "c3", "d4", "e5"]
    draws = [masked_entities(entities, 0.4) for _ in range(4000)]
    kept = sum(len(d) for d in draws) / (4000 * len(entities))
    assert abs(kept - 0.6) < 0.01
    firsts = {d[0] for d in draws if len(d) == 5}
    assert firsts == set(entities)  # every order occurs: the prompt does not teach one
    assert masked_entities(entities, 0.0) and all(
        masked_entities(entities, 1.0) == [] for _ in "ab"
    )
    torch.manual_seed(1)
    a = masked_entities(entities, 0.4)
    torch.manual_seed(1)
    assert masked_entities(entities, 0.4) == a  # drawn from the (checkpointed) global RNG


def test_zero_shot_classification_matches_a_hand_computed_example():
    classes = ["dog", "cat", "car"]
    class_embeds = torch.eye(3)
    image = torch.tensor([[1.0, 0.98, 0.0], [0.0, 0.0, 1.0]])
    # image 0: cosines 0.7142, 0.7000, 0 -> softmax(/0.01) = 0.805, 0.195, 0.0000
    chosen = classify_entities(image, class_embeds, classes, top_k=3, threshold=0.15,
                               temperature=0.01)  # fmt: skip
    assert chosen == [["dog", "cat"], ["car"]]
    assert classify_entities(image, class_embeds, classes, top_k=3, threshold=0.4,
                             temperature=0.01) == [["dog"], ["car"]]  # fmt: skip
    assert classify_entities(image, class_embeds, classes, top_k=1, threshold=0.0,
                             temperature=0.01) == [["dog"], ["car"]]  # fmt: skip
    sims = F.normalize(image[:1], dim=-1) @ class_embeds.T
    expected = (sims / 0.01).softmax(-1)[0]
    assert expected[0] > 0.8 and 0.15 < expected[1] < 0.4  # the hand computation above


def test_entity_lists_are_read_from_text_json_and_coco_files(tmp_path):
    (tmp_path / "v.txt").write_text("Dog\n\ncat\ndog\n")
    (tmp_path / "v.json").write_text(json.dumps(["Traffic Light", "bus"]))
    (tmp_path / "coco.json").write_text(json.dumps({"categories": [{"id": 1, "name": "person"}]}))
    assert read_entity_list(tmp_path / "v.txt") == ["dog", "cat"]
    assert read_entity_list(tmp_path / "v.json") == ["traffic light", "bus"]
    assert read_entity_list(tmp_path / "coco.json") == ["person"]
    (tmp_path / "vinvl.json").write_text(json.dumps({"Man": 1, "kite": 2}))
    assert read_entity_list(tmp_path / "vinvl.json") == ["man", "kite"]
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(BadInputError, match="bad.json.*line 1"):
        read_entity_list(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(BadInputError, match="no entity names"):
        read_entity_list(tmp_path / "empty.txt")
    with pytest.raises(PairfreeError, match="does not exist"):
        read_entity_list(tmp_path / "missing.txt")


def test_sentence_case_capitalizes_and_ends_with_a_period_as_the_originals_loader():
    config = CleaningConfig(sentence_case=True)
    assert clean_caption("a dog  on a bench", config) == "A dog on a bench."
    assert clean_caption("Is it a dog?", config) == "Is it a dog?"


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    torch.manual_seed(0)
    config = CaptionerConfig(lm=str(tiny_gpt2_dir), embed_dim=16, prefix_length=3,
                             mapper="transformer", mapper_layers=1, clip_length=3)  # fmt: skip
    model = PrefixCaptioner(config, AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)).eval()
    return model, AutoTokenizer.from_pretrained(tiny_gpt2_dir)


def test_the_prompt_is_read_but_only_the_caption_is_trained_on(gpt2):
    model, tokenizer = gpt2
    captions = [tokenizer("A dog runs.")["input_ids"], tokenizer("Two buses.")["input_ids"]]
    prompts = [tokenizer(entity_prompt(e))["input_ids"] for e in (["dog"], ["bus", "person"])]
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.zeros(2, 4, dtype=torch.long)
    for row, c in enumerate(captions):
        ids[row, : len(c)], mask[row, : len(c)] = torch.tensor(c), 1
    joined, joined_mask, target = prompted_batch(prompts, ids, mask, pad_id=0)
    for row in range(2):
        n, m = len(prompts[row]), len(captions[row])
        assert joined[row, : n + m].tolist() == prompts[row] + captions[row]
        assert target[row].tolist() == [0] * n + [1] * m + [0] * (joined.shape[1] - n - m)
        assert joined_mask[row].sum() == n + m
    cond = torch.randn(2, 16)
    out = model(cond, joined, joined_mask, target)
    # by hand: the mean cross-entropy of the caption tokens, each predicted from what precedes
    logp = out.logits.log_softmax(-1).gather(2, joined[..., None])[..., 0]
    expected = -(logp * target).sum() / target.sum()
    torch.testing.assert_close(out.loss, expected)
    assert not torch.isclose(out.loss, model(cond, joined, joined_mask).loss)


def test_prompts_of_different_lengths_decode_in_a_batch_as_each_alone(gpt2):
    model, tokenizer = gpt2
    prompts = [tokenizer(entity_prompt(e))["input_ids"] for e in ([], ["dog", "bus", "park"])]
    cond = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    ids, mask = pad_prompts(prompts, pad_id=0)
    batched = model.generate(cond, ids, mask, num_beams=3, max_new_tokens=6)
    for row in range(2):
        alone_ids, alone_mask = pad_prompts([prompts[row]], pad_id=0)
        alone = model.generate(cond[row : row + 1], alone_ids, alone_mask, num_beams=3,
                               max_new_tokens=6)  # fmt: skip
        assert alone == [batched[row]]


def test_defaults_are_the_originals_coco_settings():
    """FeiElysia/ViECap scripts/train_coco.sh + main.py's defaults, field by field."""
    cfg = ViECapConfig()
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.epochs, cfg.train.warmup_steps) == (
        80, 2e-5, 15, 5000
    )  # fmt: skip
    assert asdict(cfg.model) | {"lm": "gpt2"} == asdict(
        CaptionerConfig(mapper="transformer", mapper_layers=8, prefix_length=10, clip_length=10)
    )
    assert cfg.noise_variance == 0.016 and cfg.hard_prompt
    e = cfg.entities
    assert (e.max_entities, e.mask_rate, e.top_k, e.threshold, e.temperature) == (
        10, 0.4, 3, 0.4, 0.01
    )  # fmt: skip
    g = cfg.generation
    assert (g.num_beams, g.max_new_tokens, g.search, g.stop, g.also_stop, g.stop_at_eos) == (
        5, 64, "clipcap", ".", (" .",), False
    )  # fmt: skip
    assert cfg.corpus.cleaning.sentence_case
    assert get_recipe("viecap").config_class is ViECapConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_entity_data(tmp_path_factory.mktemp("viecap-data"))


viecap_args = tiny_args
run_cli = train_cli("viecap")


def test_viecap_learns_captions_and_a_saved_copy_captions_elsewhere(
    data, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    args = viecap_args(data, tiny_clip_dir, tiny_gpt2_dir, tmp_path / "run",
                       **{"train.schedule": "constant", "train.max_steps": 60})  # fmt: skip
    result = train_viecap(build_config(ViECapConfig, None, args), progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses

    captioner = Captioner.from_pretrained(tmp_path / "run")
    assert captioner.conditioning.entity_classes is not None
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    entities = captioner.entities(captioner.clip.encode_images([image]))[0]
    assert entities and set(entities) <= set(WORDS)  # threshold 0: the top 3 classes
    caption = captioner(image)
    assert caption and "There are" not in caption  # the prompt is read, not returned

    copy = captioner.save_pretrained(tmp_path / "elsewhere" / "copy")
    assert (copy / "entities" / "manifest.json").exists()
    (tmp_path / "run").rename(tmp_path / "moved")  # the copy reads nothing of the run
    again = Captioner.from_pretrained(copy)
    assert again(image) == caption
    assert again.entities(again.clip.encode_images([image]))[0] == entities

    # the command line captions with it too (its tuple decoding settings survive the resume check)
    assert caption_with_cli(copy, image, tmp_path) == [caption]


def test_without_the_hard_prompt_it_needs_no_vocabulary_and_captions(
    data, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    args = viecap_args(data, tiny_clip_dir, tiny_gpt2_dir, tmp_path / "run",
                       **{"hard_prompt": "false", "entities.vocabulary": "null"})  # fmt: skip
    train_viecap(build_config(ViECapConfig, None, args), progress=False)
    captioner = Captioner.from_pretrained(tmp_path / "run")
    assert captioner.conditioning.entity_classes is None
    assert isinstance(captioner(Image.new("RGB", (32, 32))), str)
    with pytest.raises(PairfreeError, match="entities.vocabulary is not set"):
        train_viecap(build_config(ViECapConfig, None, [*args[:2], "hard_prompt=true",
                                                       "entities.vocabulary=null"]))  # fmt: skip


def test_killed_viecap_run_resumes_to_the_same_weights(
    data, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    extra = {"train.max_steps": 8, "train.checkpoint_every": 2}
    resumed_run_equals_uninterrupted(
        run_cli, lambda out: viecap_args(data, tiny_clip_dir, tiny_gpt2_dir, out, **extra),
        tmp_path, 4)  # fmt: skip


# the originals' per-dataset inference settings (scripts/eval_*.sh): threshold, classes, beams
EVALUATION = {
    "coco": (0.4, "coco_categories", 5),
    "flickr30k": (0.3, "vgcocooiobjects", 1),
    "coco_to_flickr30k": (0.3, "vgcocooiobjects", 1),
    "flickr30k_to_coco": (0.4, "coco_categories", 5),
    "nocaps_coco": (0.2, "vgcocooiobjects", 5),
}


@pytest.mark.parametrize("name", sorted(EVALUATION))
def test_paper_configs_resolve_to_the_papers_settings(name):
    from pathlib import Path

    from pairfree.config import read_yaml

    data = read_yaml(Path(__file__).parents[1] / "configs" / "viecap" / f"{name}.yaml")
    assert data.pop("recipe") == "viecap"
    evaluation = data.pop("evaluation")
    cfg = get_recipe("viecap").build_config(data)
    defaults = ViECapConfig()
    trained_on = "flickr30k" if name.startswith("flickr30k") else "coco"
    assert cfg.corpus.path == f"data/dataset_{trained_on}.json"
    assert cfg.train.epochs == (30 if trained_on == "flickr30k" else 15)  # train_*.sh
    t, d = cfg.train, defaults.train
    assert (t.batch_size, t.lr, t.warmup_steps, t.schedule) == (
        d.batch_size, d.lr, d.warmup_steps, d.schedule
    )  # fmt: skip
    assert asdict(cfg.model) == asdict(defaults.model)
    assert cfg.noise_variance == 0.016 and cfg.hard_prompt
    assert cfg.corpus.cleaning.sentence_case and cfg.corpus.val_fraction == 0.0
    threshold, classes, beams = EVALUATION[name]
    e = cfg.entities
    assert (e.threshold, e.top_k, e.temperature, e.ensemble) == (threshold, 3, 0.01, True)
    assert (e.mask_rate, e.max_entities) == (0.4, 10)
    assert classes in e.classes and e.vocabulary.endswith("vg_objects.txt")
    assert cfg.generation == replace(defaults.generation, num_beams=beams)
    tested_on = "nocaps" if "nocaps" in name else name.split("_to_")[-1]
    assert tested_on in evaluation["dataset"]


def test_bad_entity_settings_and_files_fail_before_any_model_loads(data, tmp_path):
    with pytest.raises(PairfreeError, match="entities.threshold"):
        build_config(ViECapConfig, None, ["entities.threshold=2"])
    with pytest.raises(PairfreeError, match="mask_rate"):
        build_config(ViECapConfig, None, ["entities.mask_rate=-0.1"])
    base = [f"corpus.path={data / 'corpus.txt'}", "clip=hf:/no/such/clip",
            f"train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    missing = tmp_path / "nope.txt"
    with pytest.raises(PairfreeError, match="nope.txt does not exist"):
        train_viecap(build_config(ViECapConfig, None, [*base, f"entities.vocabulary={missing}"]))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(BadInputError, match="bad.json"):
        train_viecap(build_config(ViECapConfig, None, [*base, f"entities.vocabulary={data}/vocabulary.txt",
                                                       f"entities.classes={tmp_path / 'bad.json'}"]))  # fmt: skip
