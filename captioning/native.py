"""``native:<weights>``: pixquery's own attention-decoder captioner over the native image tower.

The weights file holds the decoder config, the tokenizer and fp16 weights (loads with
``torch.load(..., weights_only=True)``). The image tower is the native encoder's: when both run
in one indexing pass, the grid computed for the embedding is handed to :meth:`caption_grid`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from captioning.captioner import Captioner, CaptionerInfo, DecodeOptions
from captioning.decoding import beam_search
from captioning.model import CaptionDecoder, DecoderConfig
from captioning.tokenizer import WordTokenizer
from retrieval.errors import ModelLoadError
from retrieval.images import to_tensor
from retrieval.weights import resolve_weights, save_payload
from retrieval.native.towers import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, ImageTower

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_CAPTIONER = "effl0-sat-v1"
FORMAT = "pixquery-native-captioner/1"


def save_captioner(model: CaptionDecoder, tok: WordTokenizer, path: Path, meta: dict) -> None:
    """Config, tokenizer, fp16 weights and metadata in one ``weights_only``-loadable file."""
    save_payload({
        "format": FORMAT,
        "config": asdict(model.cfg),
        "tokenizer": tok.to_dict(),
        "state_dict": {k: v.detach().cpu().half().contiguous() if v.is_floating_point() else v.cpu()
                       for k, v in model.state_dict().items()},
        "meta": meta,
    }, path)


def load_captioner(path: Path) -> tuple[CaptionDecoder, WordTokenizer, dict, str]:
    """-> (decoder in float32, eval mode), tokenizer, metadata, sha256 of the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT:
            raise ValueError(f"format is {payload.get('format')!r}, expected {FORMAT!r}")
        model = CaptionDecoder(DecoderConfig(**payload["config"]))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
        tok = WordTokenizer.from_dict(payload["tokenizer"])
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable weight file
        raise ModelLoadError(f"{path} is not a pixquery native captioner file: {exc}") from exc
    return model.eval(), tok, payload.get("meta", {}), hashlib.sha256(path.read_bytes()).hexdigest()


class NativeCaptioner(Captioner):
    """Attention decoder over EfficientNet-Lite0 grid features (``native:effl0-sat-v1``)."""

    def __init__(self, spec: str = DEFAULT_CAPTIONER, device: torch.device | None = None,
                 image_tower: ImageTower | None = None) -> None:
        self.device = device or torch.device("cpu")
        path = resolve_weights(spec, WEIGHTS_DIR, "native captioner", "pixquery train captioner")
        self.model, self.tokenizer, self.meta, sha = load_captioner(path)
        self.model.to(self.device)
        name = f"native:{spec if path.parent == WEIGHTS_DIR else path.resolve()}"
        self.info = CaptionerInfo(name=name, weights_sha256=sha)
        self._image_tower = image_tower

    @property
    def image_tower(self) -> ImageTower:
        if self._image_tower is None:
            self._image_tower = ImageTower().to(self.device).to(memory_format=torch.channels_last).eval()
        return self._image_tower

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image, IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD)

    @torch.inference_mode()
    def caption_grid(self, grid: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        """(B, 1280, 7, 7) grid features -> B captions."""
        max_len = min(options.max_len, self.model.cfg.max_len - 1)
        seqs = beam_search(self.model, grid.float().to(self.device), self.tokenizer.bos_id, self.tokenizer.eos_id,
                           beam_size=options.beam_size, max_len=max_len, length_penalty=options.length_penalty,
                           no_repeat_ngram_size=options.no_repeat_ngram_size,
                           banned_ids=(self.tokenizer.unk_id, self.tokenizer.pad_id))
        return [self.tokenizer.decode(s) for s in seqs]

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        x = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.caption_grid(self.image_tower(x), options)
