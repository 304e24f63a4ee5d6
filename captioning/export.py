"""Export a native captioner's scorer for onnxruntime (``captioning/lite.py`` runs it without torch).

    scorer.onnx        (memory (N, S, D), tokens (N or 1, T + 2)) -> log P(tokens | memory) (N,): the decoder
                       run with teacher forcing, log-softmax, the tokens' log-probabilities summed over the
                       real (non-pad) positions, as :meth:`NativeCaptioner.log_likelihood` does (float32).
                       One row of tokens rates the same text against every memory: what the tokens do
                       before they first meet a memory (embedding, the first layer's self-attention and
                       cross-attention query) is then computed once, not once per memory
    scorer-int8.onnx   the same with 8-bit weights (what a search uses: about twice as fast on a CPU)
    scorer_vocab.json  the word tokenizer
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from captioning.model import Block, CaptionDecoder, sequence_log_likelihood
from retrieval.errors import ModelLoadError
from retrieval.native.onnx import export_module, graphs, linear_of


class _ScoringBlock(nn.Module):
    """One decoder :class:`Block` at inference, written for the exported graph: every projection its own
    ``Linear`` (a packed one exports as slices of one product), the attention scale folded into the query
    weights, keys laid out for the product (no transposes of their own). The same arithmetic as the block
    up to float rounding. Tokens x (N or 1, T, D) attend over memory (N, S, D) -> (N, T, D)."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        own, cross = block.self_attn, block.cross_attn
        d = own.proj.in_features
        self.heads = own.n_heads
        scale = 1.0 / math.sqrt(d // self.heads)
        w, b = own.qkv.weight.detach(), own.qkv.bias.detach()
        self.q, self.k, self.v = (linear_of(w[i * d:(i + 1) * d], b[i * d:(i + 1) * d], scale if i == 0 else 1.0)
                                  for i in range(3))
        w, b = cross.kv.weight.detach(), cross.kv.bias.detach()
        self.cross_q = linear_of(cross.q.weight.detach(), cross.q.bias.detach(), scale)
        self.cross_k, self.cross_v = linear_of(w[:d], b[:d]), linear_of(w[d:], b[d:])
        self.proj, self.cross_proj = copy.deepcopy(own.proj), copy.deepcopy(cross.proj)
        self.ln_self, self.ln_cross, self.ln_mlp, self.mlp = (copy.deepcopy(m) for m in (
            block.ln_self, block.ln_cross, block.ln_mlp, block.mlp))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(n, t, D) -> (n, H, t, Dh)."""
        n, t, d = x.shape
        return x.view(n, t, self.heads, d // self.heads).transpose(1, 2)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """(n, t, D) -> (n, H, Dh, t): laid out to multiply the queries by."""
        n, t, d = x.shape
        return x.view(n, t, self.heads, d // self.heads).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        t, d = x.shape[1], x.shape[2]
        h = self.ln_self(x)
        att = torch.softmax(self._heads(self.q(h)) @ self._keys(self.k(h)) + causal, dim=-1)  # (n, H, T, T)
        x = x + self.proj((att @ self._heads(self.v(h))).transpose(1, 2).reshape(x.shape[0], t, d))
        q = self._heads(self.cross_q(self.ln_cross(x)))  # (n, H, T, Dh)
        att = torch.softmax(q @ self._keys(self.cross_k(memory)), dim=-1)  # (N, H, T, S): one row of q serves all
        x = x + self.cross_proj((att @ self._heads(self.cross_v(memory))).transpose(1, 2).reshape(-1, t, d))
        return x + self.mlp(self.ln_mlp(x))  # (N, T, D)


class _LogLikelihood(nn.Module):
    """:func:`captioning.model.sequence_log_likelihood` of a :class:`CaptionDecoder` (eval mode), with
    :class:`_ScoringBlock` layers; tokens of one row are rated against every memory."""

    def __init__(self, decoder: CaptionDecoder, pad_id: int) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb, self.ln_f = (copy.deepcopy(m) for m in (decoder.tok_emb, decoder.pos_emb,
                                                                            decoder.ln_f))
        self.lm_head = copy.deepcopy(decoder.lm_head)
        self.blocks = nn.ModuleList(_ScoringBlock(block) for block in decoder.blocks)
        self.pad_id = pad_id

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`CaptionDecoder.decode`: memory (N, S, D), tokens (N or 1, T) -> logits (N, T, V)."""
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(t))  # (n, T, D)
        causal = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)  # (T, T): no looking ahead
        for block in self.blocks:
            x = block(x, memory, causal)  # (N, T, D) from the first block on
        return self.lm_head(self.ln_f(x))

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return sequence_log_likelihood(self, memory, tokens, self.pad_id)


def export_scorer(scorer, folder: Path) -> dict:  # noqa: ANN001 - NativeCaptioner
    """The decoder that rates texts (the scorer's rater where it has one, else the scorer's decoder; float32,
    and 8-bit) and the vocabulary -> the manifest's ``scorer`` part."""
    if not isinstance(scorer.model, CaptionDecoder):
        raise ModelLoadError(f"the scorer {scorer.info.name} is an ensemble; only a single decoder is exported")
    rating = scorer.rating_decoder
    decoder = copy.deepcopy(rating).float().cpu().eval()  # a float32 CPU copy: the live model stays as it is
    s, d = scorer.memory_shape
    tok = scorer.tokenizer
    example = (torch.randn(2, s, d), torch.tensor([[tok.bos_id, 5, 6, tok.eos_id]] * 2))
    export_module(_LogLikelihood(decoder, tok.pad_id).eval(), example, folder / "scorer.onnx",
                  {"memory": {0: "n"}, "tokens": {0: "rows", 1: "t"}}, {"log_likelihood": {0: "n"}}, "the scorer")
    (folder / "scorer_vocab.json").write_text(json.dumps(tok.to_dict()))
    rater = scorer.rater_info.to_dict() if scorer.rater_info is not None else None
    return {"info": scorer.info.to_dict(), "rater": rater, "memory_shape": [s, d], "max_len": rating.cfg.max_len,
            "files": graphs(folder, "scorer.onnx", "the scorer")}
