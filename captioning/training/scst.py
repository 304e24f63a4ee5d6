"""``pixquery train captioner --scst``: self-critical sequence training (SCST) on CIDEr-D.

Cross-entropy training teaches the decoder to predict the next reference word; the captions it is
judged by come from beam search and are scored by CIDEr-D. SCST (Rennie et al. 2017) fine-tunes
the decoder on that score directly with REINFORCE, here in the "new SCST" form of Luo 2020:

1. for each training image, draw ``n_samples`` captions from the model (multinomial sampling with
   the key/value cache, :func:`captioning.decoding.sample`);
2. reward r_ij = CIDEr-D of sample j against image i's five train references; the document
   frequencies are those of the train references (:class:`captioning.metrics.CiderD`);
3. baseline b_ij = mean reward of the *other* samples of image i, advantage a_ij = r_ij - b_ij
   (so the advantages of an image sum to zero and no greedy decode is needed);
4. loss = -sum_ij a_ij * sum_t log p(w_ijt) / (number of sampled tokens), with ``<eos>`` among
   the scored tokens, so that stopping at a sensible point is rewarded too (without it the model
   learns truncated endings such as "a dog runs through the").

Only the train split produces gradients. Dev BLEU/CIDEr (beam search at the captioner's default
beam) is measured before training, every ``eval_every`` steps and after every epoch; the state
with the best dev CIDEr is kept, so its dev figures are slightly optimistic.

Shape letters: B images in a batch, N samples per image, R = B * N sampled captions, T tokens,
V vocabulary.
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
import torch.nn.functional as F
from tqdm import tqdm

from captioning.decoding import sample
from captioning.metrics import (
    CiderD,
    SentenceBleu,
    caption_scores,
    ptb_tokenize,
    ptb_tokenize_batch,
)
from captioning.model import CaptionDecoder
from captioning.native import load_captioner, save_captioner
from captioning.tokenizer import DANGLING_WORDS, WordTokenizer
from captioning.training.captioner import _grid_batch, caption_split
from retrieval.errors import InputError
from retrieval.native.training.data import load_flickr8k
from retrieval.native.training.features import grid_features
from retrieval.shipped import shipped

log = logging.getLogger(__name__)

#: the shipped weights SCST starts from by default: the cross-entropy model (not the default
#: captioner, which is this fine-tuning's own result), so the documented run reproduces.
DEFAULT_INIT = shipped("captioner", "effl0-sat-v1").path



@dataclass
class ScstConfig:
    data: Path  # Flickr8k folder (images/, captions.tsv, train.txt, dev.txt)
    out: Path  # where the best state is written (save_captioner format) and, next to it, the .json log
    cache_dir: Path  # grid feature cache (retrieval/native/features.py)
    init: Path | None = None  # start weights; None = DEFAULT_INIT (the shipped cross-entropy model)
    device: str = "cpu"
    epochs: int = 5
    images_per_batch: int = 32  # B; each step scores B * n_samples captions
    n_samples: int = 5  # N sampled captions per image (>= 2 for the baseline)
    lr: float = 2e-5  # Adam, constant
    max_words: int = 20  # longest sampled caption (then <eos> is forced)
    temperature: float = 1.0
    bleu_weight: float = 0.0  # reward = CIDEr-D + bleu_weight x sentence BLEU-4
    train_dropout: bool = False  # dropout in the teacher-forced pass that computes log-probs
    flip_augment: bool = True  # draw each image's grid from the original or the flipped view
    grad_clip: float = 1.0
    eval_beam: int = 3  # beam of the dev evaluation (the captioner's default)
    eval_every: int = 0  # steps between dev evaluations besides the end of each epoch (0: epochs only)
    max_minutes: float | None = None  # time budget: stop after the first step past it (then a last evaluation)
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        """Refuse settings that cannot train, with an :class:`InputError` (a message, not a traceback)."""
        if self.n_samples < 2:
            raise InputError("--samples must be at least 2 (the baseline is the mean of the other samples)")
        if self.epochs < 1 or self.images_per_batch < 1:
            raise InputError("--epochs and --images-per-batch must be at least 1")
        if not self.lr > 0 or not self.bleu_weight >= 0 or not self.temperature > 0:
            raise InputError("--lr must be positive and --bleu-weight must not be negative")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError("--max-minutes must be positive")


def self_critical_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (B, N) -> advantages (B, N): each reward minus the mean of the other N - 1 rewards
    of the same image (Luo 2020). Every row sums to zero."""
    B, N = rewards.shape
    if N < 2:
        raise ValueError("the self-critical baseline needs at least 2 samples per image")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (N - 1)  # (B, N)
    return rewards - others  # (B, N)


