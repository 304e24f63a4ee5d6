"""``pixquery eval retrieval``: recall of every ranking mode on a fresh temporary index.

Two kinds of query set: a caption file (``file_name<TAB>caption`` lines; each caption is a query whose
one relevant image is its own, e.g. Flickr8k dev) or a query file (``indexer/lab/queries.py``: queries
as users type them, each with every relevant image, over all the images of a folder, e.g. the
out-of-domain set ``--queries ood``). A query counts as found at K when any relevant image is in the
first K.

Contract (other tools parse it): with ``--json`` stdout is exactly one JSON object::

    {"n_images": N, "n_queries": Q, "encoder": "...", "captioner": "..." | null,
     "scorer": "..." | null, "matcher": "..." | null, "tagger": "..." | null, "pool": n, "rerank_depth": n,
     "weights": {...fused weights used...},
     "text_to_image": {"<mode>": {"R@1": %, "R@5": %, "R@10": %, "medr": rank}, ...},
     "image_to_text": {"R@1": %, "R@5": %, "R@10": %} | null}

plus ``"by_split"`` ({split: {mode: {...}}}) for a query file with splits, and ``"tuning"`` with
``--tune``. With ``--baseline`` the mode ``fused_before_tags`` is the fused ranking as it was before
tags (no tags signal, tags not in the keywords), in the same run. Every mode runs the same code as
``pixquery search``. Modes that rank a short list (keyword: captions sharing a word; tags: images
holding a class near the query; fused: its candidate pool) give an image outside that list rank N + 1,
so their medr is an upper bound.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.lab.queries import image_files, read_queries
from indexer.search.ranker import Ranker
from retrieval.fusion import add_relative, first_stage, query_texts, query_vector, stage_total
from retrieval.query import MODES, FusionWeights
from retrieval.query_parser import parse_query
from captioning.captioner import Captioner, TextScorer
from retrieval.encoder import JointEncoder
from retrieval.metrics import best_ranks_multi, recall_report
from retrieval.native.training.data import read_captions

# --tune grid (image weight fixed at 1: only ratios matter)
TUNE_CAPTION = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
TUNE_KEYWORD = (0.0, 0.05, 0.1, 0.2, 0.3)
TUNE_LIKELIHOOD = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)
TUNE_MATCH = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _link_images(images: Path, names: list[str], into: Path) -> None:
    missing = [n for n in names if not (images / n).is_file()]
    if missing:
        raise InputError(f"{len(missing)} images named in the caption file are not in {images} (first: {missing[0]})")
    for i, name in enumerate(names):
        # one flat folder of links, named by position so nested names cannot collide
        os.symlink((images / name).resolve(), into / f"{i:07d}{Path(name).suffix.lower()}")


def _ranks(ranked_ids: list[np.ndarray], owner_ids: np.ndarray | list, n_images: int) -> np.ndarray:
    """1-based rank of the first relevant image in each query's ranked id list (n_images + 1 when absent);
    ``owner_ids[q]``: the query's one relevant id, or an array of all of them."""
    out = np.full(len(ranked_ids), n_images + 1)
    for q, ids in enumerate(ranked_ids):
        where = np.flatnonzero(np.isin(ids, owner_ids[q]))
        if len(where):
            out[q] = where[0] + 1
    return out


