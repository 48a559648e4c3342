"""The checkpoint card: everything besides the weights that captioning raw images needs.

Saved as ``"card"`` in a checkpoint's ``config.json`` and read back strictly: a missing or
unknown key is an error that names it, never a silent default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pairfree.captioner.conditioning import Conditioning
from pairfree.captioner.generation import GenerationConfig
from pairfree.config import from_dict


@dataclass
class CheckpointCard:
    recipe: str  # the recipe that trained it ("imported" for original checkpoints)
    clip: str  # the CLIP spec whose embeddings it reads
    conditioning: Conditioning = field(default_factory=Conditioning)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    source: str | None = None  # where an imported checkpoint came from

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "card") -> CheckpointCard:
        data = dict(data)
        if isinstance(data.get("conditioning"), dict):
            data["conditioning"] = ADDED_CONDITIONING | data["conditioning"]
        if isinstance(data.get("generation"), dict):
            data["generation"] = ADDED_GENERATION | data["generation"]
        return from_dict(cls, data, where=where, complete=True)


# Keys added after cards were first written, with the value that reproduces what a card
# without them meant; any other missing key is still an error.
ADDED_CONDITIONING = {
    "project_in_training": False,
    "prompt_phrases": None,
    "prompt_topk": 3,
    "entity_classes": None,
    "entity_topk": 3,
    "entity_threshold": 0.4,
    "entity_temperature": 0.01,
    "entity_min_count": 0,
    "entity_words": None,
    "retrieval_memory": None,
    "retrieval_k": 5,
    "retrieval_captions": 9,
    "retrieval_clip": None,
    "retrieval_keys": None,
}
ADDED_GENERATION = {"score_length": "new_tokens", "also_stop": ()}