def never_sampled(tok: WordTokenizer, device: torch.device | str = "cpu") -> torch.Tensor:
    """(V,) bool: the tokens the sampler never draws (``<pad>``, ``<bos>``, ``<unk>``), as in beam search."""
    never = torch.zeros(len(tok), dtype=torch.bool, device=device)  # (V,)
    never[[tok.pad_id, tok.bos_id, tok.unk_id]] = True
    return never


class CaptionReward:
    """The reward of a sampled caption: CIDEr-D, plus ``bleu_weight`` x sentence BLEU-4 (optional;
    CIDEr-D alone raised dev CIDEr faster than dev BLEU-4, docs/MODELS.md). ``refs``: {image key:
    PTB-tokenized reference captions}; document frequencies and n-gram counts come from them only."""

    def __init__(self, refs: dict, bleu_weight: float = 0.0) -> None:
        if bleu_weight < 0:
            raise ValueError(f"bleu_weight must be >= 0, got {bleu_weight}")
        self.cider = CiderD(refs)
        self.bleu = SentenceBleu(refs) if bleu_weight else None
        self.bleu_weight = bleu_weight

    def scores(self, keys: list, hyps: list) -> list[float]:
        out = self.cider.scores(keys, hyps)
        if self.bleu is not None:
            out = [c + self.bleu_weight * b for c, b in zip(out, self.bleu.scores(keys, hyps))]
        return out


def sample_rewards(scorer: CaptionReward | CiderD, keys: list, tokens: torch.Tensor, tok: WordTokenizer) -> torch.Tensor:
    """The reward (CIDEr-D, see :class:`CaptionReward`) of every sampled caption against its image's references.

    keys: B image keys of ``scorer``; tokens (B * N, T) from :func:`captioning.decoding.sample`
    -> rewards (B, N). Captions are scored as the evaluation scores them: decoded to text, then
    :func:`captioning.metrics.ptb_tokenize`."""
    R = tokens.shape[0]
    if R % len(keys):
        raise ValueError(f"{R} samples is not a multiple of {len(keys)} images")
    N = R // len(keys)
    hyps = [ptb_tokenize(tok.decode(row)) for row in tokens.tolist()]
    row_keys = [k for k in keys for _ in range(N)]
    return torch.tensor(scorer.scores(row_keys, hyps), dtype=torch.float32).view(len(keys), N)  # (B, N)


