"""``pixquery train confidence``: fit the caption confidence on Flickr8k train, check it on dev.

For every image of a split the default captioner writes its caption (beam 3, as indexing does), and the
four measurements of captioning/confidence.py are taken with the shipped encoder, the tagger and the
captioner itself. A caption counts as **good** when its CIDEr-D against the image's five human captions
(document frequencies of the split's references) is at least ``good_cider`` (default 0.5, about the
median on dev). A logistic regression predicting "good" is fitted on train only (once with all four
measurements, once without the likelihood); the threshold is the lowest confidence (on a 0.05 grid)
at which the train captions above it are good at least ``target`` of the time (default 0.6). The report
gives, on train and dev, how often a caption marked confident is good against one marked uncertain,
and their mean CIDEr-D.
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

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


@dataclass
class TrainConfidenceConfig:
    data: Path
    out: Path
    cache_dir: Path
    captioner: str = DEFAULTS["captioner"]
    good_cider: float = 0.5
    target: float = 0.6  # share of good captions among those marked confident, on train
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


def train_confidence(cfg: TrainConfidenceConfig) -> dict:
    t0 = time.time()
    device = torch.device(cfg.device)
    encoder = NativeEncoder(device=device)
    captioner = NativeCaptioner(cfg.captioner.removeprefix("native:"), device=device)
    tagger = ImageNetTagger(text_tower=encoder.text_tower, device=device)
    data = {}
    for name in ("train", "dev"):
        split = load_flickr8k(cfg.data, name)
        grid = grid_features(split.paths, cfg.cache_dir, device)
        captions, feats = caption_split(split, grid, cfg, encoder, captioner, tagger)
        cider = cider_per_image(split, captions)
        data[name] = (split, captions, feats, cider, cider >= cfg.good_cider)
    _, _, feats, cider, good = data["train"]
    x_full = np.stack([feats[f] for f in FEATURES], axis=1)
    full = fit_logistic(x_full, good.astype(np.float64), FEATURES)
    fallback = fit_logistic(np.stack([feats[f] for f in WITHOUT_LIKELIHOOD], axis=1), good.astype(np.float64),
                            WITHOUT_LIKELIHOOD)
    p_train = full(x_full)
    threshold = next((t for t in THRESHOLDS if good[p_train >= t].mean() >= cfg.target
                      and (p_train >= t).sum() >= 50), THRESHOLDS[-1])
    report = {}
    for name, (split, captions, f, c, g) in data.items():
        p = full(np.stack([f[k] for k in FEATURES], axis=1))
        p_fb = fallback(np.stack([f[k] for k in WITHOUT_LIKELIHOOD], axis=1))
        report[name] = {"model": split_report(p, g, c, threshold),
                        "without_likelihood": split_report(p_fb, g, c, threshold),
                        "by_feature_auc": {k: round(auc(f[k], g), 4) for k in FEATURES},
                        "auc": round(auc(p, g), 4)}
    meta = {"captioner": captioner.info.to_dict(), "encoder": encoder.info.to_dict(), "tagger": tagger.info.to_dict(),
            "good_cider": cfg.good_cider, "target": cfg.target, "threshold": threshold,
            "coefficients": {"full": full.to_dict(), "without_likelihood": fallback.to_dict()},
            "report": report, "minutes": round((time.time() - t0) / 60, 2),
            "note": "fitted on Flickr8k train captions of the captioner (which was trained on those images); "
                    "dev reported"}
    save_confidence(cfg.out, full, fallback, threshold, meta)
    cfg.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    dump = cfg.out.with_suffix(".captions.json")
    dump.write_text(json.dumps({name: {"files": d[0].files, "captions": d[1], "cider": d[3].round(4).tolist(),
                                       **{k: np.round(v, 5).tolist() for k, v in d[2].items()}}
                                for name, d in data.items()}))
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
