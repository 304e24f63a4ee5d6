"""Caption decoder: a pre-norm Transformer decoder that cross-attends over the image tower's grid.

The image backbone (EfficientNet-Lite0, retrieval/native/towers.py) runs once per image; its grid
feeds both the embedding head and this decoder.

    grid   (B, C=1280, 7, 7) -> (B, 49, C) -> linear -> + row/column position -> LayerNorm
           -> memory (B, S=49, D)                                              [encode]
    tokens (B, T) -> token + position embedding (B, T, D)
           -> n_layers x [ x + SelfAttn(LN(x)), causal
                           x + CrossAttn(LN(x), memory)
                           x + MLP(LN(x)), GELU ]
           -> LN -> tied output projection -> logits (B, T, V)                [forward / decode]

``forward`` is teacher forcing: tokens start with ``<bos>`` and position t predicts token t + 1.
Padding at the end of a sequence needs no mask: attention is causal, so pads only influence
positions after themselves, which a loss with ``ignore_index=pad`` skips.

``step`` decodes one token for every row with a :class:`KVCache`: self-attention keys/values
grow by one position per step, cross-attention keys/values are computed once per memory.

Shape letters: B batch (images, or images x beams), T tokens, S = 49 memory positions,
D d_model, H heads, Dh = D / H, V vocabulary, C grid channels.
Style after nanoGPT's model.py (Karpathy); architecture after Vaswani et al. 2017 and
Xu et al. 2015 (Show, Attend and Tell).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    """Hyper-parameters of :class:`CaptionDecoder`; saved next to the weights (``asdict``)."""

    vocab_size: int
    grid_dim: int = 1280  # channels C of the image grid
    d_model: int = 512
    n_layers: int = 3
    n_heads: int = 8
    d_ff: int = 2048  # hidden width of the MLP
    dropout: float = 0.1
    max_len: int = 32  # token positions, <bos> included
    grid_size: int = 7  # the grid is grid_size x grid_size

    def __post_init__(self) -> None:
        for name in ("vocab_size", "grid_dim", "d_model", "n_layers", "n_heads", "d_ff", "max_len", "grid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ValueError(f"DecoderConfig.vocab_size must be >= 2, got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding; row i belongs to sequence i."""

    self_k: list[torch.Tensor]  # n_layers x (B, H, t, Dh), t = tokens decoded so far
    self_v: list[torch.Tensor]  # n_layers x (B, H, t, Dh)
    cross_k: list[torch.Tensor]  # n_layers x (B, H, S, Dh), fixed for a memory
    cross_v: list[torch.Tensor]  # n_layers x (B, H, S, Dh)

    @property
    def length(self) -> int:
        """Number of token positions already in the cache (the position of the next token)."""
        return self.self_k[0].shape[2]

    def reorder(self, index: torch.Tensor, cross: bool = True) -> "KVCache":
        """A cache whose row i is this cache's row ``index[i]`` (beam reordering, batch shrinking,
        repeating each image for its beams). ``index``: (B',) long on the cache's device.

        ``cross=False`` keeps the cross-attention rows as they are: correct, and cheaper, when
        ``index`` only permutes rows that share one memory (the beams of one image)."""

        def pick(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.index_select(0, index) for t in ts]

        if cross:
            return KVCache(pick(self.self_k), pick(self.self_v), pick(self.cross_k), pick(self.cross_v))
        if index.shape[0] != self.cross_k[0].shape[0]:
            raise ValueError("cross=False needs an index that keeps the number of rows")
        return KVCache(pick(self.self_k), pick(self.self_v), self.cross_k, self.cross_v)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention that can append to cached keys/values."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Teacher forcing: x (B, T, D) -> (B, T, D), causal. Decoding step: x (B, 1, D) and the
        past keys/values (B, H, t, Dh) -> (B, 1, D). Also returns the keys/values, past included."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q = q.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        v = v.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        if past is not None:  # a decoding step: the one new query may attend to every key
            if T != 1:
                raise ValueError(f"cached self-attention takes one token per step, got {T}")
            k = torch.cat([past[0], k], dim=2)  # (B, H, t+1, Dh)
            v = torch.cat([past[1], v], dim=2)  # (B, H, t+1, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=past is None,
        )  # (B, H, T, Dh)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.resid_drop(self.proj(y)), (k, v)


