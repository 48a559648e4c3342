"""Corpus and image readers, and corpus cleaning."""

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
from pairfree.data.images import (
    IMAGE_EXTENSIONS,
    collect_image_paths,
    image_id_for,
    is_image_file,
    load_image,
)

__all__ = [
    "CORPUS_FORMATS",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Caption",
    "CleaningConfig",
    "ImageItem",
    "clean_caption",
    "clean_captions",
    "collect_image_paths",
    "image_id_for",
    "is_image_file",
    "load_image",
    "read_captions",
    "read_images",
    "read_references",
    "split_sentences",
]
