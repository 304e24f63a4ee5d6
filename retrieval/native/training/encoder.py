"""``pixquery train encoder``: contrastive (InfoNCE) training of the native heads on frozen towers.

Features of both towers are computed once and cached (retrieval/native/features.py); an epoch over
the 6,000 Flickr8k training images then takes about half a second on 2 CPU cores. Each ensemble
member is trained on its own seed; dev recall is measured after every epoch and each member keeps
its best epoch (the dev split is used for model choice only, never for gradient steps).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from retrieval.metrics import best_ranks_multi, ranks_from_scores, recall_report
from retrieval.native.training.data import Split, load_flickr8k
from retrieval.native.training.features import grid_features, text_features
from retrieval.native.model import Heads, HeadsConfig, save_heads, stack_members

log = logging.getLogger(__name__)


@dataclass
class TrainEncoderConfig:
    data: Path
    out: Path
    cache_dir: Path
    device: str = "cpu"
    embed_dim: int = 256
    members: int = 1
    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    temperature: float = 0.07
    flip_augment: bool = False  # also cache horizontally flipped train images and sample them
    seed: int = 0
    progress: bool = True


@dataclass
class _Features:
    views: list[torch.Tensor]  # pooled image features (N, 1280), one tensor per augmentation view
    text: torch.Tensor  # (M, 384) caption features
    owner: np.ndarray  # (M,) image index of each caption


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _pooled(grid: np.ndarray, chunk: int = 500) -> torch.Tensor:
    out = [torch.from_numpy(np.asarray(grid[i:i + chunk], dtype=np.float32)).mean(dim=(2, 3))
           for i in range(0, len(grid), chunk)]
    return torch.cat(out)  # (N, 1280)


def _features(split: Split, cfg: TrainEncoderConfig, flips: bool) -> _Features:
    device = torch.device(cfg.device)
    views = [_pooled(grid_features(split.paths, cfg.cache_dir, device))]
    if flips:
        views.append(_pooled(grid_features(split.paths, cfg.cache_dir, device, flip=True)))
    texts = [c for caps in split.captions for c in caps]
    owner = np.array([i for i, caps in enumerate(split.captions) for _ in caps])
    return _Features(views, torch.from_numpy(text_features(texts, cfg.cache_dir, device)), owner)


@torch.no_grad()
def evaluate_heads(heads: Heads, feats: _Features) -> dict:
    """Dev recall of ``heads`` (percentages) on cached features."""
    heads.eval()
    iv = heads.embed_pooled(feats.views[0]).numpy()  # (N, D)
    tv = heads.embed_text(feats.text).numpy()  # (M, D)
    sims = tv @ iv.T  # (M, N)
    return {
        "text_to_image": recall_report(ranks_from_scores(sims, feats.owner)),
        "image_to_text": recall_report(best_ranks_multi(sims.T, feats.owner), medr=False),
    }


def _score(report: dict) -> float:
    t2i = report["text_to_image"]
    return t2i["R@1"] + t2i["R@5"] + t2i["R@10"]


def _train_member(cfg: TrainEncoderConfig, seed: int, train: _Features, dev: _Features) -> tuple[Heads, list]:
    _seed_everything(seed)
    heads = Heads(HeadsConfig(embed_dim=cfg.embed_dim, init_temperature=cfg.temperature))
    heads.logit_scale.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    n_images = len(train.views[0])
    steps = (n_images + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.1)
    captions_of = [np.flatnonzero(train.owner == i) for i in range(n_images)]
    history, best, best_state = [], -1.0, None
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train encoder (seed {seed})", unit="epoch", disable=not cfg.progress)
    for epoch in bar:
        heads.train()
        order, total = torch.randperm(n_images), 0.0
        for start in range(0, n_images, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]  # (B,)
            view = train.views[random.randrange(len(train.views))]
            cap = torch.tensor([int(random.choice(captions_of[int(i)])) for i in idx])  # (B,) one caption each
            iv = heads.embed_pooled(view[idx])  # (B, D)
            tv = heads.embed_text(train.text[cap])  # (B, D)
            logits = heads.logit_scale.exp() * iv @ tv.T  # (B, B)
            labels = torch.arange(len(idx))
            loss = (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        report = evaluate_heads(heads, dev)
        history.append({"seed": seed, "epoch": epoch, "train_loss": round(total / n_images, 5), "dev": report})
        log.info("seed %d epoch %d loss %.4f dev %s", seed, epoch, total / n_images, report["text_to_image"])
        if _score(report) > best:
            best, best_state = _score(report), {k: v.clone() for k, v in heads.state_dict().items()}
    heads.load_state_dict(best_state)
    return heads.eval(), history


def train_encoder(cfg: TrainEncoderConfig) -> dict:
    """Train the heads, write them to ``cfg.out`` with a JSON log beside it; returns the metadata."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    train_split, dev_split = load_flickr8k(cfg.data, "train"), load_flickr8k(cfg.data, "dev")
    log.info("train %d images, dev %d images", len(train_split.files), len(dev_split.files))
    train = _features(train_split, cfg, flips=cfg.flip_augment)
    dev = _features(dev_split, cfg, flips=False)
    members, history = [], []
    for m in range(cfg.members):
        heads, hist = _train_member(cfg, cfg.seed + m, train, dev)
        members.append(heads)
        history += hist
    heads = stack_members(members) if len(members) > 1 else members[0]
    final = evaluate_heads(heads, dev)
    best_epochs = [max((h for h in history if h["seed"] == cfg.seed + m), key=lambda h: _score(h["dev"]))["epoch"]
                   for m in range(cfg.members)]
    meta = {
        "trained_on": f"flickr8k train split ({len(train_split.files)} images)",
        "model_choice": f"best epoch per member by dev R@1+R@5+R@10: {best_epochs}",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "dev": final,
        "seconds": round(time.time() - t0, 1),
        "torch": str(torch.__version__),
    }
    save_heads(heads, cfg.out, meta)
    cfg.out.with_suffix(".json").write_text(json.dumps({**meta, "history": history}, indent=2) + "\n")
    return meta
