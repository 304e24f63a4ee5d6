"""Choose the ``tags`` signal's weight, its gate and its sharpening without Flickr8k dev (issue 20).

Selection data, and nothing else:
* **train**: the first N images of Flickr8k train.txt (default 600) with their first caption each as the
  query (N queries over N images). The encoder and the captioner learned from these images, so the
  image, caption and likelihood signals are stronger here than on new photos: a weight that does not
  hurt train is, if anything, conservative for new photos.
* **OOD tune**: the ``tune`` half of indexer/lab/ood_queries.tsv over the sample photos.
The ``test`` half of the OOD set and Flickr8k dev are not read.

Rule (fixed before the sweep was run): among the grid, keep the settings whose fused R@1 on train is
not below fused R@1 on train without the tags signal (weight 0); of those, take the highest OOD-tune
R@1, then the highest OOD-tune R@5 + R@10, then the highest train R@1, then the smallest weight.

Each index is built once with the default models (caption confidence off: it does not rank); each
query's fused candidates and signals are computed once (``Ranker.pool`` with the tags signal on) and
the second-stage signals (likelihood, match) for every image any setting puts in its first ``depth``;
every setting is then fused with retrieval/fusion.py's own functions. Candidates come from the
default gate, so this is a close model of ``pixquery eval retrieval``, not the same run: the figures in
docs/BENCHMARKS.md come from ``pixquery eval retrieval`` with the chosen settings.

    PYTHONPATH=. python docs/scripts/choose_tag_weights.py --data /work/shared/data/flickr8k --work /tmp/choose
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.lab.queries import named_set, read_queries
from retrieval.fusion import first_stage, query_texts, query_vector, relative_part, stage_total
from retrieval.native.training.data import load_flickr8k
from retrieval.query import FusionWeights
from retrieval.query_parser import parse_query
from retrieval.tagging import concept_scores, gate

WEIGHTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.6, 2.0)
FLOORS = (0.0, 0.125, 0.25)
LOW_HIGH = ((0.4, 0.6), (0.45, 0.7), (0.5, 0.8))
SHARPEN = (0.6, 1.0)


def build(folder: Path, index_dir: Path) -> Engine:
    engine = Engine(EngineConfig(index_dir=index_dir, confidence=None, progress=True))
    if not engine.exists:
        engine.index(folder)
    return engine


def prepare(engine: Engine, texts: list[str], relevant: list[set[str]]) -> list[dict]:
    """Per query: candidates, first-stage signals (tags for every sharpening), best class similarity,
    and second-stage values for every candidate any setting could put in the first ``depth``."""
    cfg = engine.config
    by_name = {Path(p).name: i for i, p in engine.paths().items()}
    ranker = engine.ranker()
    tagger = ranker.tags.tagger
    parsed = [parse_query(t) for t in texts]
    needed = list(dict.fromkeys(t for p in parsed for t in query_texts(p)))
    emb = np.concatenate([engine.encoder.encode_texts(needed[s:s + 256]) for s in range(0, len(needed), 256)])
    cache = dict(zip(needed, emb))
    q = np.stack([query_vector(p, lambda ts: np.stack([cache[t] for t in ts])) for p in parsed])
    positives = list(dict.fromkeys(p.positive_text for p in parsed))
    if ranker.matcher is not None:
        ranker.matcher.prepare(positives, 256)
    tagger.prepare(positives, 256)
    out = []
    for j, p in enumerate(parsed):
        tq = ranker.tag_query(p)
        w = ranker.effective(FusionWeights(tags=1.0), tq)
        cand, sig = ranker.pool(q[j], p, w, None, cfg.pool, tq=tq)
        classes = ranker.tags.classes(cand.tolist())
        listed = [classes.get(int(i), []) for i in cand]
        tags = {s: concept_scores(tq.vector, listed, tagger.embeddings, s) for s in SHARPEN}
        best = float((tagger.embeddings @ tq.vector.astype(np.float32)).max())
        x = {"cand": cand, "sig": {k: v for k, v in sig.items() if k != "tags"}, "tags": tags, "best": best,
             "rel": {by_name[n] for n in relevant[j]}}
        tops = set()
        for s, (wt, floor, (lo, hi)) in itertools.product(SHARPEN, itertools.product(WEIGHTS, FLOORS, LOW_HIGH)):
            fused, _ = first(x, s, wt * gate(best, lo, hi, floor))
            tops |= set(np.argsort(-fused, kind="stable")[:cfg.rerank_depth].tolist())
        tops = np.array(sorted(tops), dtype=np.int64)
        second = ranker.rerank_signals(cand[tops], p.positive_text) if len(tops) else {}
        x["second"] = {name: dict(zip(tops.tolist(), v.tolist())) for name, v in second.items()}
        out.append(x)
        if j % 100 == 0:
            print(f"  prepared {j + 1}/{len(parsed)}", flush=True)
    return out


def first(x: dict, sharpen: float, w_tags: float) -> tuple[np.ndarray, FusionWeights]:
    signals = {**x["sig"], "tags": x["tags"][sharpen]}
    w = replace(FusionWeights(), tags=0.0)
    object.__setattr__(w, "tags", w_tags)  # as Ranker.effective: not checked again
    return first_stage(signals, w), w


def ranks(data: list[dict], sharpen: float, weight: float, floor: float, low: float, high: float,
          depth: int = 10) -> np.ndarray:
    out = []
    for x in data:
        fused, w = first(x, sharpen, weight * gate(x["best"], low, high, floor))
        signals = {**x["sig"], "tags": x["tags"][sharpen]}
        top = np.argsort(-fused, kind="stable")[:depth]
        total = stage_total(signals, w)
        for name in ("likelihood", "match"):
            if name in x["second"] and getattr(w, name):
                values = np.array([x["second"][name].get(int(t), np.nan) for t in top])
                fused = fused + relative_part(len(fused), top, values, getattr(w, name), total)
        order = x["cand"][np.argsort(-fused, kind="stable")]
        hit = np.flatnonzero(np.isin(order, list(x["rel"])))
        out.append(hit[0] + 1 if len(hit) else 10**6)
    return np.array(out)


def recall(r: np.ndarray) -> dict:
    return {f"R@{k}": round(100 * float((r <= k).mean()), 2) for k in (1, 5, 10)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="Flickr8k folder")
    ap.add_argument("--work", required=True, help="where the two indexes and the cache go")
    ap.add_argument("--train-images", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(args.work)
    split = load_flickr8k(Path(args.data), "train")
    files, caps = split.files[:args.train_images], split.captions[:args.train_images]
    folder = work / "train_images"
    folder.mkdir(parents=True, exist_ok=True)
    for f, path in zip(files, split.paths[:args.train_images]):
        if not (folder / f).exists():
            (folder / f).symlink_to(Path(path).resolve())
    queries_file, ood_images = named_set("ood")
    qs = read_queries(queries_file)
    tune = [k for k, s in enumerate(qs.splits) if s == "tune"]
    sets = {
        "train": (build(folder, work / "train_index"), [c[0] for c in caps], [{f} for f in files]),
        "ood_tune": (build(ood_images, work / "ood_index"), [qs.texts[k] for k in tune],
                     [set(qs.relevant[k]) for k in tune]),
    }
    data = {}
    for name, (engine, texts, relevant) in sets.items():
        print(f"{name}: {len(texts)} queries", flush=True)
        data[name] = prepare(engine, texts, relevant)
    rows = []
    for sharpen, weight, floor, (low, high) in itertools.product(SHARPEN, WEIGHTS, FLOORS, LOW_HIGH):
        res = {name: recall(ranks(d, sharpen, weight, floor, low, high)) for name, d in data.items()}
        rows.append({"sharpen": sharpen, "weight": weight, "floor": floor, "low": low, "high": high, **res})
    base = max(r["train"]["R@1"] for r in rows if r["weight"] == 0.0)  # the same for every gate and sharpening
    allowed = [r for r in rows if r["train"]["R@1"] >= base]
    best = max(allowed, key=lambda r: (r["ood_tune"]["R@1"], r["ood_tune"]["R@5"] + r["ood_tune"]["R@10"],
                                       r["train"]["R@1"], -r["weight"]))
    (work / "sweep.json").write_text(json.dumps({"rows": rows, "train_without_tags_R@1": base, "chosen": best},
                                                indent=1))
    for r in rows:
        if r["weight"] in (0.0, best["weight"]) or r is best:
            print(json.dumps(r))
    print("chosen:", json.dumps(best))


if __name__ == "__main__":
    main()
