"""The 1,000 ImageNet classes of the image tower's classifier, as readable tags.

The class list comes with timm (``timm/data/_info/imagenet_synsets.txt``: the WordNet synset of each
class index, in the classifier's order; ``imagenet_synset_to_lemma.txt``: the synonyms of each synset).
A class's readable name is its first synonym ("cheeseburger", "pizza", "seashore"), except for the
few whose first synonym is ambiguous or obscure (``RENAMED``: the two "crane"s, "cab" -> "taxi").

Groups are the everyday words for sets of classes that users type and that captions use ("dog" for
the 118 dog breeds, "cat", "bird", "car", "fruit"): a photo of a beagle tagged "beagle 0.35" is also
tagged "dog 0.96" when the dog classes together hold that probability. A group's probability is the
sum of its classes' probabilities (the probability of the union, as the classes exclude each other).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from retrieval.errors import ModelLoadError

N_CLASSES = 1000
SYNSETS_FILE = "imagenet_synsets.txt"
LEMMAS_FILE = "imagenet_synset_to_lemma.txt"

# class index -> readable name, where the first synonym is ambiguous ("crane"), a duplicate
# ("maillot"), obscure ("alp", "sorrel", "cock") or not the word people use ("cab")
RENAMED = {
    7: "rooster", 101: "tusker (elephant)", 134: "crane (bird)", 339: "sorrel (horse)", 468: "taxi",
    517: "crane (machine)", 610: "T-shirt", 638: "maillot (swimsuit)", 639: "tank suit (swimsuit)",
    705: "railway carriage", 717: "pickup truck", 751: "race car", 934: "hot dog", 970: "alp (mountain)",
    981: "baseball player", 850: "teddy bear",
}


def _span(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b + 1))


# group word -> class indices (ImageNet-1k order; the animal ranges follow WordNet's hierarchy)
GROUPS: dict[str, tuple[int, ...]] = {
    "dog": _span(151, 268),
    "cat": _span(281, 285),
    "wild cat": _span(286, 293),
    "bear": _span(294, 297),
    "fox": _span(277, 280),
    "wolf": _span(269, 272),
    "bird": _span(7, 24) + _span(80, 100) + _span(127, 146),
    "fish": _span(0, 6) + _span(389, 397),
    "shark": _span(2, 4),
    "snake": _span(52, 68),
    "lizard": _span(38, 48),
    "turtle": _span(33, 37),
    "frog": _span(30, 32),
    "spider": _span(72, 77),
    "insect": _span(300, 320),
    "butterfly": _span(321, 326),
    "crab": _span(118, 121) + (125,),
    "monkey": _span(369, 384),
    "ape": _span(365, 368),
    "elephant": (101, 385, 386),
    "rabbit": _span(330, 332),
    "cattle": (345, 346, 347),
    "sheep": (348, 349),
    "pig": (341, 342, 343),
    "whale": (147, 148),
    "car": (436, 468, 511, 609, 627, 656, 661, 717, 751, 817),
    "truck": (555, 569, 675, 717, 734, 864, 867),
    "bus": (654, 779, 874),
    "train": (466, 547, 565, 705, 820, 829),
    "boat": (472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914),
    "bicycle": (444, 671),
    "airplane": (404, 895, 908),
    "fruit": _span(948, 957),
    "vegetable": _span(936, 946),
    "bread": (930, 931, 932),
    "mushroom": (947,) + _span(991, 997),
    "swimwear": (433, 638, 639, 842),
    "pen": (418, 563, 749),
    "bridge": (821, 839),
}


@dataclass(frozen=True)
class ClassList:
    """The classifier's classes: synset ids, synonyms and readable names by class index, and the groups."""

    synsets: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    names: tuple[str, ...]
    groups: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(GROUPS))

    def __len__(self) -> int:
        return len(self.synsets)

    @property
    def sha256(self) -> str:
        """Hash of the synsets, names and groups: what provenance records (another list, other tags)."""
        h = hashlib.sha256()
        for s, n in zip(self.synsets, self.names):
            h.update(f"{s}\t{n}\n".encode())
        for g, members in sorted(self.groups.items()):
            h.update(f"{g}:{','.join(map(str, members))}\n".encode())
        return h.hexdigest()

    def prompt(self, index: int) -> str:
        """The text a class is embedded as for zero-shot ranking: its name and its other synonyms
        ("cheeseburger"; "pizza, pizza pie")."""
        names = [self.names[index]] + [s for s in self.synonyms[index] if s.lower() != self.names[index].lower()]
        return ", ".join(dict.fromkeys(names[:4]))


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the ImageNet class list {path}: {exc}") from exc


def timm_info_dir() -> Path:
    """timm's folder of class lists (``timm/data/_info``), found without importing timm."""
    from importlib.util import find_spec

    spec = find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the Python package 'timm' is not installed; it ships the ImageNet class names "
                             "that tags are made of (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"


def load_classes(folder: Path | None = None) -> ClassList:
    """The 1,000 classes from ``folder`` (default: timm's), or :class:`ModelLoadError` saying what is wrong."""
    folder = folder or timm_info_dir()
    synsets = _read_lines(folder / SYNSETS_FILE)
    if len(synsets) != N_CLASSES or any(not re.fullmatch(r"n\d{8}", s) for s in synsets):
        raise ModelLoadError(f"{folder / SYNSETS_FILE} does not list the {N_CLASSES} ImageNet-1k synsets "
                             f"(found {len(synsets)} lines)")
    lemmas: dict[str, tuple[str, ...]] = {}
    for line in _read_lines(folder / LEMMAS_FILE):
        synset, sep, words = line.partition("\t")
        if sep:
            lemmas[synset] = tuple(w.strip() for w in words.split(",") if w.strip())
    missing = [s for s in synsets if not lemmas.get(s)]
    if missing:
        raise ModelLoadError(f"{folder / LEMMAS_FILE} has no names for {len(missing)} ImageNet classes "
                             f"(first: {missing[0]})")
    synonyms = tuple(lemmas[s] for s in synsets)
    names = tuple(RENAMED.get(i, syn[0]) for i, syn in enumerate(synonyms))
    return ClassList(tuple(synsets), synonyms, names)


@lru_cache(maxsize=1)
def default_classes() -> ClassList:
    """timm's class list, read once per process."""
    return load_classes()
