"""``pixquery train confidence``: fit the caption confidence on Flickr8k train only; report it on all of dev.

For every image of a split the default captioner writes its caption (beam 3, as indexing does), and the
four measurements of captioning/confidence.py are taken with the shipped encoder, the tagger and the
captioner itself. A caption counts as **good** when its CIDEr-D against the image's five human captions
(document frequencies of the split's references) is at least ``good_cider`` (default 0.5: a fixed,
round definition of "good", not fitted).

Every fitted number comes from **train**; dev is only reported on (all 1,000 images), never fitted on.

* The logistic regression is fitted on train (once with all four measurements, once without the
  likelihood): its coefficients, its standardisation and its probabilities.
* Train captions are of images the captioner (and the encoder) learned from: most of them are good and
  every measurement is inflated there, so the probabilities are optimistic on new photos. No held-out
  data corrects that (a cross-fitted train model sees the same inflated captions; dev is not used), so
  the stored confidence is the train-fitted probability, said to be optimistic, and the decision rule is
  fixed in advance rather than tuned: a caption is **confident** when its train-fitted probability of
  being good is at least 0.5 (more likely good than not). The report gives train in-sample, train
  5-fold cross-fitted (how much of the fit is over-fitting, as opposed to captioner optimism) and dev.

The captions and measurements are kept beside the output (``.captions.json``) and reused by a later run
with the same models and data (captioning 7,000 images takes most of an hour on 2 cores).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioning.captioner import DecodeOptions
from captioning.confidence import (
    FEATURES, WITHOUT_LIKELIHOOD, fit_logistic, likelihood_per_word, measure, save_confidence,
)
from captioning.metrics import CiderD, ptb_tokenize_batch
from captioning.native import NativeCaptioner
from retrieval.native.model import NativeEncoder
from retrieval.native.tagger import ImageNetTagger
from retrieval.native.training.data import Split, load_flickr8k
from retrieval.native.training.features import grid_features
from retrieval.shipped import DEFAULTS

THRESHOLD = 0.5  # fixed in advance: a caption more likely good than not (under the train fit) is confident
FOLDS = 5  # train cross-fitting, for the report only


@dataclass
class TrainConfidenceConfig:
    data: Path
    out: Path
    cache_dir: Path
    captioner: str = DEFAULTS["captioner"]
    good_cider: float = 0.5
    batch: int = 64
    device: str = "cpu"
    progress: bool = True


def measure_grid(grid: torch.Tensor, captions: list[str], encoder: NativeEncoder, captioner: NativeCaptioner,
                 tagger: ImageNetTagger) -> dict[str, np.ndarray]:
    """The measurements of ``captions`` against their (B, 1280, 7, 7) grid, as indexing takes them."""
    caption_vecs, units = encoder.encode_texts_pooled(captions)
    classes = tagger.classify_grid(grid)
    return measure(encoder.encode_grid(grid), caption_vecs, units, tagger.concepts(classes),
                   np.array([c[0][1] if c else 0.0 for c in classes]), likelihood_per_word(captioner, grid, captions))


def caption_split(split: Split, grid: np.ndarray, cfg: TrainConfidenceConfig, encoder: NativeEncoder,
                  captioner: NativeCaptioner, tagger: ImageNetTagger) -> tuple[list[str], dict[str, np.ndarray]]:
    captions, parts = [], []
    for start in tqdm(range(0, len(split.files), cfg.batch), desc=f"captioning {split.name}", unit="batch",
                      disable=not cfg.progress):
        g = torch.from_numpy(np.asarray(grid[start:start + cfg.batch], dtype=np.float32))
        caps = captioner.caption_grid(g, DecodeOptions())
        captions += caps
        parts.append(measure_grid(g, caps, encoder, captioner, tagger))
    return captions, {f: np.concatenate([p[f] for p in parts]) for f in FEATURES}


def cider_per_image(split: Split, captions: list[str]) -> np.ndarray:
    refs = {i: ptb_tokenize_batch(c) for i, c in enumerate(split.captions)}
    scorer = CiderD(refs)
    return np.array(scorer.scores(list(range(len(captions))), ptb_tokenize_batch(captions)))


def split_report(p: np.ndarray, good: np.ndarray, cider: np.ndarray, threshold: float) -> dict:
    sure = p >= threshold
    def part(mask: np.ndarray) -> dict:
        return {"captions": int(mask.sum()), "good": round(float(good[mask].mean()), 4) if mask.any() else None,
                "mean_cider": round(float(cider[mask].mean()), 4) if mask.any() else None}
    return {"confident": part(sure), "uncertain": part(~sure), "all": part(np.ones_like(sure))}


def _measured(cfg: TrainConfidenceConfig, encoder: NativeEncoder, captioner: NativeCaptioner,
              tagger: ImageNetTagger) -> dict:
    """{split: {"files", "captions", "cider", <measurement>: [...]}} computed, or read back from an earlier
    run of the same models on the same data."""
    dump = cfg.out.with_suffix(".captions.json")
    models = {"captioner": captioner.info.fingerprint, "encoder": encoder.info.fingerprint,
              "tagger": tagger.info.fingerprint}
    splits = {name: load_flickr8k(cfg.data, name) for name in ("train", "dev")}
    if dump.is_file():
        old = json.loads(dump.read_text())
        if old.get("models") == models and all(old.get(n, {}).get("files") == s.files for n, s in splits.items()):
            return old
    out: dict = {"models": models}
    for name, split in splits.items():
        grid = grid_features(split.paths, cfg.cache_dir, torch.device(cfg.device))
        captions, feats = caption_split(split, grid, cfg, encoder, captioner, tagger)
        out[name] = {"files": split.files, "captions": captions,
                     "cider": cider_per_image(split, captions).round(5).tolist(),
                     **{k: np.round(v, 6).tolist() for k, v in feats.items()}}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    dump.write_text(json.dumps(out))
    return out


def train_confidence(cfg: TrainConfidenceConfig) -> dict:
    t0 = time.time()
    device = torch.device(cfg.device)
    encoder = NativeEncoder(device=device)
    captioner = NativeCaptioner(cfg.captioner.removeprefix("native:"), device=device)
    tagger = ImageNetTagger(text_tower=encoder.text_tower, device=device)
    data = _measured(cfg, encoder, captioner, tagger)

    def arrays(part: dict, features: tuple[str, ...], rows=slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.stack([np.asarray(part[f])[rows] for f in features], axis=1)
        cider = np.asarray(part["cider"])[rows]
        return x, cider >= cfg.good_cider, cider

    models = {}
    for key, features in (("full", FEATURES), ("without_likelihood", WITHOUT_LIKELIHOOD)):
        x, good, _ = arrays(data["train"], features)
        models[key] = fit_logistic(x, good.astype(np.float64), features)
    report: dict = {"train": {}, "train_cross_fitted": {}, "dev": {}}
    for key, features in (("full", FEATURES), ("without_likelihood", WITHOUT_LIKELIHOOD)):
        x, good, cider = arrays(data["train"], features)
        folds = np.arange(len(good)) % FOLDS
        p_oof = np.zeros(len(good))
        for f in range(FOLDS):
            fit = fit_logistic(x[folds != f], good[folds != f].astype(np.float64), features)
            p_oof[folds == f] = fit(x[folds == f])
        for name, part, p in (("train", data["train"], None), ("train_cross_fitted", data["train"], p_oof),
                              ("dev", data["dev"], None)):
            xs, gs, cs = arrays(part, features)
            p = models[key](xs) if p is None else p
            report[name][key] = {**split_report(p, gs, cs, THRESHOLD), "auc": round(auc(p, gs), 4),
                                 "mean_probability": round(float(p.mean()), 4), "share_good": round(float(gs.mean()), 4)}
    for name in ("train", "dev"):
        x, good, _ = arrays(data[name], FEATURES)
        report[name]["by_feature_auc"] = {k: round(auc(x[:, i], good), 4) for i, k in enumerate(FEATURES)}
    meta = {"captioner": captioner.info.to_dict(), "encoder": encoder.info.to_dict(), "tagger": tagger.info.to_dict(),
            "good_cider": cfg.good_cider, "threshold": THRESHOLD,
            "coefficients": {k: {"fitted_on_train": m.to_dict()} for k, m in models.items()},
            "report": report, "minutes": round((time.time() - t0) / 60, 2),
            "note": "every fitted number (standardisation, coefficients) from Flickr8k train only; threshold 0.5 "
                    "fixed in advance; dev (all 1,000 images) only reported. Train captions are of images the "
                    "captioner learned from, so the probabilities are optimistic on new photos"}
    save_confidence(cfg.out, models["full"], models["without_likelihood"], THRESHOLD, meta)
    cfg.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a good caption scores above a bad one."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = label.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