def evaluate_retrieval(images: Path, captions_file: Path | None, config: EngineConfig, query_batch: int = 256,
                       encoder: JointEncoder | None = None, captioner: Captioner | None = None,
                       scorer: TextScorer | None = None, modes: tuple[str, ...] = MODES,
                       weights: FusionWeights | None = None, tune: bool = False, queries_file: Path | None = None,
                       baseline: bool = False) -> dict:
    """Index the images in a temporary folder and report recall (see module doc): those named in
    ``captions_file``, or every image of ``images`` when ``queries_file`` is given."""
    if not images.is_dir():
        raise InputError(f"image folder {images} does not exist")
    if (captions_file is None) == (queries_file is None):
        raise InputError("give a caption file or a query file (not both)")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise InputError(f"unknown ranking mode {bad[0]!r}; choose from {', '.join(MODES)}")
    weights = weights or FusionWeights()
    if queries_file is not None:
        qset = read_queries(queries_file)
        names = image_files(images)
        position = {n: i for i, n in enumerate(names)}
        missing = sorted({r for rel in qset.relevant for r in rel} - set(position))
        if missing:
            raise InputError(f"{len(missing)} images named in {queries_file} are not in {images} (first: {missing[0]})")
        texts, splits = qset.texts, qset.splits
        relevant = [np.array(sorted(position[r] for r in rel)) for rel in qset.relevant]
        owner = None
    else:
        captions = read_captions(captions_file)
        names = list(captions)
        texts = [c for n in names for c in captions[n]]
        owner = np.array([i for i, n in enumerate(names) for _ in captions[n]])  # (Q,) image index of each caption
        relevant, splits = [np.array([o]) for o in owner], [""] * len(texts)
    with tempfile.TemporaryDirectory(prefix="pixquery-eval-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "images").mkdir()
        _link_images(images, names, tmp_path / "images")
        cfg = replace(config, index_dir=tmp_path / "index")
        with Engine(cfg, encoder=encoder, captioner=captioner, scorer=scorer) as engine:
            summary = engine.index(tmp_path / "images")
            if summary.skipped:
                bad_files = "; ".join(s["reason"] for s in engine.skipped_files()[:3])
                raise InputError(f"{summary.skipped} listed images could not be indexed: {bad_files}")
            # map position-named links back to the caption file's order
            by_pos = {int(Path(p).stem): i for i, p in engine.paths().items()}
            id_of = np.array([by_pos[i] for i in range(len(names))], dtype=np.int64)  # image index -> index id
            relevant_ids = [id_of[r] for r in relevant]  # per query, the index ids of its relevant images
            parsed = [parse_query(t) for t in texts]
            # the same query vectors as search (retrieval.fusion.query_vector), with the text tower run in batches
            needed = list(dict.fromkeys(t for p in parsed for t in query_texts(p)))
            embedded = np.concatenate([
                engine.encoder.encode_texts(needed[s:s + query_batch])
                for s in tqdm(range(0, len(needed), query_batch), desc="caption queries", unit="batch",
                              disable=not cfg.progress)
            ])
            cache = dict(zip(needed, embedded))
            q = np.stack([query_vector(p, lambda ts: np.stack([cache[t] for t in ts])) for p in parsed])  # (Q, D)
            ranker = engine.ranker()
            positives = list(dict.fromkeys(p.positive_text for p in parsed))
            if ranker.matcher is not None and ("fused" in modes or tune):  # token states in batches, not one by one
                ranker.matcher.prepare(positives, query_batch)
            if ranker.tags is not None:
                ranker.tags.tagger.prepare(positives, query_batch)
            rankers = {mode: (ranker, mode, weights) for mode in modes}
            if baseline and "fused" in modes:
                before = Ranker(ranker.store, ranker.vectors, ranker.scorer, ranker.matcher)  # no tags anywhere
                rankers["fused_before_tags"] = (before, "fused", replace(weights, tags=0.0))
            n = len(names)
            all_ranks = {}
            for label, (rk, mode, w) in rankers.items():
                if mode in ("image", "caption"):
                    _, ids = engine.search_vectors(q, n, mode)  # (Q, <=N) ids, best first
                    ranked = list(ids)
                elif mode == "tags" and rk.tags is None:
                    continue
                else:
                    ranked = [rk.rank(mode, q[j], parsed[j], cfg.pool, w, pool=cfg.pool, depth=cfg.rerank_depth).ids
                              for j in tqdm(range(len(texts)), desc=f"{label} queries", unit="query",
                                            disable=not cfg.progress)]
                all_ranks[label] = _ranks(ranked, relevant_ids, n)
            t2i = {label: recall_report(r) for label, r in all_ranks.items()}
            i2t = None
            if owner is not None:
                iv = engine.image_vectors(id_of)  # (N, D)
                i2t = recall_report(best_ranks_multi(iv @ q.T, owner), medr=False)
            out = {"n_images": n, "n_queries": len(texts), "encoder": engine.encoder.info.name,
                   "captioner": engine.captioner.info.name if engine.captioner else None,
                   "scorer": ranker.scorer.info.name if ranker.scorer else None,
                   "rater": rater_name(ranker.scorer),
                   "matcher": ranker.matcher.name if ranker.matcher else None,
                   "tagger": ranker.tags.tagger.info.name if ranker.tags else None,
                   "weights": weights.to_dict(), "pool": cfg.pool, "rerank_depth": cfg.rerank_depth,
                   "text_to_image": t2i, "image_to_text": i2t}
            named = sorted(set(splits) - {""})
            if named:
                out["by_split"] = {sp: {label: recall_report(r[np.array([s == sp for s in splits])])
                                        for label, r in all_ranks.items()} for sp in named}
            if tune:
                out["tuning"] = tune_weights(ranker, q, parsed, relevant_ids, cfg.pool, cfg.rerank_depth,
                                             cfg.progress)
            return out


def _first_stage_ranks(pools: list[tuple[np.ndarray, dict]], owner_ids: np.ndarray, w: FusionWeights,
                       n_images: int) -> np.ndarray:
    ranked = [cand[np.argsort(-first_stage(sig, w), kind="stable")] if len(cand) else cand
              for cand, sig in pools]
    return _ranks(ranked, owner_ids, n_images)


def tune_weights(ranker: Ranker, q: np.ndarray, parsed: list, owner_ids: np.ndarray, pool: int, depth: int,
                 progress: bool = True) -> dict:
    """Grid search of the fused weights on these queries: first the caption and keyword weights
    (image fixed at 1) by the mean of R@1, R@5 and R@10 without the second-stage signals; then, with
    those, the likelihood weight and (when the index has a match head) the match weight together.
    Returns every point tried and the best."""
    n_images = len(ranker.vectors)
    every = FusionWeights(1.0, 1.0, 1.0, 1.0, 1.0)
    pools = [ranker.pool(q[j], parsed[j], every, None, pool)
             for j in tqdm(range(len(q)), desc="tuning: candidate pools", unit="query", disable=not progress)]

    def score(ranks: np.ndarray) -> tuple[dict, float]:
        rep = recall_report(ranks)
        return rep, (rep["R@1"] + rep["R@5"] + rep["R@10"]) / 3

    grid, best = [], None
    for wc, wk in itertools.product(TUNE_CAPTION, TUNE_KEYWORD):
        w = FusionWeights(1.0, wc, wk, 0.0, 0.0)
        rep, s = score(_first_stage_ranks(pools, owner_ids, w, n_images))
        grid.append({"caption": wc, "keyword": wk, **rep})
        if best is None or s > best[0]:
            best = (s, w)
    base = best[1]
    out = {"first_stage": grid, "best_first_stage": base.to_dict()}
    if ranker.scorer is None:
        return out
    # the second-stage signals of each query's `depth` best first-stage candidates, computed once
    firsts, tops, seconds = [], [], []
    for j in tqdm(range(len(q)), desc="tuning: likelihood and match", unit="query", disable=not progress):
        cand, sig = pools[j]
        fused = first_stage(sig, base) if len(cand) else np.zeros(0)
        top = np.argsort(-fused, kind="stable")[:depth]
        firsts.append(fused)
        tops.append(top)
        seconds.append(ranker.rerank_signals(cand[top], parsed[j].positive_text))
    match_grid = TUNE_MATCH if ranker.matcher is not None else (0.0,)
    sweep, best_2 = [], None
    for wl, wm in itertools.product(TUNE_LIKELIHOOD, match_grid):
        ranked = []
        for (cand, sig), fused, top, second in zip(pools, firsts, tops, seconds):
            final = fused
            for name, weight in (("likelihood", wl), ("match", wm)):
                if weight and name in second and len(cand):
                    final = add_relative(final, top, second[name], weight, stage_total(sig, base))
            ranked.append(cand[np.argsort(-final, kind="stable")])
        rep, s = score(_ranks(ranked, owner_ids, n_images))
        sweep.append({"likelihood": wl, "match": wm, **rep})
        if best_2 is None or s > best_2[0]:
            best_2 = (s, wl, wm)
    out["second_stage"] = sweep
    out["best"] = {**base.to_dict(), "likelihood": best_2[1], "match": best_2[2]}
    return out


def evaluate_captions(images: Path, captions_file: Path, config: EngineConfig,
                      captioner: Captioner | None = None, batch: int = 32) -> dict:
    """Caption every image named in ``captions_file`` and score against its reference captions.

    Contract: {"n_images": N, "captioner": name, "BLEU-1".."BLEU-4", "CIDEr", "ROUGE-L"} (fractions,
    as the COCO caption evaluation toolkit reports them).
    """
    from captioning.metrics import caption_scores
    from retrieval.images import load_image

    if not images.is_dir():
        raise InputError(f"image folder {images} does not exist")
    references = read_captions(captions_file)
    names = list(references)
    missing = [n for n in names if not (images / n).is_file()]
    if missing:
        raise InputError(f"{len(missing)} images named in the caption file are not in {images} (first: {missing[0]})")
    if captioner is None:
        if not config.captioner:
            raise InputError("no captioner configured: pass --captioner NAME")
        captioner = Engine(config).captioner
    hypotheses: dict[str, str] = {}
    for start in tqdm(range(0, len(names), batch), desc="captioning", unit="batch", disable=not config.progress):
        chunk = names[start:start + batch]
        caps = captioner.caption_images([load_image(images / n).image for n in chunk], config.decode)
        hypotheses.update(zip(chunk, caps))
    return {"n_images": len(names), "captioner": captioner.info.name, **caption_scores(references, hypotheses)}


def rater_name(scorer: object) -> str | None:
    """The decoder that rates texts for ``scorer`` where it is not the scorer itself (a rater), else None."""
    info = getattr(scorer, "rater_info", None)
    return info.name if info is not None else None
