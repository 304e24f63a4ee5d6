"""Several caption decoders that write one caption together (a weighted product of experts).

At every step each member scores the next token over its own memory and key/value cache; the
ensemble's next-token log-probability is the weighted sum of the members' log-probabilities,
renormalised (beam search applies ``log_softmax`` to what :meth:`DecoderEnsemble.step` returns)::

    log P(w | prefix, image) = log_softmax_w( sum_m weight_m * log P_m(w | prefix, image) )

The members must share a vocabulary (the same tokenizer) and read the same image grid; each keeps
its own memory encoder. Their memories are concatenated along the feature axis, so beam search
reorders them like one decoder's:

    grid (B, C, G, G) -> member m: encode -> (B, S, D_m) -> concat -> memory (B, S, sum D_m)

The ensemble has the decoder interface :mod:`captioning.decoding` uses (``cfg.vocab_size``,
``cfg.max_len``, ``encode``, ``init_cache``, ``step``) and ``decode`` for teacher forcing, so beam
search and log P(text | image) work on it unchanged. Two members cost two decoder passes per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from captioning.model import CaptionDecoder, KVCache


@dataclass(frozen=True)
class EnsembleCache:
    """One :class:`KVCache` per member, reordered together."""

    members: tuple[KVCache, ...]

    def reorder(self, index: torch.Tensor, cross: bool = True) -> EnsembleCache:
        return EnsembleCache(tuple(c.reorder(index, cross) for c in self.members))


class DecoderEnsemble(nn.Module):
    """Caption decoders of one vocabulary combined by a weighted sum of their log-probabilities."""

    def __init__(self, members: Sequence[CaptionDecoder], weights: Sequence[float]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two decoders, got {len(members)}")
        if len(weights) != len(members):
            raise ValueError(f"{len(members)} decoders but {len(weights)} weights")
        if any(not w > 0 for w in weights):
            raise ValueError(f"ensemble weights must be positive, got {list(weights)}")
        first = members[0].cfg
        for m in members[1:]:
            for key in ("vocab_size", "grid_dim", "grid_size"):
                if getattr(m.cfg, key) != getattr(first, key):
                    raise ValueError(f"ensemble members differ in {key}: {getattr(first, key)} and {getattr(m.cfg, key)}")
        self.members = nn.ModuleList(members)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]  # normalised to sum 1
        self.widths = [m.cfg.d_model for m in members]  # D_m: each member's slice of the memory
        self.cfg = SimpleNamespace(
            vocab_size=first.vocab_size, grid_dim=first.grid_dim, grid_size=first.grid_size,
            max_len=min(m.cfg.max_len for m in members), d_model=sum(self.widths),
        )

    def _split(self, memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """memory (B, S, sum D_m) -> one (B, S, D_m) slice per member."""
        return memory.split(self.widths, dim=-1)

    def _combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Members' logits (..., V) -> weighted sum of their log-probabilities (..., V), float32."""
        out = self.weights[0] * F.log_softmax(logits[0].float(), dim=-1)
        for w, lg in zip(self.weights[1:], logits[1:]):
            out = out + w * F.log_softmax(lg.float(), dim=-1)
        return out

    def encode(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, C, G, G) -> memories of all members side by side (B, S, sum D_m)."""
        return torch.cat([m.encode(grid) for m in self.members], dim=-1)

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: memory (B, S, sum D_m), tokens (B, T) -> combined log-probs (B, T, V)."""
        return self._combine([m.decode(mem, tokens) for m, mem in zip(self.members, self._split(memory))])

    def init_cache(self, memory: torch.Tensor) -> EnsembleCache:
        return EnsembleCache(tuple(m.init_cache(mem) for m, mem in zip(self.members, self._split(memory))))

    def step(
        self, tokens_last: torch.Tensor, memory: torch.Tensor, cache: EnsembleCache | None = None
    ) -> tuple[torch.Tensor, EnsembleCache]:
        """tokens_last (B, 1) -> combined next-token log-probs (B, V) and the caches one longer."""
        if cache is None:
            cache = self.init_cache(memory)
        out = [m.step(tokens_last, None, c) for m, c in zip(self.members, cache.members)]
        return self._combine([lg for lg, _ in out]), EnsembleCache(tuple(c for _, c in out))
