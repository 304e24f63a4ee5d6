"""Export a native captioner's scorer for onnxruntime (``captioning/lite.py`` runs it without torch).

    scorer.onnx        (memory (N, S, D), tokens (N, T + 2)) -> log P(tokens | memory) (N,): the decoder
                       run with teacher forcing, log-softmax, the tokens' log-probabilities summed over the
                       real (non-pad) positions, as :meth:`NativeCaptioner.log_likelihood` does (float32)
    scorer-int8.onnx   the same with 8-bit weights (what a search uses: about twice as fast on a CPU)
    scorer_vocab.json  the word tokenizer
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from captioning.model import CaptionDecoder, sequence_log_likelihood
from retrieval.errors import ModelLoadError
from retrieval.native.onnx import export_module, graphs


class _LogLikelihood(nn.Module):
    def __init__(self, decoder: CaptionDecoder, pad_id: int) -> None:
        super().__init__()
        self.decoder, self.pad_id = decoder, pad_id

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return sequence_log_likelihood(self.decoder, memory, tokens, self.pad_id)


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
                  {"memory": {0: "n"}, "tokens": {0: "n", 1: "t"}}, {"log_likelihood": {0: "n"}}, "the scorer")
    (folder / "scorer_vocab.json").write_text(json.dumps(tok.to_dict()))
    rater = scorer.rater_info.to_dict() if scorer.rater_info is not None else None
    return {"info": scorer.info.to_dict(), "rater": rater, "memory_shape": [s, d], "max_len": rating.cfg.max_len,
            "files": graphs(folder, "scorer.onnx", "the scorer")}
