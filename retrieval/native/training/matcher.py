"""``pixquery train matcher``: train the match head (:mod:`retrieval.native.matcher`) on Flickr8k train.

Each step takes ``batch_size`` train captions; for each, its own image and ``negatives`` images drawn
from the ``hard_pool`` images that the joint encoder ranks highest for it (its own image excluded),
and the loss is the cross-entropy of the softmax over those 1 + ``negatives`` match logits against
the own image (a listwise loss, as the head is used: to re-order the joint encoder's best guesses).
Inputs are frozen and computed once: the scorer's memories of the train images (from the cached
grids) and the MiniLM token states of the train captions. AdamW, linear warm-up then cosine decay,
a fixed number of steps, seeded. Only the train split produces gradients; the dev split is measured
at the end (the log's ``dev``), never used to choose anything.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from retrieval.native.matcher import MatchHead, MatcherConfig, save_matcher, text_token_states
from retrieval.errors import InputError
from retrieval.native.training.data import Split, load_flickr8k
from retrieval.native.training.features import grid_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerMemories:
    """The scorer whose memories the head learns to read (a native captioner; the caller loads it, so
    this package needs nothing of captioning/): its name and weights' sha256 (recorded in the head's
    file) and its memory of a grid, (B, 1280, 7, 7) -> (B, S, D)."""

    name: str
    sha256: str
    encode: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TrainMatcherConfig:
    data: Path
    out: Path
    cache_dir: Path
    encoder: str = "effl0-minilm-v1"  # native joint encoder heads that choose the hard negatives
    steps: int = 3000
    batch_size: int = 24  # captions per step; each brings 1 + negatives images
    negatives: int = 7
    hard_pool: int = 16
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "negatives", "hard_pool"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.negatives > self.hard_pool:
            raise InputError(f"negatives ({self.negatives}) cannot exceed hard_pool ({self.hard_pool})")


@dataclass
class _SplitInputs:
    memory: torch.Tensor  # (N, S, D) float16: the scorer's memory of each image
    tokens: torch.Tensor  # (M, MAX_TOKENS, 384) float16: each caption's token states
    mask: torch.Tensor  # (M, MAX_TOKENS) bool
    owner: np.ndarray  # (M,) image index of each caption
    hard: np.ndarray  # (M, hard_pool) the joint encoder's best other images for each caption


def _inputs(split: Split, cfg: TrainMatcherConfig, memory_of: Callable[[torch.Tensor], torch.Tensor],
            encoder) -> _SplitInputs:  # noqa: ANN001 - NativeEncoder
    grid = grid_features(split.paths, cfg.cache_dir, torch.device("cpu"), tower=encoder.image_tower)
    memories, images = [], []
    with torch.inference_mode():
        for start in range(0, len(grid), 200):
            g = torch.from_numpy(np.asarray(grid[start:start + 200], dtype=np.float32))
            memories.append(memory_of(g).half())
            images.append(encoder.encode_grid(g))
    texts = [c for caps in split.captions for c in caps]
    owner = np.array([i for i, caps in enumerate(split.captions) for _ in caps])
    with torch.inference_mode():
        tokens, mask, pooled = text_token_states(encoder.text_tower, texts)
        queries = encoder.encode_text_features(pooled)  # the same as encode_texts, without a second pass
    image_vecs = np.concatenate(images)
    pool = min(cfg.hard_pool, len(image_vecs) - 1)  # a tiny split has fewer other images
    if pool < 1:
        raise InputError(f"the {split.name} split needs at least two images")
    hard = np.zeros((len(texts), pool), dtype=np.int64)
    for start in range(0, len(texts), 2048):  # (2048, N) at a time, not (M, N)
        sims = queries[start:start + 2048] @ image_vecs.T
        sims[np.arange(len(sims)), owner[start:start + 2048]] = -np.inf
        best = np.argpartition(-sims, pool - 1, axis=1)[:, :pool]
        hard[start:start + len(sims)] = np.take_along_axis(
            best, np.argsort(-np.take_along_axis(sims, best, 1), axis=1), 1)
    return _SplitInputs(torch.cat(memories), torch.from_numpy(tokens), torch.from_numpy(mask), owner, hard)


def _listwise_logits(head: MatchHead, inp: _SplitInputs, rows: np.ndarray, images: np.ndarray) -> torch.Tensor:
    """Match logits of captions ``rows`` (B,) against ``images`` (B, K) -> (B, K)."""
    b, k = images.shape
    width = int(inp.mask[rows].sum(1).max())  # trim the padding every caption of the batch has
    tok = inp.tokens[rows, :width].repeat_interleave(k, 0)
    mask = inp.mask[rows, :width].repeat_interleave(k, 0)
    return head(tok, mask, inp.memory[torch.from_numpy(images.reshape(-1))]).view(b, k)


@torch.inference_mode()
def evaluate_matcher(head: MatchHead, inp: _SplitInputs, depth: int = 10) -> dict:
    """How often the head alone puts a caption's own image first among its own image and the
    joint encoder's ``depth - 1`` best others (chance: 1 / depth), in %."""
    head.eval()
    depth = min(depth, inp.hard.shape[1] + 1)
    hits = 0
    for start in range(0, len(inp.owner), 64):
        rows = np.arange(start, min(start + 64, len(inp.owner)))
        images = np.concatenate([inp.owner[rows, None], inp.hard[rows, :depth - 1]], 1)
        hits += int((_listwise_logits(head, inp, rows, images).argmax(1) == 0).sum())
    return {"own_first_of": depth, "own_first_pct": round(100 * hits / len(inp.owner), 2)}


