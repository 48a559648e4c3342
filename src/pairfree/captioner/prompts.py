"""Hard prompts: the object phrases of a vocabulary closest to an image in CLIP space.

SaCap prompts its decoder with the image's top-3 object phrases by cosine between the image
embedding and each phrase's text embedding, joined by "," without spaces. Its code strips a
phrase's final "." when it builds training prompts but not at inference; here both sides strip
it, so a decoder sees at inference the prompts it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pairfree.errors import PairfreeError

JOINER = ","


def top_phrases(
    image_embeds: torch.Tensor, phrase_embeds: torch.Tensor, phrases: Sequence[str], k: int
) -> list[list[str]]:
    """For each image, the ``k`` phrases of highest cosine, best first (ties: vocabulary
    order)."""
    if len(phrases) != len(phrase_embeds):
        raise PairfreeError(f"{len(phrases)} phrases but {len(phrase_embeds)} embeddings")
    if not phrases:
        raise PairfreeError("the hard-prompt vocabulary is empty")
    sims = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(phrase_embeds.float(), dim=-1).T
    order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
    return [[phrases[j] for j in row] for row in order.tolist()]


def hard_prompt(phrases: Sequence[str]) -> str:
    """The prompt text of an image's phrases."""
    return JOINER.join(p.strip().removesuffix(".").strip() for p in phrases)
