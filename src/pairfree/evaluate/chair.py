"""CHAIR, the object-hallucination metrics of image captioning.

Rohrbach, Hendricks, Burns, Darrell and Saenko, "Object Hallucination in Image Captioning",
EMNLP 2018 (arXiv:1809.02156). Over the 80 MSCOCO object categories, an object a caption
mentions is *hallucinated* when it is not among the image's ground-truth objects, and

- CHAIR-i = hallucinated object mentions / all object mentions,
- CHAIR-s = captions with at least one hallucinated mention / all captions,

both x100 here; lower is better. What this module implements, exactly:

- **Mentions.** A caption is lowercased and split into words (letters only; a hyphen splits,
  "hot-dog" reads "hot dog"). Phrases of :data:`COCO_SYNONYMS` are matched longest first at
  each word (so "hot dog" is a hot dog, not a dog, and "teddy bear" not a bear), each phrase
  also in its plural (last word: -s, -es, consonant + y -> -ies; irregular plurals such as
  "people" and "knives" are listed in the table; the paper's code singularizes every word
  instead, which agrees on regular nouns). *Every* mention counts, as the paper's released code
  counts them (``utils/chair.py`` of github.com/LisaAnne/Hallucination): "a dog chasing a dog"
  is two mentions of dog, and two hallucinations when the image has none.
- **The paper's special cases** (:data:`COMPOUNDS`): a qualifier that would otherwise fire as a
  person names the object it qualifies ("baby elephant" and "adult giraffe" are the animal,
  "passenger train" is the train), "bow tie" is a tie and "toilet seat" a toilet; and a "seat"
  in a caption that also mentions a toilet is not a chair (:data:`NOT_WITH`).
- **Ground truth** of an image is the union of its COCO instance (segmentation) categories and
  the objects its reference captions mention, as in the paper (:func:`ground_truth`);
  ``references=None`` keeps the instances alone.
- CHAIR-i of captions that mention no object is NaN (nothing to count), shown as n/a.

The synonym table is pairfree's own (the paper's list was not copied): each category's COCO name
and the common words for it in COCO captions. Words that only sometimes name a category are left
out rather than guessed: "glasses" (more often spectacles than wine glasses), "plant", "computer",
"chicken" (often food), "baseball" ("a baseball player" holds no ball). A category's own name
is always matched, even where it is ambiguous ("an orange cat" mentions an orange).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path

from pairfree.errors import BadInputError
from pairfree.evaluate.coco import format_ids

# COCO category name -> the phrases that name it (singular; plurals are derived).
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("person", "people", "man", "men", "woman", "women", "boy", "girl", "child",
               "children", "kid", "baby", "toddler", "guy", "lady", "gentleman", "player",
               "skier", "snowboarder", "surfer", "skateboarder", "rider", "biker", "cyclist",
               "pedestrian", "chef", "adult", "teenager", "teen", "student", "worker",
               "officer", "policeman", "soldier", "crowd", "catcher", "umpire", "tourist",
               "passenger", "bride", "groom", "mother", "father", "son", "daughter", "friend",
               "customer", "vendor", "athlete"),
    "bicycle": ("bicycle", "bike", "cycle"),
    "car": ("car", "automobile", "sedan", "van", "minivan", "suv", "taxi", "cab", "jeep",
            "hatchback", "coupe"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "motor cycle", "scooter", "moped",
                   "dirt bike"),
    "airplane": ("airplane", "aeroplane", "air plane", "plane", "jet", "airliner", "aircraft",
                 "jetliner"),
    "bus": ("bus",),
    "train": ("train", "locomotive", "tram", "trolley", "subway", "railcar"),
    "truck": ("truck", "pickup", "lorry", "tractor trailer", "fire truck", "firetruck"),
    "boat": ("boat", "ship", "sailboat", "kayak", "canoe", "yacht", "ferry", "raft",
             "rowboat", "speedboat", "barge", "tugboat"),
    "traffic light": ("traffic light", "traffic signal", "stop light", "stoplight",
                      "street light"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench", "park bench"),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "geese", "swan", "parrot",
             "owl", "eagle", "hawk", "crow", "sparrow", "hen", "rooster", "pelican",
             "penguin", "flamingo", "heron"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "doggy", "canine", "terrier", "poodle", "labrador",
            "retriever", "bulldog", "beagle", "dachshund", "chihuahua", "collie"),
    "horse": ("horse", "pony", "foal", "stallion", "mare"),
    "sheep": ("sheep", "lamb", "ram", "ewe"),
    "cow": ("cow", "cattle", "bull", "calf", "calves", "ox", "oxen", "heifer"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly", "polar bear"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "back pack", "knapsack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "hand bag", "purse"),
    "tie": ("tie", "necktie", "neck tie"),
    "suitcase": ("suitcase", "suit case", "luggage", "briefcase"),
    "frisbee": ("frisbee", "flying disc"),
    "skis": ("skis",),
    "snowboard": ("snowboard", "snow board"),
    "sports ball": ("sports ball", "ball", "soccer ball", "tennis ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "baseball mitt", "glove", "mitt"),
    "skateboard": ("skateboard", "skate board"),
    "surfboard": ("surfboard", "surf board", "longboard", "paddleboard", "paddle board"),
    "tennis racket": ("tennis racket", "tennis racquet", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass", "champagne glass"),
    "cup": ("cup", "mug", "teacup", "coffee cup"),
    "fork": ("fork",),
    "knife": ("knife", "knives"),
    "spoon": ("spoon", "ladle"),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "panini"),
    "orange": ("orange", "tangerine", "mandarin"),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog", "frankfurter"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake"),
    "chair": ("chair", "seat", "stool", "armchair"),
    "couch": ("couch", "sofa", "loveseat", "love seat", "futon"),
    "potted plant": ("potted plant", "house plant", "houseplant", "flower pot"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "kitchen table"),
    "toilet": ("toilet", "urinal", "commode"),
    "tv": ("tv", "television", "monitor", "screen"),
    "laptop": ("laptop", "notebook computer", "laptop computer"),
    "mouse": ("mouse", "mice"),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "cellphone", "mobile phone", "phone", "smartphone",
                   "telephone", "iphone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove", "stovetop"),
    "toaster": ("toaster",),
    "sink": ("sink", "basin"),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "magazine"),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors", "shears"),
    "teddy bear": ("teddy bear", "teddy", "stuffed bear", "stuffed animal"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer"),
    "toothbrush": ("toothbrush", "tooth brush"),
}  # fmt: skip

# Phrases whose words would name another category: the category they name (the paper's rules).
COMPOUNDS: dict[str, str] = {
    **{f"{age} {animal}": animal for age in ("baby", "adult")
       for animal in ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear",
                      "zebra", "giraffe")},
    "passenger train": "train",
    "passenger jet": "airplane",
    "passenger plane": "airplane",
    "bow tie": "tie",
    "toilet seat": "toilet",
}  # fmt: skip

# A word that is no mention when the caption also mentions the category ("the seat of a toilet").
NOT_WITH: dict[str, str] = {"seat": "toilet"}

_WORD = re.compile(r"[a-z]+")


def plural(word: str) -> str:
    """The regular English plural of ``word`` (irregular ones are listed in the tables)."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


