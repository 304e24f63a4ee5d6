"""Reading ImageNet tags without torch: the calibration of ``native:imagenet-tags-v1`` and everything a
search asks of stored classes (tags above thresholds, ConSE zero-shot scores, the gate, class names).

:class:`ClassTagger` is shared by the PyTorch tagger that also classifies images at indexing time
(``retrieval/native/tagger.py``) and the torch-free one that a search process uses
(``retrieval/native/lite.py``); each embeds query text its own way (:meth:`ClassTagger._embed`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from retrieval.errors import ModelLoadError
from retrieval.native.imagenet import ClassList, default_classes
from retrieval.tagging import Classes, Tag, Tagger, TaggerInfo, concept_scores, concept_vectors, gate


@dataclass(frozen=True)
class TagCalibration:
    """What ``pixquery train tagger`` calibrated on Flickr8k train (see retrieval/native/tagger.py)."""

    temperature: float
    top_k: int
    floor: float
    class_threshold: float
    group_threshold: float
    max_class_tags: int
    sharpen: float
    gate_low: float
    gate_high: float
    gate_floor: float

    @classmethod
    def from_payload(cls, payload: dict) -> "TagCalibration":
        """From a tagger file's fields (``gate`` as {"low", "high", "floor"}); KeyError/ValueError if incomplete."""
        g = payload["gate"]
        return cls(float(payload["temperature"]), int(payload["top_k"]), float(payload["floor"]),
                   float(payload["class_threshold"]), float(payload["group_threshold"]),
                   int(payload["max_class_tags"]), float(payload["sharpen"]),
                   float(g["low"]), float(g["high"]), float(g["floor"]))

    def to_payload(self) -> dict:
        d = asdict(self)
        d["gate"] = {k: d.pop(f"gate_{k}") for k in ("low", "high", "floor")}
        return d


def checked_classes(source: object, classes_sha256: str, n_embeddings: int,
                    classes: ClassList | None = None) -> ClassList:
    """The class list (default: timm's) after checking that ``source``'s calibration was made for it."""
    classes = classes or default_classes()  # raises ModelLoadError when the class list is unusable
    if classes_sha256 != classes.sha256:
        raise ModelLoadError(f"the tagger {source} was calibrated for another ImageNet class list than the one "
                             f"installed (timm's); retrain it with: pixquery train tagger")
    if n_embeddings != len(classes):
        raise ModelLoadError(f"the tagger {source} holds {n_embeddings} class embeddings, expected {len(classes)}")
    return classes


class ClassTagger(Tagger):
    """Tags and zero-shot scores from stored ImageNet classes (see module doc). ``embeddings``: the
    (1000, d) class-name embeddings; subclasses embed queries (:meth:`_embed`) and classify grids."""

    def __init__(self, calibration: TagCalibration, embeddings: np.ndarray, classes: ClassList,
                 info: TaggerInfo) -> None:
        self.calibration = c = calibration
        self.temperature, self.top_k, self.floor = c.temperature, c.top_k, c.floor
        self.class_threshold, self.group_threshold = c.class_threshold, c.group_threshold
        self.max_class_tags, self.sharpen = c.max_class_tags, c.sharpen
        embeddings = np.asarray(embeddings, dtype=np.float32)
        self.embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)  # (1000, d)
        self.classes, self.info = classes, info
        self._prepared: dict[str, np.ndarray] = {}
        self._names: dict[str, tuple[int, ...]] | None = None
        self._group_of: dict[int, list[str]] = {}
        for group, members in classes.groups.items():
            for cls in members:
                self._group_of.setdefault(cls, []).append(group)

    def tags(self, classes: Classes) -> list[Tag]:
        out: list[Tag] = []
        groups: dict[str, float] = {}
        for c, p in classes:
            for group in self._group_of.get(c, ()):
                groups[group] = groups.get(group, 0.0) + p
        for group, p in groups.items():
            if p >= self.group_threshold:
                out.append(Tag(group, min(p, 1.0), f"group:{group}"))
        strong = [(c, p) for c, p in classes if p >= self.class_threshold][: self.max_class_tags]
        for c, p in strong:
            name = self.classes.names[c]
            if all(t.name != name for t in out):
                out.append(Tag(name, p, f"imagenet:{c}"))
        return sorted(out, key=lambda t: -t.probability)

    # --- zero-shot scores of queries ---------------------------------------------------------------
    def _embed(self, texts: list[str], cache: bool = True) -> np.ndarray:
        """B query texts -> (B, d) unit vectors (``cache``: a single recent query may come from a cache)."""
        raise ModelLoadError("this tagger has no text tower to embed queries with (the native encoder's)")

    def prepare(self, texts: Sequence[str], batch: int = 256) -> None:
        """Embed many queries at once (an evaluation's), for later single-query calls."""
        self._prepared = {}
        texts = list(dict.fromkeys(texts))
        for start in range(0, len(texts), batch):
            chunk = texts[start:start + batch]
            self._prepared.update(zip(chunk, self._embed(chunk, cache=False)))

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if texts and all(t in self._prepared for t in texts):
            return np.stack([self._prepared[t] for t in texts])
        return self._embed(texts)

    def concepts(self, classes: Sequence[Classes]) -> np.ndarray:
        return concept_vectors(classes, self.embeddings, self.sharpen)

    def concept_scores(self, query: np.ndarray, classes: Sequence[Classes]) -> np.ndarray:
        return concept_scores(query, classes, self.embeddings, self.sharpen)

    def gate(self, query: np.ndarray) -> float:
        c = self.calibration
        best = float((self.embeddings @ query.astype(np.float32)).max())
        return gate(best, c.gate_low, c.gate_high, c.gate_floor)

    def names(self) -> dict[str, tuple[int, ...]]:
        if self._names is None:
            names: dict[str, tuple[int, ...]] = {}
            for i, name in enumerate(self.classes.names):
                names[name] = names.get(name, ()) + (i,)
            for group, members in self.classes.groups.items():
                names[group] = tuple(dict.fromkeys(names.get(group, ()) + members))
            self._names = names
        return self._names

    def near_classes(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        sims = self.embeddings @ query.astype(np.float32)  # (1000,)
        top = np.argsort(-sims)[:n]
        return [(int(c), float(sims[c])) for c in top]
