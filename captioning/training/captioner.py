"""``pixquery train captioner``: cross-entropy training of the attention decoder on cached grids.

The image tower is frozen, so its 7x7 grid features are computed once and cached
(retrieval/native/features.py, shared with the encoder's training); an epoch then costs only the
decoder. Teacher forcing with label smoothing, AdamW, linear warm-up then cosine decay, seeded.
After every epoch the teacher-forced cross-entropy on the dev captions is measured and the epoch
with the lowest dev loss is kept; the kept model's dev captions (default beam) are then scored
with BLEU/CIDEr/ROUGE-L. Only the train split ever produces gradients.
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
from torch import nn
from tqdm import tqdm

from captioning.captioner import DecodeOptions
from captioning.model import CaptionDecoder, DecoderConfig
from captioning.native import decode_captions, save_captioner
from captioning.tokenizer import WordTokenizer, clean_words
from retrieval.native.training.data import Split, load_flickr8k
from retrieval.native.training.features import grid_features

log = logging.getLogger(__name__)


@dataclass
class TrainCaptionerConfig:
    data: Path
    out: Path
    cache_dir: Path
    device: str = "cpu"
    d_model: int = 384
    n_layers: int = 3
    n_heads: int = 6
    d_ff: int = 1536
    dropout: float = 0.3
    max_words: int = 22  # longer training captions are cut
    min_count: int = 5  # vocabulary: words seen at least this often in train captions
    epochs: int = 12
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup_steps: int = 500
    label_smoothing: float = 0.1
    flip_augment: bool = False
    eval_beam: int = 3  # beam for the final dev report (the default of the captioner)
    seed: int = 0
    progress: bool = True


def _targets(split: Split, tok: WordTokenizer, max_words: int) -> tuple[torch.Tensor, np.ndarray]:
    """All captions as a (M, max_words + 2) id matrix (0-padded) and each caption's image index."""
    rows, owner = [], []
    for i, caps in enumerate(split.captions):
        for c in caps:
            ids = tok.encode(" ".join(clean_words(c)), max_words + 2)
            rows.append(ids + [tok.pad_id] * (max_words + 2 - len(ids)))
            owner.append(i)
    return torch.tensor(rows, dtype=torch.long), np.array(owner)


def _grid_batch(grids: list[np.ndarray], view: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    order = np.argsort(idx)  # memmap reads are fastest in file order
    out = np.empty((len(idx),) + grids[0].shape[1:], dtype=np.float32)
    for v in np.unique(view):
        sel = order[view[order] == v]
        out[sel] = grids[v][idx[sel]]
    return torch.from_numpy(out)  # (B, 1280, 7, 7)


@torch.no_grad()
def caption_split(model: CaptionDecoder, tok: WordTokenizer, grid: np.ndarray, beam: int,
                  max_len: int = 20, batch: int = 100, device: torch.device | None = None) -> list[str]:
    """Captions of a cached split's grids with the captioner's default decoding at ``beam``."""
    model.eval()
    options = DecodeOptions(beam_size=beam, max_len=max_len)
    out: list[str] = []
    with torch.inference_mode():
        for s in range(0, len(grid), batch):
            g = torch.from_numpy(np.asarray(grid[s:s + batch], dtype=np.float32)).to(device or "cpu")
            out += decode_captions(model, tok, g, options)
    return out


@torch.no_grad()
def dev_loss(model: CaptionDecoder, grid: np.ndarray, targets: torch.Tensor, owner: np.ndarray,
             pad_id: int, device: torch.device, batch: int = 250) -> float:
    """Mean per-token cross-entropy (no label smoothing) of the reference captions, teacher-forced."""
    model.eval()
    total, tokens = 0.0, 0
    for s in range(0, len(targets), batch):
        y = targets[s:s + batch].to(device)  # (B, L)
        g = torch.from_numpy(np.asarray(grid[owner[s:s + batch]], dtype=np.float32)).to(device)
        logits = model(g, y[:, :-1])  # (B, L-1, V)
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                                   ignore_index=pad_id, reduction="sum"))
        tokens += int((y[:, 1:] != pad_id).sum())
    return total / max(1, tokens)


