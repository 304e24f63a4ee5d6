"""``pixquery train tagger``: calibrate the ImageNet tagger on Flickr8k train and write its file.

Nothing is trained in the classifier (it ships with the image tower); what is chosen here:

* the softmax **temperature**, by the likelihood of the tags being right on Flickr8k **train**, where a
  tag counts as right when one of its words (the head word of a synonym, e.g. "bike" of "mountain bike",
  or the word of one of its groups, e.g. "dog" for "beagle") is among the stemmed words of the image's
  five human captions. Captions do not name every object nor any dog's breed, so this oracle
  undercounts: the precision it gives is a lower bound;
* the **thresholds** of class tags and of group tags: the lowest (on a 0.05 grid) whose precision on
  train reaches the targets;
* the **class-name embeddings** (MiniLM, of each class's name and synonyms) that the zero-shot signal
  compares queries with.

The zero-shot signal's gate and sharpening are ranking weights, given as arguments (their defaults were
chosen with the ``tags`` weight by docs/scripts/choose_tag_weights.py on 600 Flickr8k train images and the
tune half of the out-of-domain queries; dev was not read, docs/BENCHMARKS.md). The file
records the train and dev precision and coverage of the tags.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrieval.native.imagenet import ClassList, default_classes
from retrieval.native.tagger import save_tagger
from retrieval.native.towers import TextTower, imagenet_classifier
from retrieval.native.training.data import load_flickr8k
from retrieval.native.training.features import grid_features

log = logging.getLogger(__name__)

# words captions use for a group (the group's own word is always one)
GROUP_WORDS = {
    "dog": "puppy", "cat": "kitten", "bicycle": "bike cyclist biker", "boat": "ship kayak canoe raft",
    "swimwear": "swimsuit bikini trunks", "cattle": "cow bull", "sheep": "lamb", "airplane": "plane jet aircraft",
    "monkey": "ape", "ape": "gorilla chimpanzee", "wild cat": "lion tiger leopard cheetah", "bird": "duck goose",
}
TEMPERATURES = tuple(round(0.5 + 0.05 * i, 2) for i in range(31))  # 0.5 .. 2.0
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(2, 20))  # 0.1 .. 0.95


@dataclass
class TrainTaggerConfig:
    data: Path
    out: Path
    cache_dir: Path
    class_precision: float = 0.75  # target precision of class tags on train (by the caption oracle)
    group_precision: float = 0.95  # ... of group tags
    top_k: int = 10  # classes stored per image
    floor: float = 0.01  # a class below this probability is not stored
    max_class_tags: int = 3
    sharpen: float = 0.6  # zero-shot: class weights are probability ** sharpen (0.6 = temperature 2 at 1.2)
    gate: dict = field(default_factory=lambda: {"low": 0.5, "high": 0.8, "floor": 0.0})
    device: str = "cpu"


class Stemmer:
    """Lower-cased Porter stems of words, by SQLite's FTS5 tokenizer (the keyword index's own)."""

    def __init__(self) -> None:
        self._con = sqlite3.connect(":memory:")
        self._con.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='porter unicode61')")
        self._con.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        self._cache: dict[str, list[str]] = {}

    def __call__(self, text: str) -> list[str]:
        if text not in self._cache:
            self._con.execute("INSERT INTO t(rowid, x) VALUES (1, ?)", (text,))
            self._cache[text] = [w for w, in self._con.execute("SELECT term FROM v ORDER BY offset")]
            self._con.execute("DELETE FROM t")
        return self._cache[text]


class CaptionOracle:
    """Whether a tag is borne out by an image's human captions (see module doc)."""

    def __init__(self, classes: ClassList) -> None:
        self.stem = Stemmer()
        self.group_stems = {g: set(self.stem(f"{g} {GROUP_WORDS.get(g, '')}")) for g in classes.groups}
        groups_of: dict[int, list[str]] = {}
        for g, members in classes.groups.items():
            for c in members:
                groups_of.setdefault(c, []).append(g)
        self.class_stems = []
        for i in range(len(classes)):
            heads = {self.stem(s)[-1] for s in (classes.names[i],) + classes.synonyms[i] if self.stem(s)}
            for g in groups_of.get(i, ()):
                heads |= self.group_stems[g]
            self.class_stems.append(heads)

    def caption_stems(self, captions: list[str]) -> set[str]:
        return {w for c in captions for w in self.stem(c)}


