"""CLIP backends on tiny random models loaded through the same paths as real checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from pairfree.clip import ClipEncoder, load_clip
from pairfree.errors import PairfreeError

TEXTS = ["a red square", "two blue circles next to a small green triangle", "a cat"]


def _image(seed: int) -> Image.Image:
    """Coarse color blocks, so images differ at the scale tiny towers see (not just noise)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((60, 48), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_image(seed) for seed in range(3)]


# --- Hugging Face backend -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tiny_clip_dir):
    return load_clip("hf:" + str(tiny_clip_dir))


@pytest.fixture(scope="module")
def hf_reference(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(
        tiny_clip_dir
    )


def test_hf_loads_through_registry(hf, tiny_clip_dir):
    assert isinstance(hf, ClipEncoder)
    assert hf.name.startswith(f"hf:{tiny_clip_dir}#")
    assert hf.embed_dim == 16


def test_hf_embeddings_match_clip_forward(hf, hf_reference, images):
    model, processor = hf_reference
    inputs = processor(text=TEXTS, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        image_proj = model.visual_projection(
            model.vision_model(inputs["pixel_values"]).pooler_output
        )
    torch.testing.assert_close(hf.encode_images(images, normalize=True), out.image_embeds)
    torch.testing.assert_close(hf.encode_texts(TEXTS, normalize=True), out.text_embeds)
    torch.testing.assert_close(hf.encode_images(images), image_proj)


def test_hf_batched_equals_one_at_a_time(hf, images):
    for encode in (hf.encode_images, hf.encode_image_grid):
        batched = encode(images, batch_size=2)
        single = torch.cat([encode([image]) for image in images])
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    single_texts = torch.cat([hf.encode_texts([text]) for text in TEXTS])
    torch.testing.assert_close(
        hf.encode_texts(TEXTS, batch_size=3), single_texts, atol=1e-5, rtol=0
    )


def test_hf_normalize_gives_unit_vectors(hf, images):
    for emb in (hf.encode_images(images, normalize=True), hf.encode_texts(TEXTS, normalize=True)):
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)))
    assert not torch.allclose(hf.encode_images(images).norm(dim=-1), torch.ones(len(images)))


def test_hf_different_inputs_give_different_embeddings(hf, images):
    image_emb = hf.encode_images(images[:2])
    text_emb = hf.encode_texts(TEXTS[:2])
    assert (image_emb[0] - image_emb[1]).abs().max() > 1e-3
    assert (text_emb[0] - text_emb[1]).abs().max() > 1e-3


def test_hf_grid_is_post_layernorm_cls_and_patch_tokens(hf, hf_reference, images):
    model, processor = hf_reference
    grid = hf.encode_image_grid(images)
    assert grid.shape == (3, (32 // 8) ** 2 + 1, 32)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.vision_model(pixels).last_hidden_state
        expected = model.vision_model.post_layernorm(hidden)
        # the first token is the pooled one: projected, it is the image embedding
        pooled = model.visual_projection(grid[:, 0])
    torch.testing.assert_close(grid, expected)
    torch.testing.assert_close(pooled, hf.encode_images(images, normalize=False))


def test_hf_truncates_long_texts_to_77_tokens(hf):
    short, long = hf.encode_texts(["a dog " * 60, "a dog " * 200])
    torch.testing.assert_close(short, long)


def test_hf_empty_inputs_and_output_type(hf, images):
    assert hf.encode_images([]).shape == (0, 16)
    assert hf.encode_texts([]).shape == (0, 16)
    assert hf.encode_image_grid([]).shape == (0, 17, 32)
    emb = hf.encode_images(images)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu" and not emb.requires_grad
    # Not an inference-mode tensor: it can feed a trainable layer.
    torch.nn.Linear(16, 2)(emb).sum().backward()
    with pytest.raises(ValueError, match="batch_size"):
        hf.encode_texts(TEXTS, batch_size=0)


# --- open_clip backend ----------------------------------------------------------------------

_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    "pairfree-test-TinyRN": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
        "text_cfg": _TEXT_CFG,
    },
    "pairfree-test-TinyViT": {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": _TEXT_CFG,
    },
}