def train_matcher(cfg: TrainMatcherConfig, scorer: ScorerMemories) -> dict:
    """Train on ``scorer``'s memories, save to ``cfg.out`` (and a JSON log beside it) -> the log."""
    from retrieval.native.model import NativeEncoder

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    encoder = NativeEncoder(cfg.encoder)
    train = _inputs(load_flickr8k(cfg.data, "train"), cfg, scorer.encode, encoder)
    dev = _inputs(load_flickr8k(cfg.data, "dev"), cfg, scorer.encode, encoder)
    log.info("inputs ready in %.0f s: %d train captions over %d images", time.time() - t0,
             len(train.owner), len(train.memory))
    if cfg.negatives > train.hard.shape[1]:
        raise InputError(f"{cfg.negatives} negatives per caption, but the train split has only "
                         f"{train.hard.shape[1] + 1} images")

    head = MatchHead(MatcherConfig(memory_dim=train.memory.shape[2], memory_len=train.memory.shape[1],
                                   d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                   dropout=cfg.dropout))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        warm = min(1.0, step / max(1, cfg.warmup_steps))
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))

    rng = np.random.default_rng(cfg.seed)
    history, recent = [], []
    head.train()
    for step in tqdm(range(1, cfg.steps + 1), desc="training the match head", unit="step",
                     disable=not cfg.progress):
        rows = rng.integers(0, len(train.owner), cfg.batch_size)
        picks = np.stack([rng.choice(train.hard.shape[1], cfg.negatives, replace=False) for _ in rows])
        images = np.concatenate([train.owner[rows, None], np.take_along_axis(train.hard[rows], picks, 1)], 1)
        logits = _listwise_logits(head, train, rows, images)
        loss = nn.functional.cross_entropy(logits, torch.zeros(len(rows), dtype=torch.long))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        recent.append((loss.item(), float((logits.argmax(1) == 0).float().mean())))
        if step % 100 == 0 or step == cfg.steps:
            loss_mean, acc = np.mean(recent, axis=0)
            history.append({"step": step, "loss": round(float(loss_mean), 4), "own_first_pct": round(100 * acc, 2)})
            log.info("step %d: loss %.4f, own image first in %.1f%% of train lists", step, loss_mean, 100 * acc)
            recent = []
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "scorer": scorer.name, "scorer_sha256": scorer.sha256, "encoder": cfg.encoder,
              "history": history, "minutes": round((time.time() - t0) / 60, 1)}
    head.half().float()  # measure what the fp16 file will hold
    result["dev"] = evaluate_matcher(head, dev)
    log.info("dev: own image first of 10 for %.2f%% of captions", result["dev"]["own_first_pct"])
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    save_matcher(head, cfg.out, {k: result[k] for k in ("scorer", "scorer_sha256", "encoder", "dev")})
    cfg.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result