def pooled_logits(paths: list[Path], cache_dir: Path, device: torch.device) -> np.ndarray:
    """(N, 1000) classifier logits of images (grid features cached on disk)."""
    grids = grid_features(paths, cache_dir, device)
    weight, bias = imagenet_classifier()
    out = []
    for start in range(0, len(paths), 500):
        pooled = torch.from_numpy(np.asarray(grids[start:start + 500], dtype=np.float32)).mean(dim=(2, 3))
        out.append((pooled @ weight.T + bias).numpy())
    return np.concatenate(out)


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def tag_outcomes(probs: np.ndarray, truth: list[set[str]], oracle: CaptionOracle, classes: ClassList,
                 top: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(probability, right, image) rows of each image's ``top`` classes, and of its groups with a
    probability of at least 0.02 -> (class rows (n, 3), group rows (m, 3))."""
    cls, grp = [], []
    members = {g: np.array(m) for g, m in classes.groups.items()}
    for i, stems in enumerate(truth):
        for c in np.argsort(-probs[i])[:top]:
            cls.append((probs[i, c], bool(oracle.class_stems[c] & stems), i))
        for g, m in members.items():
            p = probs[i, m].sum()
            if p >= 0.02:
                grp.append((p, bool(oracle.group_stems[g] & stems), i))
    return np.array(cls, dtype=np.float64).reshape(-1, 3), np.array(grp, dtype=np.float64).reshape(-1, 3)


def nll(rows: np.ndarray) -> float:
    p = np.clip(rows[:, 0], 1e-6, 1 - 1e-6)
    y = rows[:, 1]
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def precision_at(rows: np.ndarray, threshold: float, n_images: int) -> dict:
    sel = rows[rows[:, 0] >= threshold]
    return {"threshold": threshold, "tags_per_image": round(len(sel) / n_images, 4),
            "images_tagged": round(len(set(sel[:, 2].astype(int))) / n_images, 4),
            "precision": round(float(sel[:, 1].mean()), 4) if len(sel) else None}


def lowest_threshold(rows: np.ndarray, target: float) -> float:
    for t in THRESHOLDS:
        sel = rows[rows[:, 0] >= t]
        if len(sel) >= 20 and sel[:, 1].mean() >= target:
            return t
    return THRESHOLDS[-1]


def train_tagger(cfg: TrainTaggerConfig) -> dict:
    t0 = time.time()
    device = torch.device(cfg.device)
    classes = default_classes()
    oracle = CaptionOracle(classes)
    splits = {name: load_flickr8k(cfg.data, name) for name in ("train", "dev")}
    logits = {name: pooled_logits(s.paths, cfg.cache_dir, device) for name, s in splits.items()}
    truth = {name: [oracle.caption_stems(c) for c in s.captions] for name, s in splits.items()}
    fits = []
    for t in TEMPERATURES:  # calibration: train only
        c, g = tag_outcomes(softmax(logits["train"], t), truth["train"], oracle, classes)
        fits.append((nll(np.concatenate([c, g])), t))
    temperature = min(fits)[1]
    rows = {name: tag_outcomes(softmax(logits[name], temperature), truth[name], oracle, classes) for name in splits}
    class_t = lowest_threshold(rows["train"][0], cfg.class_precision)
    group_t = lowest_threshold(rows["train"][1], cfg.group_precision)
    report = {name: {"class_tags": precision_at(rows[name][0], class_t, len(splits[name].files)),
                     "group_tags": precision_at(rows[name][1], group_t, len(splits[name].files))}
              for name in splits}
    tower = TextTower().to(device).eval()
    prompts = [classes.prompt(i) for i in range(len(classes))]
    with torch.inference_mode():
        emb = torch.cat([tower(prompts[s:s + 250]) for s in range(0, len(prompts), 250)])
        emb = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()  # (1000, 384)
    calibration = {"temperature": temperature, "class_threshold": class_t, "group_threshold": group_t,
                   "top_k": cfg.top_k, "floor": cfg.floor, "max_class_tags": cfg.max_class_tags,
                   "sharpen": cfg.sharpen, "gate": dict(cfg.gate)}
    meta = {"calibration": calibration, "nll_by_temperature": {t: round(v, 5) for v, t in fits},
            "targets": {"class_precision": cfg.class_precision, "group_precision": cfg.group_precision},
            "precision_by_caption_words": report, "data": str(cfg.data), "minutes": round((time.time() - t0) / 60, 2),
            "note": "precision against the words of the human captions (a lower bound, see the module doc); "
                    "temperature and thresholds chosen on train, dev reported"}
    save_tagger(cfg.out, calibration, emb, classes, meta)
    cfg.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta
