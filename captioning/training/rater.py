"""``pixquery train rater``: a shallow decoder that rates query text against a scorer's stored memories,
distilled from that scorer on Flickr8k train.

Fused ranking asks the scorer (a caption decoder) how likely it is to have written the query for each of
its best candidates: log P(query | image), from the image's stored decoder memory. At a million images
that second stage is the largest part of a fused query after the vector search (docs/BENCHMARKS.md).
A rater is a decoder with fewer layers that reads the same memories:

* its memory part (grid projection, positions, LayerNorm) is the scorer's, copied and frozen, so the
  memories an index stores, and the match head trained on them, stay valid;
* it starts from the scorer's token and position embeddings, its first ``layers`` blocks and its output;
* it learns from the train captions (cross-entropy with label smoothing) and from the scorer's own
  next-word distributions on them (KL divergence, weight ``distill``).

After every epoch the dev split is measured (never used for gradients): teacher-forced cross-entropy,
how often a dev caption's own image is rated first among ten (nine drawn at random, fixed seed), and the
correlation of the rater's log-likelihoods with the scorer's on those lists. The epoch with the lowest dev
cross-entropy is kept. AdamW, linear warm-up then cosine decay, seeded.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from captioning.model import CaptionDecoder, DecoderConfig, sequence_log_likelihood
from captioning.native import save_captioner
from captioning.tokenizer import WordTokenizer
from captioning.training.captioner import _targets
from retrieval.errors import InputError
from retrieval.native.training.data import load_flickr8k
from retrieval.native.training.features import grid_features

log = logging.getLogger(__name__)

MEMORY_PARTS = ("grid_proj.", "row_pos", "col_pos", "ln_memory.")  # what makes a memory: the scorer's, frozen
LIST_SIZE = 10  # dev lists: a caption's own image and nine others


@dataclass
class TrainRaterConfig:
    data: Path
    out: Path
    cache_dir: Path
    layers: int = 1  # decoder blocks kept (the scorer's first ones)
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    distill: float = 0.5  # weight of the KL to the scorer's next-word distributions (1 - distill: the references)
    dropout: float = 0.1
    dev_lists: int = 500  # dev captions rated against their own image and nine others
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "epochs", "batch_size", "dev_lists"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.distill <= 1.0:
            raise InputError(f"distill must be in [0, 1], got {self.distill}")


def student_of(scorer: CaptionDecoder, layers: int, dropout: float) -> CaptionDecoder:
    """A decoder with the scorer's first ``layers`` blocks and everything else of the scorer; its memory
    part frozen, so ``student.encode(grid)`` is the scorer's memory."""
    if not 1 <= layers <= scorer.cfg.n_layers:
        raise InputError(f"a rater keeps 1 to {scorer.cfg.n_layers} of the scorer's layers, not {layers}")
    student = CaptionDecoder(DecoderConfig(**{**asdict(scorer.cfg), "n_layers": layers, "dropout": dropout}))
    kept = {k: v for k, v in scorer.state_dict().items()
            if not k.startswith("blocks.") or int(k.split(".")[1]) < layers}
    student.load_state_dict(kept)
    for name, p in student.named_parameters():
        p.requires_grad_(not name.startswith(MEMORY_PARTS))
    return student