class CrossAttention(nn.Module):
    """Multi-head attention from the tokens to the image memory."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D) -> keys, values (B, H, S, Dh); computed once per image."""
        B, S, D = memory.shape
        k, v = self.kv(memory).split(D, dim=2)  # 2 x (B, S, D)
        k = k.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, S, Dh)
        v = v.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, S, Dh)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), k/v (B, H, S, Dh) -> (B, T, D)."""
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: D -> d_ff -> GELU -> D."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, d_ff) inside


class Block(nn.Module):
    """One pre-norm decoder layer: causal self-attention, cross-attention, MLP."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(cfg.d_model)
        self.self_attn = SelfAttention(cfg)
        self.ln_cross = nn.LayerNorm(cfg.d_model)
        self.cross_attn = CrossAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, D), cross k/v (B, H, S, Dh) -> (B, T, D) and self-attention keys/values (B, H, t+T, Dh)."""
        attn, kv = self.self_attn(self.ln_self(x), past)  # (B, T, D)
        x = x + attn  # (B, T, D)
        x = x + self.cross_attn(self.ln_cross(x), cross_k, cross_v)  # (B, T, D)
        x = x + self.mlp(self.ln_mlp(x))  # (B, T, D)
        return x, kv


class CaptionDecoder(nn.Module):
    """Transformer caption decoder over a (B, grid_dim, grid_size, grid_size) image grid."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        # image grid -> memory
        self.grid_proj = nn.Linear(cfg.grid_dim, D)
        self.row_pos = nn.Parameter(torch.zeros(cfg.grid_size, D))  # (7, D)
        self.col_pos = nn.Parameter(torch.zeros(cfg.grid_size, D))  # (7, D)
        self.ln_memory = nn.LayerNorm(D)
        # tokens -> logits
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.pos_emb = nn.Embedding(cfg.max_len, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=True)
        self.lm_head.weight = self.tok_emb.weight  # tied input/output embeddings; the bias is its own
        self.apply(self._init_weights)
        nn.init.normal_(self.row_pos, std=0.02)
        nn.init.normal_(self.col_pos, std=0.02)
        # GPT-2: scale the projections into the residual stream by the number of residual branches
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and name != "grid_proj.weight":
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(3 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def encode(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, C, G, G) -> memory (B, S=G*G, D), row-major over the grid."""
        cfg = self.cfg
        if grid.dim() != 4 or tuple(grid.shape[1:]) != (cfg.grid_dim, cfg.grid_size, cfg.grid_size):
            raise ValueError(
                f"grid must have shape (B, {cfg.grid_dim}, {cfg.grid_size}, {cfg.grid_size}), got {tuple(grid.shape)}"
            )
        B, C, G, _ = grid.shape
        x = grid.to(self.grid_proj.weight.dtype).flatten(2).transpose(1, 2)  # (B, S, C)
        x = self.grid_proj(x)  # (B, S, D)
        pos = (self.row_pos[:, None, :] + self.col_pos[None, :, :]).view(G * G, -1)  # (S, D)
        return self.drop(self.ln_memory(x + pos))  # (B, S, D)

    def _check_tokens(self, tokens: torch.Tensor, start: int) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
        if start + tokens.shape[1] > self.cfg.max_len:
            raise ValueError(
                f"positions {start}..{start + tokens.shape[1] - 1} exceed max_len {self.cfg.max_len}"
            )

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing on a precomputed memory: memory (B, S, D), tokens (B, T) -> logits (B, T, V)."""
        self._check_tokens(tokens, 0)
        if memory.shape[0] != tokens.shape[0]:
            raise ValueError(f"memory has {memory.shape[0]} rows but tokens have {tokens.shape[0]}")
        T = tokens.shape[1]
        pos = torch.arange(T, device=tokens.device)  # (T,)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))  # (B, T, D)
        for block in self.blocks:
            k, v = block.cross_attn.memory_kv(memory)  # (B, H, S, Dh)
            x, _ = block(x, k, v)  # (B, T, D)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: grid (B, C, G, G), tokens (B, T) starting with <bos> -> logits (B, T, V);
        the logits at position t score token t + 1."""
        return self.decode(self.encode(grid), tokens)

    def init_cache(self, memory: torch.Tensor) -> KVCache:
        """An empty self-attention cache plus every layer's cross-attention keys/values for memory (B, S, D)."""
        B = memory.shape[0]
        H = self.cfg.n_heads
        Dh = self.cfg.d_model // H
        empty = memory.new_zeros(B, H, 0, Dh)  # (B, H, 0, Dh)
        cross = [block.cross_attn.memory_kv(memory) for block in self.blocks]  # n_layers x 2 x (B, H, S, Dh)
        return KVCache(
            self_k=[empty] * len(self.blocks),
            self_v=[empty] * len(self.blocks),
            cross_k=[k for k, _ in cross],
            cross_v=[v for _, v in cross],
        )

    def step(
        self, tokens_last: torch.Tensor, memory: torch.Tensor, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """One decoding step: tokens_last (B, 1) at position ``cache.length`` -> logits (B, V) for the
        next token, and the cache with this position appended. ``memory`` (B, S, D) is only read
        when ``cache`` is None (the first step); afterwards its keys/values come from the cache."""
        if cache is None:
            cache = self.init_cache(memory)
        if tokens_last.dim() != 2 or tokens_last.shape[1] != 1:
            raise ValueError(f"tokens_last must have shape (B, 1), got {tuple(tokens_last.shape)}")
        if tokens_last.shape[0] != cache.cross_k[0].shape[0]:
            raise ValueError(f"{tokens_last.shape[0]} tokens for a cache of {cache.cross_k[0].shape[0]} rows")
        t = cache.length
        self._check_tokens(tokens_last, t)
        pos = torch.full((1,), t, dtype=torch.long, device=tokens_last.device)  # (1,)
        x = self.drop(self.tok_emb(tokens_last) + self.pos_emb(pos))  # (B, 1, D)
        self_k: list[torch.Tensor] = []
        self_v: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, cache.cross_k[i], cache.cross_v[i], (cache.self_k[i], cache.self_v[i]))
            self_k.append(k)  # (B, H, t+1, Dh)
            self_v.append(v)  # (B, H, t+1, Dh)
        logits = self.lm_head(self.ln_f(x[:, -1]))  # (B, V)
        return logits, KVCache(self_k, self_v, cache.cross_k, cache.cross_v)


def sequence_log_likelihood(decoder: nn.Module, memory: torch.Tensor, tokens: torch.Tensor,
                            pad_id: int) -> torch.Tensor:
    """log P(tokens[1:] | memory) of each row, teacher-forced, pads left out -> (N,) float32: how a scorer
    rates a text against an image. ``decoder``: anything with ``decode(memory, tokens) -> logits`` (a
    :class:`CaptionDecoder` or an ensemble); tokens (N, T + 2) are ``<bos> words <eos> <pad>...`` (or one
    row, rated against every memory, where the decoder takes one: the exported scorer's)."""
    logits = decoder.decode(memory, tokens[:, :-1])  # (N, T + 1, V)
    wanted = tokens[:, 1:].expand(logits.shape[0], -1)  # (N, T + 1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, wanted[:, :, None])[..., 0]  # (N, T + 1)
    return (logp * (wanted != pad_id).float()).sum(1)
