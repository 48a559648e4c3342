"""Entity-aware hard prompts (ViECap, IFCap): "There are {e1}, {e2} in image." after the soft
prompt.

In training the entities are the nouns of the caption itself that an object vocabulary knows,
each dropped with the masking rate; at inference they are the classes a zero-shot CLIP
classifier finds in the image (softmax of cosine / temperature over "A photo of a {class}.",
the top k above a threshold), or (IFCap's entity filtering) the vocabulary words the image's
nearest corpus captions mention at least K times.

Where pairfree differs from ViECap's code, on purpose:

- **Entity extraction** matches the caption's words against the object vocabulary after a
  rule-based singularization (``boxes`` -> ``box``, ``men`` -> ``man``) instead of NLTK's
  part-of-speech tagger and WordNet lemmatizer, whose data cannot be installed offline. The
  original keeps NN/NNS words that are in its (single-word) Visual Genome vocabulary, so the
  two differ only where a vocabulary word is used as another part of speech in a caption.
- **Entity filtering** (IFCap) counts the mentions of the vocabulary's words (and person
  words) in the retrieved captions; the original counts every NN/NNS noun its tagger finds,
  so a frequent noun outside the vocabulary can enter its prompt and not this one.
- **Entity order.** The original deduplicates entities with ``set()``, so their order in the
  prompt is arbitrary; here each training step shuffles them with the run's seeded RNG.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from pairfree.errors import BadInputError, PairfreeError

PERSON = "person"
# the words ViECap folds into "person" before filtering
PERSON_WORDS = frozenset(
    [
        "people",
        "person",
        "man",
        "men",
        "woman",
        "women",
        "adult",
        "boy",
        "girl",
        "kid",
        "children",
        "child",
        "baby",
        "guy",
        "player",
        "male",
        "female",
        "worker",
    ]
)
NO_ENTITY = "something"
IRREGULAR_PLURALS = {"men": "man", "women": "woman", "people": "person", "children": "child",
                     "feet": "foot", "teeth": "tooth", "mice": "mouse", "geese": "goose"}  # fmt: skip
# the zero-shot classifier's text (ViECap's retrieval_categories), and the templates of its
# prompt ensemble (ViECap's generating_prompt_ensemble, after CLIP's)
CLASS_TEMPLATE = "A photo of {article} {entity}."
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
WORD = re.compile(r"[a-z]+")


def entity_prompt(entities: Sequence[str]) -> str:
    """ViECap's hard prompt text: "There are person, dog in image." ("There are something in
    image." without entities)."""
    return f"There are {', '.join(entities) if entities else NO_ENTITY} in image."


def singular_forms(word: str) -> list[str]:
    """The word and the singulars it may be a plural of, most likely first."""
    forms = [word]
    if word in IRREGULAR_PLURALS:
        forms.append(IRREGULAR_PLURALS[word])
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 4:
        forms += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        forms.append(word[:-1])
    return forms


class EntityVocabulary:
    """The single-word object vocabulary training entities are filtered by (ViECap: Visual
    Genome's objects); person words always count, as "person"."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = frozenset(w.strip().lower() for w in words if len(w.strip()) > 1)
        if not self.words:
            raise PairfreeError("the entity vocabulary is empty")

    def extract(self, caption: str, limit: int = 10) -> list[str]:
        """The caption's entities in order of first mention, each once, at most ``limit``."""
        found: list[str] = []
        for word in WORD.findall(caption.lower()):
            entity = self._entity(word)
            if entity is not None and entity not in found:
                found.append(entity)
                if len(found) == limit:
                    break
        return found

    def mentions(self, caption: str) -> list[str]:
        """Every mention of a vocabulary word (singular; a person word as its own singular,
        not folded into "person"): what IFCap's entity filtering counts, as its tagger and
        lemmatizer count nouns."""
        found = []
        for word in WORD.findall(caption.lower()):
            forms = singular_forms(word)
            known = [f for f in forms if f in self.words or f in PERSON_WORDS]
            if known:
                found.append(IRREGULAR_PLURALS.get(word, known[0]))
        return found

    def _entity(self, word: str) -> str | None:
        for form in singular_forms(word):
            if form in PERSON_WORDS:
                return PERSON
            if form in self.words:
                return form
        return None


def frequent_entities(
    captions: Sequence[str], vocabulary: EntityVocabulary, min_count: int
) -> list[str]:
    """IFCap's frequency-based entity filtering: the words mentioned at least ``min_count``
    times in ``captions`` (an image's retrieved captions), most frequent first (ties: the
    later word first, as the original sorts (count, word) pairs in reverse)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for word in vocabulary.mentions(caption):
            counts[word] = counts.get(word, 0) + 1
    ranked = sorted(((n, w) for w, n in counts.items()), reverse=True)
    return [w for n, w in ranked if n >= min_count]


def read_entity_list(path: str | Path) -> list[str]:
    """Entity names from a text file (one per line), a JSON list of names, a JSON object of
    name -> index (VinVL's class files) or a COCO instances file (its ``categories``);
    lower-cased, in file order, each once."""
    path = Path(path)
    if not path.is_file():
        raise PairfreeError(f"entity vocabulary {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadInputError(path, f"not valid JSON (line {err.lineno}): {err.msg}") from err
        if isinstance(data, dict) and isinstance(data.get("categories"), list):
            data = [c.get("name") if isinstance(c, dict) else None for c in data["categories"]]
        elif isinstance(data, dict):  # VinVL's class -> index files
            data = list(data)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise BadInputError(path, "expected a JSON list of entity names, an object of "
                                "name -> index, or a COCO instances file")  # fmt: skip
        names = data
    else:
        names = text.splitlines()
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if not names:
        raise BadInputError(path, "no entity names in it")
    return names


def class_texts(entity: str, ensemble: bool) -> list[str]:
    """The texts a class is read as: ViECap's "A photo of a/an {entity}.", or the seven
    templates of its prompt ensemble."""
    if ensemble:
        return [t.format(entity) for t in ENSEMBLE_TEMPLATES]
    article = "an" if entity[:1].lower() in "aeiou" else "a"
    return [CLASS_TEMPLATE.format(article=article, entity=entity)]


def ensemble_mean(embeddings: torch.Tensor) -> torch.Tensor:
    """[T, d] embeddings of one class's texts -> its [d] unit embedding (the mean of the
    normalized template embeddings, renormalized)."""
    return F.normalize(F.normalize(embeddings.float(), dim=-1).mean(0), dim=-1)


def classify_entities(
    image_embeds: torch.Tensor,
    class_embeds: torch.Tensor,
    classes: Sequence[str],
    *,
    top_k: int,
    threshold: float,
    temperature: float,
) -> list[list[str]]:
    """Each image's classes: softmax(cos / temperature) over the classes, the ``top_k`` most
    probable, stopping at the first below ``threshold`` (ViECap's top_k_categories)."""
    if len(classes) != len(class_embeds):
        raise PairfreeError(f"{len(classes)} entity classes but {len(class_embeds)} embeddings")
    sims = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(class_embeds.float(), dim=-1).T
    probs = (sims / temperature).softmax(dim=-1)
    top, index = probs.topk(min(top_k, len(classes)), dim=-1)
    return [
        [classes[j] for p, j in zip(row_p, row_i, strict=True) if p >= threshold]
        for row_p, row_i in zip(top.tolist(), index.tolist(), strict=True)
    ]