@torch.no_grad()
def evaluate_rater(model: CaptionDecoder, scorer: CaptionDecoder, memory: torch.Tensor, targets: torch.Tensor,
                   owner: np.ndarray, pad_id: int, lists: int, seed: int = 1) -> dict:
    """Dev cross-entropy, own image rated first among ten, and agreement with the scorer (see module doc)."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(targets), 250):
        y = targets[s:s + 250]
        y = y[:, :int((y != pad_id).sum(1).max())]
        logits = model.decode(memory[owner[s:s + 250]], y[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                       ignore_index=pad_id, reduction="sum"))
        count += int((y[:, 1:] != pad_id).sum())
    rng = np.random.default_rng(seed)
    first = {"rater": 0, "scorer": 0}
    mine, theirs = [], []
    n_images = len(memory)
    picked = rng.choice(len(targets), min(lists, len(targets)), replace=False)
    for j in picked.tolist():
        others = rng.choice(np.setdiff1d(np.arange(n_images), [owner[j]]), min(LIST_SIZE, n_images) - 1,
                            replace=False)
        images = np.concatenate([[owner[j]], others])
        y = targets[j:j + 1, :int((targets[j] != pad_id).sum())].repeat(len(images), 1)
        for name, m, out in (("rater", model, mine), ("scorer", scorer, theirs)):
            ll = sequence_log_likelihood(m, memory[images], y, pad_id)
            first[name] += int(ll.argmax() == 0)
            out.append(ll.numpy())
    corr = float(np.corrcoef(np.concatenate(mine), np.concatenate(theirs))[0, 1]) if len(mine) else float("nan")
    return {"cross_entropy": round(total / max(1, count), 4),
            "own_first_pct": round(100 * first["rater"] / max(1, len(picked)), 2),
            "scorer_own_first_pct": round(100 * first["scorer"] / max(1, len(picked)), 2),
            "correlation_with_scorer": round(corr, 4), "lists": int(len(picked))}


def _memories(scorer: CaptionDecoder, grid: np.ndarray, batch: int = 500) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([scorer.encode(torch.from_numpy(np.asarray(grid[s:s + batch], dtype=np.float32)))
                          for s in range(0, len(grid), batch)]).clone()


def train_rater(cfg: TrainRaterConfig, scorer: CaptionDecoder, tok: WordTokenizer, scorer_name: str,
                scorer_sha256: str) -> dict:
    """Distil a rater from ``scorer`` (float32, eval mode), save it to ``cfg.out`` (a native captioner file
    that records the scorer it rates for) with a JSON log beside it -> the log."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    scorer = scorer.float().eval()
    train, dev = load_flickr8k(cfg.data, "train"), load_flickr8k(cfg.data, "dev")
    device = torch.device("cpu")
    memory = _memories(scorer, grid_features(train.paths + dev.paths, cfg.cache_dir, device))  # (N, S, D)
    mem_train, mem_dev = memory[:len(train.paths)], memory[len(train.paths):]
    max_words = scorer.cfg.max_len - 2
    targets, owner = _targets(train, tok, max_words)
    dev_targets, dev_owner = _targets(dev, tok, max_words)
    student = student_of(scorer, cfg.layers, cfg.dropout)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    total = cfg.epochs * math.ceil(len(targets) / cfg.batch_size)

    def lr_at(step: int) -> float:
        return min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history, best, best_state = [], None, None
    for epoch in range(1, cfg.epochs + 1):
        student.train()
        perm = np.random.permutation(len(targets))
        run, seen = 0.0, 0
        for s in tqdm(range(0, len(perm), cfg.batch_size), desc=f"rater epoch {epoch}/{cfg.epochs}", unit="step",
                      disable=not cfg.progress):
            idx = perm[s:s + cfg.batch_size]
            y = targets[idx]
            y = y[:, :int((y != tok.pad_id).sum(1).max())]
            memory = mem_train[owner[idx]]
            logits = student.decode(memory, y[:, :-1])  # (B, L - 1, V)
            real = y[:, 1:] != tok.pad_id
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                   ignore_index=tok.pad_id, label_smoothing=cfg.label_smoothing)
            if cfg.distill:
                with torch.no_grad():
                    teacher = torch.log_softmax(scorer.decode(memory, y[:, :-1]), -1)
                kl = (teacher.exp() * (teacher - torch.log_softmax(logits, -1))).sum(-1)
                loss = (1 - cfg.distill) * loss + cfg.distill * (kl * real).sum() / real.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            run += loss.item() * len(idx)
            seen += len(idx)
        dev_report = evaluate_rater(student, scorer, mem_dev, dev_targets, dev_owner, tok.pad_id, cfg.dev_lists)
        history.append({"epoch": epoch, "train_loss": round(run / seen, 4), **dev_report,
                        "seconds": round(time.time() - t0, 1)})
        log.info("epoch %d: %s", epoch, history[-1])
        if best is None or dev_report["cross_entropy"] < best[1]["cross_entropy"]:
            best = (epoch, dev_report)
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    student.load_state_dict(best_state)
    meta = {"rates_for": scorer_name, "scorer_sha256": scorer_sha256,
            "trained_on": f"flickr8k train split ({len(train.files)} images, {len(targets)} captions)",
            "model_choice": f"epoch {best[0]} of {cfg.epochs} by dev cross-entropy", "dev": best[1],
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "minutes": round((time.time() - t0) / 60, 1), "torch": str(torch.__version__)}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    save_captioner(student.eval(), tok, cfg.out, meta)
    cfg.out.with_suffix(".json").write_text(json.dumps({**meta, "history": history}, indent=2) + "\n")
    return meta
