"""open_clip CoCa captioners (``openclip:coca_<arch>/<pretrained tag or checkpoint path>``).

Specs follow :func:`retrieval.openclip_encoder.parse_spec`: ``coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k``
(an open_clip pretrained tag), ``coca_ViT-B-32//abs/coca.pt`` (a local checkpoint) or
``hf-hub:<org>/<repo>`` (config and weights from a Hub repo that must turn out to be a CoCa model).

image -> open_clip's eval transform -> pixels (3, H, W)
pixels (B, 3, H, W) -> model(pixels)["image_embs"] -> memory (B, N, W)
memory -> beam search of :mod:`captioning.decoding` (greedy is beam_size=1) over the CoCa text
          decoder, one step = text tower + multimodal decoder over the whole prefix -> logits (R, V)
       -> BPE ids -> tokenizer.decode -> caption

Why not ``CoCa.generate``: in open_clip 3.3.0 it needs ``transformers.BeamSearchScorer``, which
transformers 5 removed, so it fails with an assertion whatever the generation type. Reusing the
project's beam search also gives CoCa the same length penalty, n-gram ban and greedy-equals-beam-1
behaviour as the native captioner. CoCa's text tower has no key/value cache, so each step re-runs
the prefix (at most the model's context length of tokens; cheap next to the image tower).

open_clip is imported inside :meth:`CocaCaptioner.from_spec`, so importing this module is cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from PIL import Image

from captioning.captioner import Captioner, CaptionerInfo, DecodeOptions
from captioning.decoding import beam_search
from captioning.hf_captioner import TOKEN_SLACK
from retrieval.errors import InputError, ModelLoadError
from retrieval.openclip_encoder import load_open_clip, parse_spec

SOT, EOT = "<start_of_text>", "<end_of_text>"
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:]|'(?:s|t|re|ve|m|ll|d)\b)")


def clean_caption(text: str) -> str:
    """Decoded CLIP BPE text -> a caption: no start/end markers, single spaces, and no space before
    punctuation or a contraction (``"a dog 's ball ."`` -> ``"a dog's ball."``)."""
    text = text.split(EOT)[0].replace(SOT, "")
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))


@dataclass(frozen=True)
class _PrefixCache:
    """The stand-in for a key/value cache: the tokens fed so far, ``<start_of_text>`` first."""

    tokens: torch.Tensor  # (R, t)

    def reorder(self, index: torch.Tensor, cross: bool = True) -> _PrefixCache:
        """Row i of the result is row ``index[i]`` (beam reordering; ``cross`` is irrelevant here)."""
        return _PrefixCache(self.tokens.index_select(0, index))


class _CocaStepper:
    """A CoCa model seen through the decoder interface :func:`captioning.decoding.beam_search` uses:
    ``cfg.vocab_size``/``cfg.max_len``, ``encode``, ``init_cache``, ``step`` and the train/eval flag."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, context_length: int) -> None:
        self.model = model
        self.cfg = SimpleNamespace(vocab_size=vocab_size, max_len=context_length)  # max_len: token positions

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> _CocaStepper:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> _CocaStepper:
        self.model.train(mode)
        return self

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) -> image token embeddings (B, N, W) that the text decoder attends to."""
        return self.model(pixels)["image_embs"]

    def init_cache(self, memory: torch.Tensor) -> _PrefixCache:
        return _PrefixCache(memory.new_zeros((memory.shape[0], 0), dtype=torch.long))  # (R, 0)

    def step(
        self, tokens_last: torch.Tensor, memory: torch.Tensor, cache: _PrefixCache
    ) -> tuple[torch.Tensor, _PrefixCache]:
        """tokens_last (R, 1), memory (R, N, W) -> logits (R, V) for the next token, longer prefix."""
        tokens = torch.cat([cache.tokens, tokens_last], dim=1)  # (R, t+1)
        _, token_embs = self.model.text(tokens)  # (R, t+1, W), the pooled class token left out
        logits = self.model.text_decoder(memory, token_embs)  # (R, t+1, V)
        return logits[:, -1], _PrefixCache(tokens)  # (R, V)


class CocaCaptioner(Captioner):
    """An open_clip CoCa model behind the :class:`Captioner` interface (``openclip:coca_*``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Any,
        info: CaptionerInfo,
        device: torch.device,
    ) -> None:
        self.model = model.eval()
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        context = min(int(model.context_length), int(getattr(model.text, "context_length", model.context_length)))
        vocab_size = int(model.text_decoder.text_projection.shape[1])
        self._stepper = _CocaStepper(model, vocab_size, context)

    @classmethod
    def from_spec(
        cls,
        spec: str,
        device: torch.device | None = None,
        cache_dir: str | Path | None = None,
        offline: bool = False,
    ) -> CocaCaptioner:
        """Build the CoCa captioner for ``spec`` on ``device`` (already resolved; CPU when None).

        With ``offline`` nothing is downloaded: the weights must be a local file or in ``cache_dir``.
        A malformed spec, or an architecture not named ``coca*``, is an :class:`InputError`; every
        failure to build the model is a :class:`ModelLoadError` that says how to get the weights.
        """
        parsed = parse_spec(spec)
        if not parsed.is_hf_hub and not parsed.arch.lower().startswith("coca"):
            raise InputError(
                f"open_clip captioner 'openclip:{spec}' needs a CoCa architecture (coca_*), "
                f"e.g. 'openclip:coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k'; {parsed.arch} cannot write captions"
            )
        loaded = load_open_clip(spec, device or torch.device("cpu"), cache_dir, offline, parsed)
        import open_clip

        if not isinstance(loaded.model, open_clip.CoCa):
            raise ModelLoadError(
                f"'openclip:{spec}' is a {type(loaded.model).__name__}, not a CoCa model: it cannot write captions"
            )
        if not all(hasattr(loaded.tokenizer, a) for a in ("sot_token_id", "eot_token_id", "decode")):
            raise ModelLoadError(
                f"'openclip:{spec}' uses a {type(loaded.tokenizer).__name__}; pixquery captions only with "
                f"CoCa models that use open_clip's CLIP BPE tokenizer"
            )
        info = CaptionerInfo(name=loaded.name, weights_sha256=loaded.sha256)
        return cls(loaded.model, loaded.preprocess, loaded.tokenizer, info, loaded.device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)  # (3, H, W)

    def caption_pixels(self, pixels: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        """(B, 3, H, W) -> B captions, at most ``max_len`` + :data:`TOKEN_SLACK` BPE tokens each
        (capped by the model's context length)."""
        if pixels.shape[0] == 0:
            return []
        max_tokens = min(options.max_len + TOKEN_SLACK, self._stepper.cfg.max_len - 1)
        ids = beam_search(
            self._stepper,  # type: ignore[arg-type]  # duck-types CaptionDecoder
            pixels.to(self.device),
            bos_id=int(self.tokenizer.sot_token_id),
            eos_id=int(self.tokenizer.eot_token_id),
            beam_size=options.beam_size,
            max_len=max_tokens,
            length_penalty=options.length_penalty,
            no_repeat_ngram_size=options.no_repeat_ngram_size or 0,
        )  # B lists of BPE ids, without <start_of_text>/<end_of_text>
        return [clean_caption(self.tokenizer.decode(tokens)) for tokens in ids]
