"""Corpus and image readers, image sources, corpus cleaning and editing."""

from pairfree.data.cleaning import CleaningConfig, clean_caption, clean_captions, split_sentences
from pairfree.data.corpus import (
    CORPUS_FORMATS,
    SPLITS,
    Caption,
    ImageItem,
    read_captions,
    read_images,
    read_references,
)
from pairfree.data.editing import (
    GENDER_MODES,
    mix_open_text,
    open_text_sentences,
    randomize_gender,
)
from pairfree.data.images import (
    IMAGE_EXTENSIONS,
    collect_image_paths,
    image_id_for,
    is_image_file,
    load_image,
)
from pairfree.data.sources import dataset_images, image_sources, is_dataset_file, load_images

__all__ = [
    "CORPUS_FORMATS",
    "GENDER_MODES",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Caption",
    "CleaningConfig",
    "ImageItem",
    "clean_caption",
    "clean_captions",
    "collect_image_paths",
    "dataset_images",
    "image_id_for",
    "image_sources",
    "is_dataset_file",
    "is_image_file",
    "load_image",
    "load_images",
    "mix_open_text",
    "open_text_sentences",
    "read_captions",
    "read_images",
    "read_references",
    "randomize_gender",
    "split_sentences",
]