def token_log_probs(model: CaptionDecoder, memory: torch.Tensor, tokens: torch.Tensor, bos_id: int,
                    never: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probabilities of sampled tokens under the sampling policy.

    memory (R, S, D), tokens (R, T) (words, <eos>, pads) -> (R, T) log p(tokens[:, t] | <bos>,
    tokens[:, :t]); ``never`` (V,) marks the tokens the sampler could not draw, which are removed
    from the softmax as they were when sampling. Pads get meaningless values: mask them."""
    R, T = tokens.shape
    bos = torch.full((R, 1), bos_id, dtype=torch.long, device=tokens.device)  # (R, 1)
    logits = model.decode(memory, torch.cat([bos, tokens[:, :-1]], dim=1))  # (R, T, V)
    logp = F.log_softmax(logits.float().masked_fill(never, float("-inf")), dim=-1)  # (R, T, V)
    picked = tokens.clamp_min(0).unsqueeze(2)  # (R, T, 1)
    return logp.gather(2, picked).squeeze(2).masked_fill(never[tokens], 0.0)  # (R, T); pads -> 0


def scst_loss(model: CaptionDecoder, grid: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor,
              tok: WordTokenizer, never: torch.Tensor, max_words: int) -> torch.Tensor:
    """The policy-gradient loss of one batch.

    grid (B, C, G, G); tokens (B * N, T) sampled; advantages (B, N) -> scalar
    -sum(a * log p(token)) / number of scored tokens. Scored: the words and the ``<eos>``, except an
    ``<eos>`` forced after ``max_words`` words (the sampler had no choice there)."""
    B, N = advantages.shape
    R, T = tokens.shape
    memory = model.encode(grid).repeat_interleave(N, dim=0)  # (R, S, D)
    logp = token_log_probs(model, memory, tokens, tok.bos_id, never)  # (R, T)
    mask = tokens != tok.pad_id  # (R, T): words and <eos>
    if T > max_words:
        mask[:, max_words:] = False  # position max_words holds only forced <eos>
    a = advantages.reshape(R, 1).to(logp.device)  # (R, 1)
    return -(a * logp * mask).sum() / mask.sum().clamp_min(1)


def scst_step(model: CaptionDecoder, opt: torch.optim.Optimizer, grid: torch.Tensor, keys: list,
              scorer: CaptionReward | CiderD, tok: WordTokenizer, cfg: ScstConfig, never: torch.Tensor,
              generator: torch.Generator | None = None) -> dict:
    """One SCST update on the images of grid (B, C, G, G), whose reference keys are ``keys``.
    ``never`` is :func:`never_sampled`. Returns the loss and the batch's reward statistics."""
    tokens = sample(model, grid, tok.bos_id, tok.eos_id, tok.pad_id, n_samples=cfg.n_samples,
                    max_len=cfg.max_words, temperature=cfg.temperature,
                    banned_ids=(tok.unk_id,), generator=generator)  # (R, T)
    rewards = sample_rewards(scorer, keys, tokens, tok)  # (B, N)
    advantages = self_critical_advantage(rewards)  # (B, N)
    model.train(cfg.train_dropout)
    loss = scst_loss(model, grid, tokens, advantages, tok, never, cfg.max_words)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    words = (tokens != tok.pad_id).sum(1) - 1  # (R,) words per sample (<eos> not counted)
    return {"loss": float(loss.detach()), "reward": float(rewards.mean()), "words": float(words.float().mean()),
            "at_max": float((words >= cfg.max_words).float().mean())}


def _dev_report(model: CaptionDecoder, tok: WordTokenizer, files: list[str], refs: list[list[str]],
                grid: np.ndarray, beam: int, device: torch.device) -> tuple[dict, list[str]]:
    """Dev BLEU/CIDEr/ROUGE-L of beam-search captions (the evaluation's own scoring), plus the
    captions themselves and the share of them ending with a dangling word."""
    hyps = caption_split(model, tok, grid, beam, device=device)
    scores = caption_scores(dict(zip(files, refs)), dict(zip(files, hyps)))
    dangling = sum(1 for h in hyps if h.split() and h.split()[-1] in DANGLING_WORDS) / len(hyps)
    words = sum(len(h.split()) for h in hyps) / len(hyps)
    return {**{k: round(v, 4) for k, v in scores.items()}, "dangling": round(dangling, 4),
            "words": round(words, 2)}, hyps


def train_scst(cfg: ScstConfig) -> dict:
    """Fine-tune a native captioner with SCST; writes the best state (by dev CIDEr) to ``cfg.out``
    and the log to ``cfg.out.with_suffix('.json')``; returns the metadata saved with the weights."""
    cfg.check()
    t0 = time.time()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    init = cfg.init or DEFAULT_INIT
    model, tok, init_meta, init_sha = load_captioner(Path(init))
    model.to(device)
    if cfg.max_words + 1 > model.cfg.max_len:
        raise ValueError(f"max_words {cfg.max_words} needs {cfg.max_words + 1} positions; "
                         f"the model has {model.cfg.max_len}")

    train, dev = load_flickr8k(cfg.data, "train"), load_flickr8k(cfg.data, "dev")
    grids = [grid_features(train.paths, cfg.cache_dir, device)]
    if cfg.flip_augment:
        grids.append(grid_features(train.paths, cfg.cache_dir, device, flip=True))
    dev_grid = grid_features(dev.paths, cfg.cache_dir, device)
    flat = ptb_tokenize_batch([c for caps in train.captions for c in caps])
    it = iter(flat)
    scorer = CaptionReward({i: [next(it) for _ in caps] for i, caps in enumerate(train.captions)},  # train only
                           cfg.bleu_weight)
    never = never_sampled(tok, device)  # (V,)
    log.info("SCST from %s: %d train images, %d samples each, %d train n-grams", init, len(train.files),
             cfg.n_samples, len(scorer.cider.df))

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = -(-len(train.files) // cfg.images_per_batch)
    history: list[dict] = []
    best: dict = {}
    best_state: dict | None = None
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config["init"] = str(init)

    def evaluate(epoch: float, step: int, train_stats: dict) -> None:
        nonlocal best, best_state
        scores, hyps = _dev_report(model, tok, dev.files, dev.captions, dev_grid, cfg.eval_beam, device)
        row = {"epoch": round(epoch, 3), "step": step, **train_stats, "dev": scores,
               "seconds": round(time.time() - t0, 1), "examples": hyps[::100][:5]}
        history.append(row)
        log.info("epoch %.2f step %d %s dev %s", epoch, step, train_stats, scores)
        if best_state is None or scores["CIDEr"] > best["dev"]["CIDEr"]:
            best = row
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_captioner(model, tok, cfg.out, {"note": "SCST in progress", "step": step})
        cfg.out.with_suffix(".json").write_text(json.dumps({"config": config, "history": history}, indent=2) + "\n")

    evaluate(0.0, 0, {})
    step, stopped = 0, ""
    deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else None
    try:
        for epoch in range(1, cfg.epochs + 1):
            perm = np.random.permutation(len(train.files))
            sums = {"loss": 0.0, "reward": 0.0, "words": 0.0, "at_max": 0.0}
            seen = 0
            bar = tqdm(range(0, len(perm), cfg.images_per_batch), desc=f"SCST epoch {epoch}/{cfg.epochs}",
                       unit="step", disable=not cfg.progress)
            for s in bar:
                idx = perm[s:s + cfg.images_per_batch]
                view = np.random.randint(len(grids), size=len(idx))
                grid = _grid_batch(grids, view, idx).to(device)  # (B, 1280, 7, 7)
                stats = scst_step(model, opt, grid, idx.tolist(), scorer, tok, cfg, never, gen)
                step += 1
                seen += 1
                for k in sums:
                    sums[k] += stats[k]
                bar.set_postfix(reward=f"{sums['reward'] / seen:.3f}", words=f"{sums['words'] / seen:.1f}")
                last_of_epoch = s + cfg.images_per_batch >= len(perm)
                if deadline and time.time() > deadline and not last_of_epoch:
                    stopped = f"time budget of {cfg.max_minutes} minutes reached at step {step}"
                    break
                if cfg.eval_every and step % cfg.eval_every == 0 and not last_of_epoch:
                    evaluate(epoch - 1 + seen / steps_per_epoch, step,
                             {f"train_{k}": round(v / seen, 4) for k, v in sums.items()})
            bar.close()
            evaluate(epoch - 1 + seen / steps_per_epoch, step,
                     {f"train_{k}": round(v / seen, 4) for k, v in sums.items()})
            if stopped or (deadline and time.time() > deadline and epoch < cfg.epochs):
                stopped = stopped or f"time budget of {cfg.max_minutes} minutes reached after epoch {epoch}"
                break
    except KeyboardInterrupt:  # Ctrl+C: keep the best state evaluated so far
        stopped = f"interrupted at step {step}"
    if stopped:
        log.warning("SCST stopped early: %s", stopped)

    model.load_state_dict(best_state)
    meta = {
        "trained_on": f"flickr8k train split ({len(train.files)} images), SCST on CIDEr-D"
                      f"{f' + {cfg.bleu_weight} x BLEU-4' if cfg.bleu_weight else ''} from {Path(init).name}",
        "init": {"path": str(init), "sha256": init_sha, "dev": init_meta.get("dev")},
        "model_choice": f"step {best['step']} (epoch {best['epoch']}) of {step} by dev CIDEr (beam {cfg.eval_beam}); "
                        "dev figures are therefore slightly optimistic",
        "config": config,
        "dev": {"beam": cfg.eval_beam, **{k: v for k, v in best["dev"].items()}},
        "steps": step,
        "stopped_early": stopped or None,
        "seconds": round(time.time() - t0, 1),
        "torch": str(torch.__version__),
    }
    save_captioner(model, tok, cfg.out, meta)
    cfg.out.with_suffix(".json").write_text(json.dumps({**meta, "history": history}, indent=2) + "\n")
    return meta
