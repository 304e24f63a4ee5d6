"""The one interface every captioner implements, and ``create_captioner`` that builds one by name.

Names:
* ``native:<weights>``: pixquery's own attention decoder over the native image tower's grid
  (``native:effl0-sat-v1`` shipped, or a path to a file written by ``pixquery train captioner``).
* ``hf:<model id or local folder>``: a Hugging Face image-to-text model (BLIP, GIT, VisionEncoderDecoder).
* ``openclip:coca_<arch>/<pretrained tag or checkpoint path>``: an open_clip CoCa model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from retrieval.errors import InputError


@dataclass(frozen=True)
class CaptionerInfo:
    """Provenance of a captioner, stored with every caption it writes."""

    name: str  # factory name, e.g. "native:effl0-sat-v1" or "hf:Salesforce/blip-image-captioning-base"
    weights_sha256: str

    @property
    def fingerprint(self) -> str:
        return f"{self.name}|{self.weights_sha256[:16]}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodeOptions:
    """How captions are decoded (applies to every captioner that can honour it)."""

    beam_size: int = 3
    max_len: int = 20  # words
    length_penalty: float = 1.0
    no_repeat_ngram_size: int | None = None  # 0: off; None: the captioner's own (2 for native, docs/BENCHMARKS.md)
    complete_endings: bool = True  # native captioners never end on a function word ("... through the")


class Captioner(ABC):
    """Writes one caption per image. ``preprocess`` runs on worker threads (PIL only);
    ``caption_pixels`` runs the model on ``device`` and returns one string per image; an empty
    string means "no caption" (the indexer never stores it)."""

    info: CaptionerInfo
    device: torch.device

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> (3, H, W) float tensor ready for :meth:`caption_pixels`."""

    @abstractmethod
    def caption_pixels(self, pixels: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        """(B, 3, H, W) -> B captions."""

    def caption_images(self, images: Sequence[Image.Image], options: DecodeOptions = DecodeOptions()) -> list[str]:
        if not images:
            return []
        return self.caption_pixels(torch.stack([self.preprocess(im) for im in images]), options)


def create_captioner(
    name: str,
    device: torch.device | None = None,
    cache_dir: str | Path | None = None,
    offline: bool = False,
) -> Captioner:
    """Build the captioner called ``name`` on ``device`` (already resolved; CPU when None)."""
    kind, sep, spec = (name or "").partition(":")
    if not sep or not spec:
        raise InputError(f"captioner name {name!r} must look like 'native:<weights>', 'hf:<model>' or 'openclip:coca_*'")
    device = device or torch.device("cpu")
    if kind == "native":
        from captioning.native import NativeCaptioner

        return NativeCaptioner(spec, device=device)
    if kind == "hf":
        from captioning.hf_captioner import HFCaptioner

        return HFCaptioner.from_spec(spec, device=device, cache_dir=cache_dir, offline=offline)
    if kind == "openclip":
        from captioning.coca_captioner import CocaCaptioner

        return CocaCaptioner.from_spec(spec, device=device, cache_dir=cache_dir, offline=offline)
    raise InputError(f"unknown captioner family {kind!r} in {name!r}: use native:, hf: or openclip:")