@dataclass
class Payload:
    """An arbitrary object: a weights-only load must refuse to unpickle it."""

    value: int


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """Register the tiny configs; build each model once and save its state dict."""
    import open_clip

    root = tmp_path_factory.mktemp("open-clip")
    for name, config in TINY_CONFIGS.items():
        (root / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root)
    built = {}
    for name in TINY_CONFIGS:
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    # Stand-in for trained batch norms: non-default statistics and scales.
                    module.weight.uniform_(0.5, 1.5)
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
        model.eval()
        path = root / f"{name}.pt"
        torch.save(model.state_dict(), path)
        built[name] = (model, preprocess, path)
    return built


def _reference(model, preprocess, images, texts, name):
    import open_clip

    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text_emb = model.encode_text(open_clip.get_tokenizer(name)(texts))
    return image_emb, text_emb


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_open_clip_checkpoint_loads_saved_weights(tiny_open_clip, images, name):
    model, preprocess, path = tiny_open_clip[name]
    enc = load_clip(f"open_clip:{name}@{path}")
    assert isinstance(enc, ClipEncoder)
    assert enc.name.startswith(f"open_clip:{name}@{path}#")
    assert enc.embed_dim == 16
    saved = torch.load(path, weights_only=True)
    loaded = enc.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    image_ref, text_ref = _reference(model, preprocess, images, TEXTS, name)
    torch.testing.assert_close(enc.encode_images(images), image_ref)
    torch.testing.assert_close(enc.encode_texts(TEXTS), text_ref)
    # Random towers barely separate images, but far more than assert_close's tolerance.
    assert (image_ref[0] - image_ref[1]).abs().max() > 1e-4