class ObjectMentions:
    """Caption -> the categories it mentions, one per mention, longest phrase first."""

    def __init__(
        self,
        synonyms: Mapping[str, Iterable[str]] = COCO_SYNONYMS,
        compounds: Mapping[str, str] = COMPOUNDS,
        not_with: Mapping[str, str] = NOT_WITH,
    ) -> None:
        self.phrases: dict[tuple[str, ...], str] = {}
        named = [(p, c) for c, phrases in synonyms.items() for p in (c, *phrases)]
        for phrase, category in [*named, *compounds.items()]:
            words = phrase.split()
            for form in (words, [*words[:-1], plural(words[-1])]):
                self.phrases[tuple(form)] = category
        self.longest = max(len(p) for p in self.phrases)
        self.not_with = {
            (form,): category for word, category in not_with.items()
            for form in (word, plural(word))
        }  # fmt: skip

    def __call__(self, caption: str) -> list[str]:
        words = _WORD.findall(caption.lower())
        found: list[tuple[tuple[str, ...], str]] = []
        i = 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                phrase = tuple(words[i : i + n])
                if phrase in self.phrases:
                    found.append((phrase, self.phrases[phrase]))
                    i += n
                    break
            else:
                i += 1
        categories = {c for _, c in found}
        return [c for p, c in found if self.not_with.get(p) not in categories]