def evaluate_split(model: CaptionDecoder, tok: WordTokenizer, split: Split, grid: np.ndarray, beam: int,
                   device: torch.device | None = None) -> dict:
    from captioning.metrics import caption_scores

    hyps = caption_split(model, tok, grid, beam, device=device)
    return caption_scores({f: caps for f, caps in zip(split.files, split.captions)}, dict(zip(split.files, hyps)))


def train_captioner(cfg: TrainCaptionerConfig) -> dict:
    t0 = time.time()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    train, dev = load_flickr8k(cfg.data, "train"), load_flickr8k(cfg.data, "dev")
    tok = WordTokenizer.build((" ".join(clean_words(c)) for caps in train.captions for c in caps), cfg.min_count)
    grids = [grid_features(train.paths, cfg.cache_dir, device)]
    if cfg.flip_augment:
        grids.append(grid_features(train.paths, cfg.cache_dir, device, flip=True))
    dev_grid = grid_features(dev.paths, cfg.cache_dir, device)
    targets, owner = _targets(train, tok, cfg.max_words)  # (M, L), (M,)
    dev_targets, dev_owner = _targets(dev, tok, cfg.max_words)
    log.info("vocabulary %d words, %d training captions", len(tok), len(targets))

    mcfg = DecoderConfig(vocab_size=len(tok), d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                         d_ff=cfg.d_ff, dropout=cfg.dropout, max_len=cfg.max_words + 2)
    model = CaptionDecoder(mcfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(targets) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loss_fn = nn.CrossEntropyLoss(ignore_index=tok.pad_id, label_smoothing=cfg.label_smoothing)
    history, best, best_state, best_epoch = [], float("inf"), None, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = np.random.permutation(len(targets))
        run_loss, seen = 0.0, 0
        bar = tqdm(range(0, len(perm), cfg.batch_size), desc=f"captioner epoch {epoch}/{cfg.epochs}",
                   unit="step", disable=not cfg.progress)
        for s in bar:
            idx = perm[s:s + cfg.batch_size]
            view = np.random.randint(len(grids), size=len(idx))
            grid = _grid_batch(grids, view, owner[idx]).to(device)  # (B, 1280, 7, 7)
            y = targets[idx].to(device)  # (B, L)
            length = int((y != tok.pad_id).sum(1).max())
            y = y[:, :length]
            logits = model(grid, y[:, :-1])  # (B, L-1, V)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            run_loss += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{run_loss / seen:.3f}")
        dloss = dev_loss(model, dev_grid, dev_targets, dev_owner, tok.pad_id, device)
        history.append({"epoch": epoch, "train_loss": round(run_loss / seen, 4), "dev_loss": round(dloss, 4),
                        "seconds": round(time.time() - t0, 1)})
        log.info("epoch %d train loss %.4f dev loss %.4f", epoch, run_loss / seen, dloss)
        if best_state is None or dloss < best:
            best, best_epoch = dloss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.with_suffix(".json").write_text(json.dumps({"history": history}, indent=2) + "\n")
    model.load_state_dict(best_state)
    save_captioner(model, tok, cfg.out, {"note": "dev scores pending"})  # keep the weights if scoring fails
    dev_scores = evaluate_split(model, tok, dev, dev_grid, cfg.eval_beam, device)
    meta = {
        "trained_on": f"flickr8k train split ({len(train.files)} images, {len(targets)} captions)",
        "model_choice": f"epoch {best_epoch} of {cfg.epochs} by dev cross-entropy",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "dev": {"beam": cfg.eval_beam, **dev_scores},
        "seconds": round(time.time() - t0, 1),
        "torch": str(torch.__version__),
    }
    save_captioner(model, tok, cfg.out, meta)
    cfg.out.with_suffix(".json").write_text(json.dumps({**meta, "history": history}, indent=2) + "\n")
    return meta