def test_open_clip_resnet_grid_is_feature_map_before_attnpool(tiny_open_clip, images):
    model, preprocess, path = tiny_open_clip["pairfree-test-TinyRN"]
    enc = load_clip(f"open_clip:pairfree-test-TinyRN@{path}")
    grid = enc.encode_image_grid(images, batch_size=2)
    assert grid.shape == (3, (64 // 32) ** 2, 8 * 32)
    visual = model.visual
    with torch.no_grad():
        x = visual.stem(torch.stack([preprocess(im) for im in images]))
        fmap = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    torch.testing.assert_close(grid, fmap.flatten(2).transpose(1, 2))
    assert enc.encode_image_grid([]).shape == (0, 4, 256)


def test_open_clip_vit_grid_is_cls_and_output_tokens(tiny_open_clip, images):
    model, preprocess, path = tiny_open_clip["pairfree-test-TinyViT"]
    enc = load_clip(f"open_clip:pairfree-test-TinyViT@{path}")
    grid = enc.encode_image_grid(images)
    assert grid.shape == (3, (32 // 8) ** 2 + 1, 32)
    model.visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled, tokens = model.visual(torch.stack([preprocess(im) for im in images]))
    finally:
        model.visual.output_tokens = False
    torch.testing.assert_close(grid[:, 1:], tokens)
    # the class token after ln_post, before the projection
    torch.testing.assert_close(grid[:, 0] @ model.visual.proj, pooled)


def test_open_clip_bare_name_is_random_init_and_batching_is_exact(tiny_open_clip, images):
    enc = load_clip("open_clip:pairfree-test-TinyRN")
    assert enc.name.startswith("open_clip:pairfree-test-TinyRN#")
    assert not enc.model.training
    batched = enc.encode_images(images, batch_size=2, normalize=True)
    single = torch.cat([enc.encode_images([im], normalize=True) for im in images])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3))
    texts = enc.encode_texts(TEXTS, batch_size=2)
    assert texts.shape == (3, 16) and texts.dtype == torch.float32
    assert enc.encode_images([]).shape == (0, 16)
    assert enc.encode_texts([]).shape == (0, 16)


def test_open_clip_bad_specs_give_clear_errors(tiny_open_clip, tmp_path):
    with pytest.raises(PairfreeError, match="unknown open_clip model 'NoSuchModel'"):
        load_clip("open_clip:NoSuchModel")
    with pytest.raises(PairfreeError, match="unknown pretrained tag 'nosuchtag'"):
        load_clip("open_clip:pairfree-test-TinyRN/nosuchtag")
    missing = tmp_path / "missing.pt"
    with pytest.raises(PairfreeError, match="checkpoint not found"):
        load_clip(f"open_clip:pairfree-test-TinyRN@{missing}")
    _, _, vit_path = tiny_open_clip["pairfree-test-TinyViT"]
    with pytest.raises(PairfreeError, match=str(vit_path)):
        load_clip(f"open_clip:pairfree-test-TinyRN@{vit_path}")
    with pytest.raises(PairfreeError, match="open_clip backend supports dtypes"):
        load_clip("open_clip:pairfree-test-TinyRN", dtype=torch.float64)


def test_open_clip_checkpoint_is_loaded_weights_only(tiny_open_clip, tmp_path):
    _, _, path = tiny_open_clip["pairfree-test-TinyRN"]
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": torch.load(path, weights_only=True), "extra": Payload(1)}, unsafe)
    with pytest.raises(PairfreeError, match="unsafe.pt"):
        load_clip(f"open_clip:pairfree-test-TinyRN@{unsafe}")


# --- trainable image towers (ICSD fine-tunes one) -------------------------------------------


def _tower_matches_frozen_grid(enc, size: int) -> None:
    """A backend's trainable tower gives ``encode_image_grid``'s features on square images at
    its resolution, learns (gradients reach it), and is a copy (the encoder stays frozen)."""
    from pairfree.clip.vision import tower_pixels

    square = [_image(seed).resize((size, size), Image.Resampling.NEAREST) for seed in range(3)]
    tower = enc.vision_tower().eval()
    assert tower.pixels.image_size == size
    frozen = enc.encode_image_grid(square)
    grid = tower(tower_pixels(tower.pixels, square))
    assert grid.shape == frozen.shape == (3, *tower.grid_shape)
    torch.testing.assert_close(grid.detach(), frozen, rtol=1e-4, atol=1e-4)
    grid.square().mean().backward()
    assert all(p.grad is not None for p in tower.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(1.0)
    torch.testing.assert_close(enc.encode_image_grid(square), frozen)


def test_hf_vision_tower_is_a_trainable_copy_of_the_grid_encoder(hf):
    _tower_matches_frozen_grid(hf, 32)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_open_clip_vision_tower_is_a_trainable_copy_of_the_grid_encoder(tiny_open_clip, name):
    _, _, path = tiny_open_clip[name]
    enc = load_clip(f"open_clip:{name}@{path}")
    _tower_matches_frozen_grid(enc, enc.vision_tower().pixels.image_size)


def test_world_vision_tower_is_a_trainable_copy_of_the_grid_encoder():
    _tower_matches_frozen_grid(load_clip("world:builtin"), 64)


def test_fine_tuning_keeps_a_towers_batch_norm_statistics():
    from pairfree.clip.vision import tower_pixels

    tower = load_clip("world:builtin").vision_tower().train()
    norms = [m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and tower.training and not any(m.training for m in norms)
    before = {k: v.clone() for k, v in tower.state_dict().items() if "running" in k}
    tower(tower_pixels(tower.pixels, [_image(0).resize((64, 64))])).sum().backward()
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in before.items())
    assert all(m.weight.grad is not None for m in norms)  # their scales still learn


# --- a tower copy at another resolution (ICSD trains CLIP ViT-B/32 at 384 px) ---------------


def _bicubic_weights(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of a 1-D bicubic resize written out: Keys' cubic kernel with
    a = -0.75, output pixel i read at input coordinate (i + 0.5) * n_in / n_out - 0.5 (pixel
    centres, not aligned corners), samples past an edge taken from the edge."""

    def cubic(x: float, a: float = -0.75) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        source = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(source))
        for k in range(base - 1, base + 3):
            weights[i, min(max(k, 0), n_in - 1)] += cubic(source - k)
    return weights


@pytest.mark.parametrize(("n", "side"), [(7, 12), (3, 5), (4, 2)])
def test_resized_position_embeddings_follow_the_originals_bicubic_resize(n, side):
    """ICSD's 384-px CLIP: the class token's embedding kept in front, the n x n grid's
    (row-major) resized bicubically without aligned corners, flattened row-major again."""
    from pairfree.clip.vision import resize_positions

    positions = torch.randn(1 + n * n, 3, generator=torch.Generator().manual_seed(n))
    out = resize_positions(positions, side)
    assert out.shape == (1 + side * side, 3)
    torch.testing.assert_close(out[0], positions[0])
    w = _bicubic_weights(n, side)
    grid = positions[1:].double().reshape(n, n, 3)
    expected = torch.einsum("ia,jb,abd->ijd", w, w, grid).reshape(side * side, 3)
    torch.testing.assert_close(out[1:].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(resize_positions(positions, n), positions)


def test_hf_vision_tower_at_another_size_reads_it_through_resized_positions(hf, tiny_clip_dir):
    from transformers import CLIPVisionModel

    from pairfree.clip.vision import resize_positions, tower_pixels

    native = hf.vision_tower().eval()
    assert hf.vision_tower(32).state_dict().keys() == native.state_dict().keys()
    square = [_image(seed).resize((32, 32), Image.Resampling.NEAREST) for seed in range(2)]
    pixels = tower_pixels(native.pixels, square)
    torch.testing.assert_close(hf.vision_tower(32).eval()(pixels), native(pixels))

    tower = hf.vision_tower(48).eval()  # patch 8: a 6 x 6 grid instead of 4 x 4
    assert tower.pixels.image_size == 48 and tower.grid_shape == (37, 32)
    reference = CLIPVisionModel.from_pretrained(tiny_clip_dir).state_dict()
    table = next(v for k, v in reference.items() if k.endswith("position_embedding.weight"))
    resized = tower.vision.embeddings.position_embedding.weight
    torch.testing.assert_close(resized.detach(), resize_positions(table, 6))
    grid = tower(tower_pixels(tower.pixels, [_image(0), _image(1)]))
    assert grid.shape == (2, 37, 32)
    grid.square().mean().backward()
    assert resized.requires_grad and resized.grad is not None  # its own parameters, trained
    # the frozen encoder keeps its native table
    assert hf.model.vision_model.embeddings.position_embedding.weight.shape == (17, 32)
    assert hf.encode_image_grid([_image(0)]).shape == (1, 17, 32)
    with pytest.raises(PairfreeError, match="not a multiple of its 8-px patches"):
        hf.vision_tower(50)


def test_open_clip_vit_tower_at_another_size_and_cnn_towers_that_cannot_change(tiny_open_clip):
    from pairfree.clip.vision import resize_positions, tower_pixels

    _, _, path = tiny_open_clip["pairfree-test-TinyViT"]
    enc = load_clip(f"open_clip:pairfree-test-TinyViT@{path}")
    tower = enc.vision_tower(40).eval()
    assert tower.pixels.image_size == 40 and tower.grid_shape == (26, 32)
    torch.testing.assert_close(
        tower.visual.positional_embedding.detach(),
        resize_positions(enc.model.visual.positional_embedding, 5),
    )
    assert tower(tower_pixels(tower.pixels, [_image(0)])).shape == (1, 26, 32)
    square = [_image(0).resize((32, 32), Image.Resampling.NEAREST)]
    torch.testing.assert_close(
        enc.vision_tower(32).eval()(tower_pixels(enc.vision_tower().pixels, square)),
        enc.encode_image_grid(square),
    )
    _, _, rn_path = tiny_open_clip["pairfree-test-TinyRN"]
    with pytest.raises(PairfreeError, match="reads 64-px images only"):
        load_clip(f"open_clip:pairfree-test-TinyRN@{rn_path}").vision_tower(128)
    world = load_clip("world:builtin")
    assert world.vision_tower(None).pixels.image_size == world.vision_tower(64).pixels.image_size
    with pytest.raises(PairfreeError, match="world:builtin.*reads 64-px images only"):
        world.vision_tower(384)


def _one_pass_matches_two(enc, first_layer: torch.nn.Module) -> None:
    """``encode_images_and_grid`` gives ``encode_images`` and ``encode_image_grid`` of the same
    images, running the image tower once per batch (counted at its first layer)."""
    images = [_image(seed) for seed in range(3)]
    calls = []
    hook = first_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        embeds, grid = enc.encode_images_and_grid(images, batch_size=2)
    finally:
        hook.remove()
    assert len(calls) == 2  # batches of 2 and 1
    torch.testing.assert_close(embeds, enc.encode_images(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grid, enc.encode_image_grid(images), rtol=1e-5, atol=1e-5)
    empty = enc.encode_images_and_grid([])
    assert empty[0].shape == (0, enc.embed_dim) and empty[1].shape == (0, *enc.grid_shape)
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode_images_and_grid(images, batch_size=0)


def test_hf_embeddings_and_grid_come_from_one_pass(hf):
    _one_pass_matches_two(hf, hf.model.vision_model.embeddings)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_open_clip_embeddings_and_grid_come_from_one_pass(tiny_open_clip, name):
    _, _, path = tiny_open_clip[name]
    enc = load_clip(f"open_clip:{name}@{path}")
    _one_pass_matches_two(enc, enc.model.visual.conv1)


def test_world_embeddings_and_grid_come_from_one_pass():
    enc = load_clip("world:builtin")
    _one_pass_matches_two(enc, enc.model.image_tower.features)


# --- grid tokens in the joint space (PCM-Net's mix-up) --------------------------------------


def test_hf_grid_embeddings_are_the_head_applied_to_each_token(hf, images):
    grid = hf.encode_image_grid(images)
    dense = hf.embed_grid(grid)
    assert dense.shape == (3, grid.shape[1], hf.embed_dim) and hf.grid_class_tokens == 1
    torch.testing.assert_close(dense[:, 0], hf.encode_images(images))  # the class token's
    assert hf.embed_grid(grid[:0]).shape == (0, grid.shape[1], hf.embed_dim)


def test_open_clip_grid_embeddings_are_the_heads_reading_of_each_token(tiny_open_clip, images):
    import copy

    vit = load_clip(f"open_clip:pairfree-test-TinyViT@{tiny_open_clip['pairfree-test-TinyViT'][2]}")
    assert vit.grid_class_tokens == 1
    torch.testing.assert_close(vit.embed_grid(vit.encode_image_grid(images))[:, 0],
                               vit.encode_images(images))  # fmt: skip
    rn = load_clip(f"open_clip:pairfree-test-TinyRN@{tiny_open_clip['pairfree-test-TinyRN'][2]}")
    assert rn.grid_class_tokens == 0
    # DenseCLIP: a map of one repeated token, without positions, pools to that token's reading
    rn.model = copy.deepcopy(rn.model)
    pool = rn.model.visual.attnpool
    with torch.no_grad():
        pool.positional_embedding.zero_()
    token = torch.randn(1, 1, 256)
    grid = token.expand(1, 4, 256)
    with torch.no_grad():
        pooled = pool(grid.transpose(1, 2).reshape(1, 256, 2, 2))
    dense = rn.embed_grid(grid)
    assert dense.shape == (1, 4, rn.embed_dim)
    torch.testing.assert_close(dense, pooled[:, None].expand_as(dense), rtol=1e-4, atol=1e-5)


def test_world_grid_embeddings_are_the_pools_reading_of_each_token():
    import copy

    enc = load_clip("world:builtin")
    model = copy.deepcopy(enc.model)
    pool = model.image_tower.pool
    with torch.no_grad():
        pool.position.zero_()
    grid = torch.randn(1, 1, enc.grid_shape[1]).expand(1, enc.grid_shape[0], -1)
    with torch.no_grad():
        content = pool(grid)
        expected = model._place(content, torch.zeros_like(content), 1.0)
        dense = model.embed_grid(grid)
    torch.testing.assert_close(dense, expected[:, None].expand_as(dense), rtol=1e-4, atol=1e-5)
    assert enc.grid_class_tokens == 0
    assert enc.embed_grid(enc.encode_image_grid([Image.new("RGB", (64, 64))])).shape == (
        1, enc.grid_shape[0], enc.embed_dim
    )  # fmt: skip
