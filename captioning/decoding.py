"""Batched beam search with a key/value cache; greedy decoding is ``beam_size=1`` of the same code.

The K beams of the B images are flattened into the batch dimension (B*K rows) of one
``CaptionDecoder.step`` per token. Each step (fairseq's rule):

1. every live beam proposes every token; a candidate's score is the beam's summed log-prob plus
   the token's log-prob (log-softmax over the whole vocabulary; banned tokens get -inf);
2. per image, the best 2K candidates are taken; an ``<eos>`` among the first K of them finishes
   its hypothesis, the first K that are not ``<eos>`` become the next beams (the cache rows are
   reordered with ``index_select``);
3. an image is done once it has K finished hypotheses (or no live beam); done images leave the
   batch. At ``max_len`` words only ``<eos>`` is allowed, so every image finishes.

With K = 1 that is exactly greedy decoding: stop when ``<eos>`` is the arg-max, else take the arg-max.

Finished hypotheses are ranked by GNMT's length-normalised score (Wu et al. 2016, eq. 14)::

    score = log P(w_1 .. w_n, <eos>) / lp(n + 1),   lp(L) = ((5 + L) / 6) ** length_penalty

where L counts the scored tokens, ``<eos>`` included. ``length_penalty=0`` ranks by plain
log-probability; larger values favour longer captions. While the search runs, beams are
ranked by their raw summed log-probability (as in fairseq).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from captioning.model import CaptionDecoder


@dataclass(frozen=True)
class Hypothesis:
    """A finished caption: token ids without ``<bos>``/``<eos>``, and its scores."""

    tokens: list[int]
    log_prob: float  # log P(tokens + <eos> | image), summed over len(tokens) + 1 tokens
    score: float  # log_prob / lp(len(tokens) + 1), the ranking key


def length_penalty_factor(length: int, alpha: float) -> float:
    """GNMT length penalty lp(L) = ((5 + L) / 6) ** alpha; L counts scored tokens, eos included."""
    return ((5.0 + length) / 6.0) ** alpha


def _ngram_bans(history: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """history (R, t) token ids -> (R, V) bool, True for every token that would complete an
    n-gram already present in its row (the last n-1 tokens plus the token). Needs t >= n."""
    R, t = history.shape
    windows = history.unfold(1, n, 1)  # (R, t-n+1, n), every n-gram of the row
    prefix = history[:, t - n + 1:]  # (R, n-1), the n-gram the next token would complete
    match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(dim=2)  # (R, t-n+1)
    hits = torch.zeros(R, vocab_size, device=history.device)  # (R, V)
    hits.scatter_add_(1, windows[:, :, n - 1], match.to(hits.dtype))  # count matches per next token
    return hits > 0  # (R, V)


def _check_args(
    model: CaptionDecoder, grid: torch.Tensor, bos_id: int, eos_id: int, beam_size: int, max_len: int,
    length_penalty: float, no_repeat_ngram_size: int, min_len: int, banned_ids: Sequence[int],
) -> None:
    V = model.cfg.vocab_size
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if max_len + 1 > model.cfg.max_len:
        raise ValueError(
            f"max_len {max_len} needs {max_len + 1} positions (<bos> + words) but the model has {model.cfg.max_len}"
        )
    if not 0 <= min_len <= max_len:
        raise ValueError(f"min_len must be in [0, max_len={max_len}], got {min_len}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    for name, i in (("bos_id", bos_id), ("eos_id", eos_id), *(("banned id", b) for b in banned_ids)):
        if not 0 <= i < V:
            raise ValueError(f"{name} {i} is outside the vocabulary of {V}")
    if bos_id == eos_id:
        raise ValueError("bos_id and eos_id must differ")
    if eos_id in banned_ids:
        raise ValueError("eos_id cannot be banned: every caption must be able to end")
    if grid.dim() != 4:
        raise ValueError(f"grid must have shape (B, C, H, W), got {tuple(grid.shape)}")


@torch.inference_mode()
def beam_search_hypotheses(
    model: CaptionDecoder,
    grid: torch.Tensor,
    bos_id: int,
    eos_id: int,
    beam_size: int = 3,
    max_len: int = 20,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_len: int = 1,
    banned_ids: Sequence[int] = (),
    no_end_after: Sequence[int] = (),
) -> list[list[Hypothesis]]:
    """Beam search over grid (B, C, G, G); returns, per image, its finished hypotheses, best first
    (at most ``beam_size``; empty only if bans left no way to reach ``min_len``).

    ``max_len``/``min_len`` bound the number of words (``<bos>``/``<eos>`` not counted);
    ``no_repeat_ngram_size=n > 0`` bans any token that would repeat an n-gram of the hypothesis;
    ``banned_ids`` are never generated (``<bos>`` never is); ``<eos>`` never follows a token of
    ``no_end_after`` (function words: a caption does not end "... through the") before ``max_len``.
    Runs on ``grid.device`` with the model in eval mode (its training flag is restored afterwards).
    """
    _check_args(model, grid, bos_id, eos_id, beam_size, max_len, length_penalty,
                no_repeat_ngram_size, min_len, (*banned_ids, *no_end_after))
    if grid.shape[0] == 0:
        return []
    was_training = model.training
    model.eval()
    try:
        return _search(model, grid, bos_id, eos_id, beam_size, max_len, length_penalty,
                       no_repeat_ngram_size, min_len, banned_ids, no_end_after)
    finally:
        model.train(was_training)


def _search(
    model: CaptionDecoder, grid: torch.Tensor, bos_id: int, eos_id: int, K: int, max_len: int,
    alpha: float, ngram: int, min_len: int, banned_ids: Sequence[int], no_end_after: Sequence[int],
) -> list[list[Hypothesis]]:
    device = grid.device
    V = model.cfg.vocab_size
    n_img = grid.shape[0]
    neg_inf = float("-inf")
    never = torch.zeros(V, dtype=torch.bool, device=device)  # (V,) tokens never generated
    never[bos_id] = True
    for i in banned_ids:
        never[i] = True
    only_eos = torch.ones(V, dtype=torch.bool, device=device)  # (V,) mask for the last step
    only_eos[eos_id] = False
    open_end = torch.zeros(V, dtype=torch.bool, device=device)  # (V,) tokens <eos> may not follow
    open_end[list(no_end_after)] = True

    memory = model.encode(grid)  # (B, S, D)
    cache = model.init_cache(memory)  # cross keys/values computed once per image
    rows = torch.arange(n_img, device=device).repeat_interleave(K)  # (B*K,) image of each beam row
    cache = cache.reorder(rows)
    memory = memory.index_select(0, rows)  # (B*K, S, D)

    active = list(range(n_img))  # original image index of each image still in the batch
    scores = torch.full((n_img, K), neg_inf, device=device)  # (B, K) summed log-probs of live beams
    scores[:, 0] = 0.0  # one live beam at the start, so the first step yields K distinct beams
    history = torch.zeros(n_img, K, 0, dtype=torch.long, device=device)  # (B, K, t) words so far
    last = torch.full((n_img * K, 1), bos_id, dtype=torch.long, device=device)  # (B*K, 1)
    finished: list[list[Hypothesis]] = [[] for _ in range(n_img)]

    for t in range(max_len + 1):  # t = words generated so far
        B = len(active)
        logits, cache = model.step(last, memory, cache)  # (B*K, V)
        logp = F.log_softmax(logits.float(), dim=-1).view(B, K, V)  # (B, K, V)
        logp = logp.masked_fill(never, neg_inf)  # (B, K, V)
        if t < min_len:
            logp[:, :, eos_id] = neg_inf
        if t == max_len:
            logp = logp.masked_fill(only_eos, neg_inf)  # (B, K, V)
        if 0 < t < max_len and bool(open_end.any()):
            logp[:, :, eos_id] = logp[:, :, eos_id].masked_fill(open_end[history[:, :, -1]], neg_inf)
        if ngram and t >= ngram:
            bans = _ngram_bans(history.reshape(B * K, t), ngram, V).view(B, K, V)  # (B, K, V)
            logp = logp.masked_fill(bans, neg_inf)

        cand = (scores.unsqueeze(2) + logp).view(B, K * V)  # (B, K*V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # (B, 2K), best first; K*V >= 2K as V >= 2
        top_beam = top_idx // V  # (B, 2K) beam each candidate extends
        top_tok = top_idx % V  # (B, 2K) token it appends
        is_eos = top_tok == eos_id  # (B, 2K); at most K (one per beam)

        # <eos> among the first K candidates finishes a hypothesis
        ends = is_eos[:, :K] & torch.isfinite(top_scores[:, :K])  # (B, K)
        if bool(ends.any()):
            ends_at = ends.nonzero().tolist()  # [(image row, rank)], ranks ascending per row
            end_scores = top_scores.tolist()
            end_beams = top_beam.tolist()
            words = history.tolist()  # (B, K, t) nested lists
            for i, r in ends_at:
                done_so_far = finished[active[i]]
                if len(done_so_far) < K:
                    log_prob = end_scores[i][r]
                    done_so_far.append(Hypothesis(
                        tokens=words[i][end_beams[i][r]],
                        log_prob=log_prob,
                        score=log_prob / length_penalty_factor(t + 1, alpha),
                    ))
        if t == max_len:
            break

        # the first K candidates that are not <eos> become the next beams (stable: rank order kept)
        pick = torch.sort(is_eos.to(torch.uint8), dim=1, stable=True).indices[:, :K]  # (B, K)
        scores = top_scores.gather(1, pick)  # (B, K)
        beam = top_beam.gather(1, pick)  # (B, K)
        tok = top_tok.gather(1, pick)  # (B, K)

        # images with K finished hypotheses, or with no live beam left, leave the batch
        alive = torch.isfinite(scores).any(dim=1).tolist()  # B bools
        keep = [i for i in range(B) if alive[i] and len(finished[active[i]]) < K]
        if not keep:
            break
        shrink = len(keep) < B
        if shrink:
            kept = torch.tensor(keep, dtype=torch.long, device=device)  # (B',)
            scores, beam, tok, history = scores[kept], beam[kept], tok[kept], history[kept]
            active = [active[i] for i in keep]
        else:
            kept = torch.arange(B, device=device)  # (B,)
        B = len(active)

        # beam i of image b continues row kept[b]*K + beam[b, i] of the previous step; the beams
        # of an image share its memory rows, so those only move when the batch shrinks
        src = (kept[:, None] * K + beam).view(-1)  # (B*K,)
        cache = cache.reorder(src, cross=shrink)
        if shrink:
            memory = memory.index_select(0, src)  # (B*K, S, D)
        prev = history[torch.arange(B, device=device)[:, None], beam]  # (B, K, t)
        history = torch.cat([prev, tok.unsqueeze(2)], dim=2)  # (B, K, t+1)
        last = tok.view(B * K, 1)  # (B*K, 1)

    return [sorted(h, key=lambda hyp: hyp.score, reverse=True) for h in finished]


@torch.inference_mode()
def beam_search(
    model: CaptionDecoder,
    grid: torch.Tensor,
    bos_id: int,
    eos_id: int,
    beam_size: int = 3,
    max_len: int = 20,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_len: int = 1,
    banned_ids: Sequence[int] = (),
    no_end_after: Sequence[int] = (),
) -> list[list[int]]:
    """Best caption per image of grid (B, C, G, G) as token ids without ``<bos>``/``<eos>``.
    ``beam_size=1`` is greedy decoding. See :func:`beam_search_hypotheses` for the arguments."""
    results = beam_search_hypotheses(
        model, grid, bos_id, eos_id, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, min_len=min_len, banned_ids=banned_ids,
        no_end_after=no_end_after,
    )
    return [hyps[0].tokens if hyps else [] for hyps in results]


@torch.no_grad()
def sample(
    model: CaptionDecoder,
    grid: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    n_samples: int = 1,
    max_len: int = 20,
    temperature: float = 1.0,
    banned_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n_samples`` captions per image of grid (B, C, G, G), drawn token by token from the model's
    softmax (multinomial sampling at ``temperature``), with the same key/value cache as beam search.

    Returns (B * n_samples, T) token ids, rows of image b at b * n_samples ... (b + 1) * n_samples - 1:
    the words, then ``<eos>``, then ``pad_id``; T <= max_len + 1 is the longest row. A row that reaches
    ``max_len`` words gets ``<eos>`` as its next token (as beam search does). ``<bos>``,
    ``pad_id`` and ``banned_ids`` are never drawn. Runs in eval mode (no dropout; the training flag
    is restored afterwards) and without gradients: a training loss recomputes the log-probs by
    teacher forcing.
    """
    _check_args(model, grid, bos_id, eos_id, 1, max_len, 1.0, 0, 0, banned_ids)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if pad_id == eos_id or not 0 <= pad_id < model.cfg.vocab_size:
        raise ValueError(f"pad_id {pad_id} must be a vocabulary id other than eos_id")
    device = grid.device
    V = model.cfg.vocab_size
    R = grid.shape[0] * n_samples
    never = torch.zeros(V, dtype=torch.bool, device=device)  # (V,) tokens never drawn
    never[[bos_id, pad_id, *banned_ids]] = True
    was_training = model.training
    model.eval()
    try:
        memory = model.encode(grid)  # (B, S, D)
        rows = torch.arange(grid.shape[0], device=device).repeat_interleave(n_samples)  # (R,) image of each row
        cache = model.init_cache(memory).reorder(rows)  # cross keys/values computed once per image
        last = torch.full((R, 1), bos_id, dtype=torch.long, device=device)  # (R, 1)
        done = torch.zeros(R, dtype=torch.bool, device=device)  # (R,) rows that have drawn <eos>
        out: list[torch.Tensor] = []  # per step (R,)
        for t in range(max_len + 1):  # t = words drawn so far
            logits, cache = model.step(last, memory, cache)  # (R, V)
            if t == max_len:
                tok = torch.full((R,), eos_id, dtype=torch.long, device=device)  # (R,) forced end
            else:
                probs = F.softmax(logits.float().masked_fill(never, float("-inf")) / temperature, dim=-1)  # (R, V)
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (R,)
            tok = tok.masked_fill(done, pad_id)  # (R,) finished rows only pad
            out.append(tok)
            done = done | (tok == eos_id)
            if bool(done.all()):
                break
            last = tok.unsqueeze(1)  # (R, 1)
        return torch.stack(out, dim=1)  # (R, T)
    finally:
        model.train(was_training)
