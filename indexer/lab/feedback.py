"""``pixquery eval feedback``: what one round of relevance feedback does to recall, with a simulated user.

Each caption query of the set is ranked as ``pixquery search`` ranks it (fused mode, default weights);
the simulated user looks at the first ``shown`` (24, the app's page) results and gives feedback; the
query is ranked again with it (``Searcher.feedback``: Rocchio on the query vector, the bad images and
their near copies left out), and the rank of the query's own image is read from both rankings.

Users:
    good      marks the right image good when it is among the shown (the issue's user); nothing otherwise
    good+bad  the same, and marks bad the shown results ranked above the right image, or the first
              ``bad_when_missing`` (5) when the right image is not shown

Caveat, stated with every report: Flickr8k has one right image per query, and the ``good`` user marks
exactly that image, so R@1 after feedback mostly measures whether the marked image comes first; it is
bounded by how often the right image is shown at all (R@24 before feedback). The report therefore
also gives the queries whose right image was not shown, where only bad marks can change anything.

Contract (``--json``): {"n_images", "n_queries", "shown", "weights", "rocchio", "near_bad",
"none": recall, "<user>": {"all": recall, "shown": recall over the queries whose right image was shown,
"not_shown": recall over the others, "marked_queries": n}, ...}; recall = {"R@1", "R@5", "R@10", "medr"}.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.lab.evaluate import _link_images, _ranks
from retrieval.fusion import NEAR_BAD, ROCCHIO_ALPHA, ROCCHIO_BETA, ROCCHIO_GAMMA, query_texts, query_vector
from retrieval.metrics import recall_report
from retrieval.native.training.data import read_captions
from retrieval.query import FusionWeights
from retrieval.query_parser import parse_query

USERS = ("good", "good+bad")


def marks(user: str, shown_ids: np.ndarray, target: int, bad_when_missing: int = 5) -> tuple[list[int], list[int]]:
    """(good ids, bad ids) the simulated ``user`` marks among ``shown_ids`` (best first)."""
    where = np.flatnonzero(shown_ids == target)
    if user == "good":
        return ([target], []) if len(where) else ([], [])
    if user == "good+bad":
        if len(where):
            return [target], [int(i) for i in shown_ids[:where[0]]]
        return [], [int(i) for i in shown_ids[:bad_when_missing]]
    raise InputError(f"unknown simulated user {user!r}; choose from {', '.join(USERS)}")


def evaluate_feedback(images: Path, captions_file: Path, config: EngineConfig, shown: int = 24,
                      users: tuple[str, ...] = USERS, limit: int | None = None, query_batch: int = 256,
                      weights: FusionWeights | None = None, encoder=None, captioner=None, scorer=None) -> dict:  # noqa: ANN001
    """Index the captioned images in a temporary folder and measure one round of feedback (module doc)."""
    if not images.is_dir():
        raise InputError(f"image folder {images} does not exist")
    weights = weights or FusionWeights()
    captions = read_captions(captions_file)
    names = list(captions)
    texts = [c for n in names for c in captions[n]]
    owner = np.array([i for i, n in enumerate(names) for _ in captions[n]])
    picked = np.arange(len(texts))
    if limit is not None and limit < len(texts):  # every n-th query: all images keep some of theirs
        picked = np.linspace(0, len(texts) - 1, limit).round().astype(int)
    with tempfile.TemporaryDirectory(prefix="pixquery-feedback-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "images").mkdir()
        _link_images(images, names, tmp_path / "images")
        cfg = replace(config, index_dir=tmp_path / "index")
        with Engine(cfg, encoder=encoder, captioner=captioner, scorer=scorer) as engine:
            engine.index(tmp_path / "images")
            by_pos = {int(Path(p).stem): i for i, p in engine.paths().items()}
            id_of = np.array([by_pos[i] for i in range(len(names))], dtype=np.int64)
            owner_ids = id_of[owner][picked]
            parsed = [parse_query(texts[j]) for j in picked]
            needed = list(dict.fromkeys(t for p in parsed for t in query_texts(p)))
            embedded = np.concatenate([engine.encoder.encode_texts(needed[s:s + query_batch])
                                       for s in range(0, len(needed), query_batch)])
            cache = dict(zip(needed, embedded))
            q = np.stack([query_vector(p, lambda ts: np.stack([cache[t] for t in ts])) for p in parsed])
            searcher = engine.searcher()
            ranker = searcher.ranker
            if ranker.matcher is not None:
                ranker.matcher.prepare(list(dict.fromkeys(p.positive_text for p in parsed)), query_batch)
            depth = max(cfg.pool, shown)

            def rank(j: int, vector: np.ndarray, feedback=None) -> np.ndarray:  # noqa: ANN001
                return ranker.rank("fused", vector, parsed[j], depth, weights, pool=cfg.pool,
                                   depth=cfg.rerank_depth, feedback=feedback).ids

            before = [rank(j, q[j]) for j in tqdm(range(len(q)), desc="no feedback", disable=not cfg.progress)]
            seen = np.array([owner_ids[j] in before[j][:shown] for j in range(len(q))])
            n = len(names)
            out = {"n_images": n, "n_queries": len(q), "shown": shown, "shown_queries": int(seen.sum()),
                   "weights": weights.to_dict(), "rocchio": {"alpha": ROCCHIO_ALPHA, "beta": ROCCHIO_BETA,
                                                             "gamma": ROCCHIO_GAMMA}, "near_bad": NEAR_BAD,
                   "none": recall_report(_ranks(before, owner_ids, n))}
            for user in users:
                after, marked = [], 0
                for j in tqdm(range(len(q)), desc=f"feedback: {user}", disable=not cfg.progress):
                    good, bad = marks(user, before[j][:shown], int(owner_ids[j]))
                    if not good and not bad:
                        after.append(before[j])
                        continue
                    marked += 1
                    vector, feedback = searcher.feedback(q[j], good, bad)
                    after.append(rank(j, vector, feedback))
                ranks = _ranks(after, owner_ids, n)
                out[user] = {"all": recall_report(ranks), "marked_queries": marked,
                             "shown": recall_report(ranks[seen]) if seen.any() else None,
                             "not_shown": recall_report(ranks[~seen]) if (~seen).any() else None}
            base = _ranks(before, owner_ids, n)
            out["none_shown"] = recall_report(base[seen]) if seen.any() else None
            out["none_not_shown"] = recall_report(base[~seen]) if (~seen).any() else None
            return out