object_mentions = ObjectMentions()


def chair_from_mentions(
    items: Iterable[tuple[Sequence[str], set[str]]],
) -> dict[str, float]:
    """CHAIR-i and CHAIR-s (x100) from (a caption's mentioned categories, one per mention; its
    image's ground-truth categories) pairs, plus the counts behind them."""
    captions = hallucinated_captions = mentions = hallucinated = 0
    for mentioned, truth in items:
        wrong = sum(c not in truth for c in mentioned)
        captions += 1
        hallucinated_captions += wrong > 0
        mentions += len(mentioned)
        hallucinated += wrong
    return {
        "CHAIR_i": 100.0 * hallucinated / mentions if mentions else math.nan,
        "CHAIR_s": 100.0 * hallucinated_captions / captions if captions else math.nan,
        "chair_mentions": float(mentions),
        "chair_hallucinated_mentions": float(hallucinated),
        "chair_captions": float(captions),
        "chair_hallucinated_captions": float(hallucinated_captions),
    }


def chair_scores(
    captions: Mapping[Hashable, str],
    truth: Mapping[Hashable, set[str]],
    *,
    mentions: Callable[[str], Sequence[str]] = object_mentions,
) -> dict[str, float]:
    """CHAIR of one caption per image against ``truth`` (image id -> ground-truth categories;
    ids compared as strings). An image without ground truth is an error naming it: a missing
    image would otherwise count as one with no objects, every mention a hallucination."""
    by_id = {str(k): set(v) for k, v in truth.items()}
    missing = [str(i) for i in captions if str(i) not in by_id]
    if missing:
        raise BadInputError(
            "CHAIR ground truth", f"no object annotations for image ids {format_ids(missing)}"
        )
    return chair_from_mentions(
        (mentions(caption), by_id[str(i)]) for i, caption in captions.items()
    )


def ground_truth(
    instances: Mapping[Hashable, set[str]],
    references: Mapping[Hashable, Sequence[str]] | None = None,
    *,
    mentions: Callable[[str], Sequence[str]] = object_mentions,
) -> dict[str, set[str]]:
    """Each image's ground-truth categories: its instance annotations, with the objects its
    ``references`` mention added (the paper's ground truth) unless ``references`` is None."""
    truth = {str(k): set(v) for k, v in instances.items()}
    for image_id, texts in (references or {}).items():
        if str(image_id) in truth:
            truth[str(image_id)].update(c for text in texts for c in mentions(text))
    return truth


def read_coco_instances(path: str | Path) -> dict[str, set[str]]:
    """COCO instance annotations (``instances_*.json``) -> image id (as str) -> the names of the
    categories annotated in it. Every listed image is present, those without instances with an
    empty set (COCO has a few hundred: nothing CHAIR can count as there)."""
    from pairfree.io import read_json

    data = read_json(path)
    if not isinstance(data, Mapping):
        raise BadInputError(path, "expected a COCO instances object")
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise BadInputError(
            path, f"not COCO instance annotations: no {', '.join(map(repr, missing))} "
            "(instances_*.json has images, annotations and categories)"
        )  # fmt: skip

    def field(record: object, key: str, where: str) -> object:
        if not isinstance(record, Mapping) or key not in record:
            raise BadInputError(path, f"{where}: missing {key!r}")
        return record[key]

    names = {
        field(c, "id", f"categories[{n}]"): str(field(c, "name", f"categories[{n}]"))
        for n, c in enumerate(data["categories"])
    }
    objects = {str(field(im, "id", f"images[{n}]")): set() for n, im in enumerate(data["images"])}
    for n, ann in enumerate(data["annotations"]):
        where = f"annotations[{n}]"
        image_id, category = field(ann, "image_id", where), field(ann, "category_id", where)
        if str(image_id) not in objects:
            raise BadInputError(path, f"{where}: image_id {image_id!r} is not in images")
        if category not in names:
            raise BadInputError(path, f"{where}: category_id {category!r} is not in categories")
        objects[str(image_id)].add(names[category])
    return objects
