"""``native:<weights>`` match head: how well a text fits an image, read off the scorer's memory.

The likelihood signal asks the caption decoder how probable the query is as a caption; the match
head asks a small discriminative model the same question. It reads two things search already has:

    query   the MiniLM token states of the query (the native text tower's last layer), (T, 384)
    image   the caption scorer's memory of the image (stored in ``memories.faiss``), (S=49, D)

    tokens -> Linear -> LayerNorm -> n_layers x [ x + CrossAttn(LN(x), memory'),  x + MLP(LN(x)) ]
    memory -> Linear -> LayerNorm = memory'
           -> mean over the real tokens -> LayerNorm -> Linear -> one logit

It is trained (``pixquery train matcher``, :mod:`retrieval.native.training.matcher`) to pick a caption's own
image out of the images the joint encoder confuses it with, on the Flickr8k train split. The text
side is pretrained and frozen and the memory encoder is a linear map of the frozen image grid, so,
unlike the decoder's likelihood, the head has little room to memorise the train pairs it learns from.

The head is tied to the scorer whose memories it reads: its file records that scorer's sha256, and
:class:`Matcher` refuses other memories' shapes; the Engine enables it only beside that scorer.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from retrieval.errors import ModelLoadError
from retrieval.native.token_cache import memory_rows, prepared_states
from retrieval.native.towers import TEXT_DIM
from retrieval.shipped import is_shipped, resolve_weights
from retrieval.weights import save_payload

DEFAULT_MATCHER = "effl0-match-v1"  # retrieval/shipped.py
FORMAT = "pixquery-native-matcher/1"
MAX_TOKENS = 32  # query tokens read (with [CLS] and [SEP]); queries are short


@dataclass
class MatcherConfig:
    """Hyper-parameters of :class:`MatchHead`; saved next to the weights."""

    memory_dim: int = 384  # D of the scorer's memory
    memory_len: int = 49  # S
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("memory_dim", "memory_len", "d_model", "n_layers", "n_heads", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"MatcherConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")


class _Block(nn.Module):
    """Text tokens attend to the image memory, then an MLP; pre-norm residuals."""

    def __init__(self, cfg: MatcherConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln_cross, self.ln_mlp = nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.ff_mult * d), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ff_mult * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.ln_cross(x)
        x = x + self.drop(self.cross(y, memory, memory, need_weights=False)[0])
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class MatchHead(nn.Module):
    """(tokens (B, T, 384), mask (B, T) bool, memory (B, S, D)) -> match logits (B,)."""

    def __init__(self, cfg: MatcherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_in = nn.Sequential(nn.Linear(TEXT_DIM, cfg.d_model), nn.LayerNorm(cfg.d_model))
        self.memory_in = nn.Sequential(nn.Linear(cfg.memory_dim, cfg.d_model), nn.LayerNorm(cfg.d_model))
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layers)])
        self.out = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, 1))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.text_in(tokens.to(self.out[1].weight.dtype))
        m = self.memory_in(memory.to(x.dtype))
        for block in self.blocks:
            x = block(x, m)
        keep = mask[..., None].to(x.dtype)  # (B, T, 1)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.out(pooled)[:, 0]


def save_matcher(head: MatchHead, path: Path, meta: dict) -> None:
    """Config, fp16 weights and metadata (``meta["scorer_sha256"]`` ties it to a scorer) in one file."""
    save_payload({
        "format": FORMAT,
        "config": asdict(head.cfg),
        "state_dict": {k: v.detach().cpu().half().contiguous() for k, v in head.state_dict().items()},
        "meta": meta,
    }, path)


def load_matcher(path: Path) -> tuple[MatchHead, dict, str]:
    """-> (head in float32, eval mode), metadata, sha256 of the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT:
            raise ValueError(f"format is {payload.get('format')!r}, expected {FORMAT!r}")
        head = MatchHead(MatcherConfig(**payload["config"]))
        head.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
        meta = dict(payload.get("meta", {}))
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable weight file
        raise ModelLoadError(f"could not load the match head {path}: {exc}") from exc
    return head.eval(), meta, hashlib.sha256(path.read_bytes()).hexdigest()


class Matcher:
    """A loaded match head with the text tower that feeds it (``native:effl0-match-v1``, the default).

    ``text_tower``: the native encoder's :class:`~retrieval.native.towers.TextTower` to share (and
    its cache of recent queries' token states); None loads one on first use.
    """

    def __init__(self, spec: str = DEFAULT_MATCHER, device: torch.device | None = None,
                 text_tower=None) -> None:  # noqa: ANN001 - TextTower, imported lazily
        self.device = device or torch.device("cpu")
        name = spec.removeprefix("native:")
        path = resolve_weights(name, "matcher")
        self.head, self.meta, self.sha256 = load_matcher(path)
        self.head.to(self.device)
        self.name = f"native:{is_shipped(path) or path.resolve()}"
        self.scorer_sha256: str | None = self.meta.get("scorer_sha256")
        self._text_tower = text_tower
        self._prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def text_tower(self):  # noqa: ANN201 - TextTower
        if self._text_tower is None:
            from retrieval.native.towers import TextTower

            self._text_tower = TextTower().to(self.device).eval()
        return self._text_tower

    @property
    def memory_dim(self) -> int:
        return self.head.cfg.memory_len * self.head.cfg.memory_dim

    @torch.inference_mode()
    def prepare(self, texts: Sequence[str], batch: int = 256) -> None:
        """Compute the token states of many texts at once (an evaluation's queries), in batches, for
        later :meth:`score` calls; replaces what an earlier call prepared."""
        self._prepared = prepared_states(self.text_tower.token_states, texts, batch, MAX_TOKENS, torch.clone)

    def _token_states(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._prepared.get(text)
        return found if found is not None else self.text_tower.token_states([text])

    @torch.inference_mode()
    def score(self, memory: np.ndarray, text: str) -> np.ndarray:
        """Match logits of ``text`` against N images' flat memories (N, S * D) -> (N,); higher fits better."""
        n = memory_rows(memory, self.memory_dim)
        if not n:
            return np.zeros(0, dtype=np.float32)
        tokens, mask = self._token_states(text)
        tokens, mask = tokens[:, :MAX_TOKENS], mask[:, :MAX_TOKENS].bool()
        cfg = self.head.cfg
        mem = torch.as_tensor(np.asarray(memory, dtype=np.float32), device=self.device)
        mem = mem.view(n, cfg.memory_len, cfg.memory_dim)
        return self.head(tokens.expand(n, -1, -1), mask.expand(n, -1), mem).float().cpu().numpy()


def text_token_states(tower, texts: Sequence[str],  # noqa: ANN001 - TextTower
                      batch: int = 256) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """MiniLM states of many texts for training, from one pass of the tower: token states
    (N, MAX_TOKENS, 384) float16, their mask (N, MAX_TOKENS) bool, and the mean-pooled states of all
    tokens (N, 384), as the tower's forward gives them."""
    states = np.zeros((len(texts), MAX_TOKENS, TEXT_DIM), dtype=np.float16)
    masks = np.zeros((len(texts), MAX_TOKENS), dtype=bool)
    pooled = []
    for start in range(0, len(texts), batch):
        h, m = tower.token_states(list(texts[start:start + batch]), cache=False)
        t = min(h.shape[1], MAX_TOKENS)
        states[start:start + len(h), :t] = h[:, :t].float().cpu().numpy()
        masks[start:start + len(h), :t] = m[:, :t].bool().cpu().numpy()
        pooled.append(tower.pool(h, m))
    return states, masks, torch.cat(pooled) if pooled else torch.zeros(0, TEXT_DIM)
