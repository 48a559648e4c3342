"""Tiny randomly initialized models that fixtures and tests save to disk."""

import torch


def save_tiny_clip(out, *, width: int = 32, layers: int = 2, projection: int = 16, seed: int = 0):
    """A random ViT CLIP (32x32 input, patch 8) with CLIP's real BPE tokenizer, saved to
    ``out`` as a hub one is."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pairfree.tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                 num_attention_heads=2)  # fmt: skip
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=projection,
    )
    CLIPModel(config).save_pretrained(out)
    tokenizer = clip_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
