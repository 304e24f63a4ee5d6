"""``native:<weights>``: pixquery's own attention-decoder captioner over the native image tower.

The weights file holds the decoder config, the tokenizer and fp16 weights (loads with
``torch.load(..., weights_only=True)``). The image tower is the native encoder's: when both run
in one indexing pass, the grid computed for the embedding is handed to :meth:`caption_grid`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from captioning.captioner import CaptionerInfo, DecodeOptions, GridCaptioner, TextScorer
from captioning.decoding import beam_search
from captioning.ensemble import DecoderEnsemble
from captioning.model import CaptionDecoder, DecoderConfig, sequence_log_likelihood
from captioning.tokenizer import DANGLING_WORDS, WordTokenizer
from retrieval.device import compute_dtype
from retrieval.errors import InputError, ModelLoadError
from retrieval.images import to_tensor
from retrieval.shipped import is_shipped, resolve_weights
from retrieval.weights import save_payload
from retrieval.native.towers import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, ImageTower

log = logging.getLogger(__name__)

DEFAULT_CAPTIONER = "effl0-sat-v4"  # retrieval/shipped.py
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


class Member(NamedTuple):
    """One decoder of a native captioner spec, as loaded."""

    name: str  # as recorded in provenance: the shipped name, or the resolved path
    weight: float
    decoder: CaptionDecoder
    tokenizer: WordTokenizer
    sha256: str


def parse_ensemble_spec(spec: str) -> list[tuple[str, float]]:
    """``spec`` -> [(weights name or path, weight)]: one member, or several joined by ``+``, each
    optionally ``@<weight>`` (default 1; weights are normalised to sum 1), e.g.
    ``effl0-sat-v4@0.6+effl0-sat-v1@0.4``. A spec that names an existing file is that one file."""
    if Path(spec).expanduser().is_file():
        return [(spec, 1.0)]
    out = []
    for part in spec.split("+"):
        name, sep, weight = part.rpartition("@")
        if not sep:
            name, weight = weight, ""
        name = name.strip()
        if not name:
            raise InputError(f"native captioner {spec!r}: empty name (decoders are joined by '+')")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise InputError(f"native captioner {spec!r}: weight {weight!r} of {name} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"native captioner {spec!r}: weight of {name} must be a positive number, got {weight}")
        out.append((name, value))
    return out


def load_members(spec: str) -> list[Member]:
    """Load every decoder that ``spec`` names (see :func:`parse_ensemble_spec`), in order."""
    members = []
    for part, weight in parse_ensemble_spec(spec):
        path = resolve_weights(part, "captioner")
        model, tok, _, sha = load_captioner(path)
        name = is_shipped(path) or str(path.resolve())
        members.append(Member(name, weight, model, tok, sha))
    return members


#: the native captioners' no-repeat n-gram size: no bigram twice, which stops SCST's "a man in a hat is
#: wearing a hat" and raised dev CIDEr (docs/BENCHMARKS.md)
NO_REPEAT_NGRAM = 2


def decode_captions(model: CaptionDecoder, tok: WordTokenizer, grid: torch.Tensor,
                    options: DecodeOptions = DecodeOptions()) -> list[str]:
    """Captions for grid (B, 1280, 7, 7) by beam search with ``options``: what ``pixquery caption``,
    indexing and every dev evaluation of a native model decode with."""
    max_len = min(options.max_len, model.cfg.max_len - 1)
    seqs = beam_search(model, grid, tok.bos_id, tok.eos_id, beam_size=options.beam_size, max_len=max_len,
                       length_penalty=options.length_penalty,
                       no_repeat_ngram_size=NO_REPEAT_NGRAM if options.no_repeat_ngram_size is None
                       else options.no_repeat_ngram_size,
                       banned_ids=(tok.unk_id, tok.pad_id),
                       no_end_after=tok.ids_of(DANGLING_WORDS) if options.complete_endings else ())
    return [tok.decode(s) for s in seqs]


class NativeCaptioner(GridCaptioner, TextScorer):
    """Attention decoder over EfficientNet-Lite0 grid features (``native:effl0-sat-v4``, the default).

    Runs in :func:`~retrieval.device.compute_dtype` (float32 on a CPU, bfloat16 on a GPU); beam
    scores, log-probabilities and stored memories are float32 whatever the decoder's dtype.
    """

    def __init__(self, spec: str = DEFAULT_CAPTIONER, device: torch.device | None = None,
                 image_tower: ImageTower | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.dtype = compute_dtype(self.device)
        members = load_members(spec)
        first = members[0]
        self.tokenizer = first.tokenizer
        if len(members) == 1:
            self.model = first.decoder
            self.info = CaptionerInfo(name=f"native:{first.name}", weights_sha256=first.sha256)
        else:
            for m in members[1:]:
                if m.tokenizer.to_dict() != self.tokenizer.to_dict():
                    raise ModelLoadError(f"native captioner {m.name} has another vocabulary than {first.name}; "
                                         f"an ensemble's decoders must share one tokenizer")
            try:
                self.model = DecoderEnsemble([m.decoder for m in members], [m.weight for m in members])
            except ValueError as exc:
                raise ModelLoadError(f"native captioner ensemble {spec!r}: {exc}") from exc
            weights = self.model.weights  # normalised to sum 1
            name = "+".join(f"{m.name}@{w:g}" for m, w in zip(members, weights))
            sha = hashlib.sha256(" ".join(f"{m.sha256}@{w!r}" for m, w in zip(members, weights)).encode())
            self.info = CaptionerInfo(name=f"native:{name}", weights_sha256=sha.hexdigest())
        self.model.to(self.device, self.dtype).eval()
        self._image_tower = image_tower
        self._scorer: tuple[CaptionDecoder, torch.dtype] | None = None  # see _scoring_model
        self.rater: CaptionDecoder | None = None  # a shallower decoder that rates texts (see use_rater)
        self.rater_info: CaptionerInfo | None = None

    @property
    def image_tower(self) -> ImageTower:
        if self._image_tower is None:
            self._image_tower = ImageTower().to(self.device, self.dtype).to(memory_format=torch.channels_last).eval()
        return self._image_tower

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image, IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD)

    @torch.inference_mode()
    def caption_grid(self, grid: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        """(B, 1280, 7, 7) grid features -> B captions."""
        return decode_captions(self.model, self.tokenizer, grid.to(self.device, self.dtype), options)

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        x = pixels.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.caption_grid(self.image_tower(x), options)

    # --- scoring a text against images: log P(text | image), for caption-conditioned ranking ---------
    @property
    def memory_shape(self) -> tuple[int, int]:
        """(S, D): what the decoder attends over for one image (49 grid cells x d_model)."""
        return self.model.cfg.grid_size ** 2, self.model.cfg.d_model

    @torch.inference_mode()
    def memory(self, grid: torch.Tensor) -> np.ndarray:
        """(B, 1280, 7, 7) grid -> (B, S * D) float32 decoder memory, flattened for a vector store."""
        return self.memory_tensor(grid).cpu().numpy()

    @torch.inference_mode()
    def memory_tensor(self, grid: torch.Tensor) -> torch.Tensor:
        """:meth:`memory` left on the device as a float32 tensor (the indexer codes it there)."""
        mem = self.model.encode(grid.to(self.device, self.dtype))  # (B, S, D)
        return mem.flatten(1).float()

    def use_rater(self, spec: str) -> bool:
        """Rate texts with the rater ``spec`` (a shipped name or a file of ``pixquery train rater``: fewer
        decoder layers distilled from this decoder, reading the same memories) -> whether it is used. A rater
        distilled from another scorer is left out with a warning; a file that cannot be read: ModelLoadError."""
        path = resolve_weights(spec.removeprefix("native:"), "rater")
        rater, tok, meta, sha = load_captioner(path)
        fits = (isinstance(self.model, CaptionDecoder) and meta.get("scorer_sha256") == self.info.weights_sha256
                and tok.to_dict() == self.tokenizer.to_dict() and rater.cfg.d_model == self.model.cfg.d_model)
        if not fits:
            log.warning("the rater %s was distilled from another scorer than %s; the scorer rates texts itself",
                        spec, self.info.name)
            return False
        self.rater = rater.to(self.device, self.dtype).eval()
        self.rater_info = CaptionerInfo(name=f"native:{is_shipped(path) or path.resolve()}", weights_sha256=sha)
        self._scorer = None
        return True

    @property
    def rating_decoder(self) -> CaptionDecoder:
        """The decoder whose log-likelihoods rate texts: the rater where one is used, else this decoder."""
        return self.rater if self.rater is not None else self.model

    def _scoring_model(self) -> tuple[CaptionDecoder, torch.dtype]:
        """The decoder that scores texts (:attr:`rating_decoder`) and its dtype: a bfloat16 copy, made once,
        where bfloat16 is fast (autocast would cast every weight again on every query: a third of the
        scoring time), else the decoder itself."""
        if self._scorer is None:
            model = self.rating_decoder
            if self.dtype != torch.float32:  # already in half precision (a GPU)
                self._scorer = (model, self.dtype)
            elif _fast_bf16(self.device):
                self._scorer = (copy.deepcopy(model).to(torch.bfloat16).eval(), torch.bfloat16)
            else:
                self._scorer = (model, torch.float32)
        return self._scorer

    @torch.inference_mode()
    def log_likelihood(self, memory: np.ndarray, texts: str | Sequence[str]) -> np.ndarray:
        """log P(text + <eos> | image) for N images given their (N, S * D) memory -> (N,).

        ``texts``: one text for every image, or one per image. A text is cleaned like the training
        captions (lower case, words only); words outside the vocabulary count as ``<unk>``; an empty
        text scores 0. Runs in bfloat16 where the CPU (or GPU) has fast bfloat16 matrix units.
        """
        n, texts = len(memory), self.texts_for(memory, texts)
        if not n:
            return np.zeros(0, dtype=np.float32)
        model, dtype = self._scoring_model()
        rows, empty = self.tokenizer.scoring_rows(texts, model.cfg.max_len)
        tokens = torch.tensor(rows, device=self.device)  # (N, T + 2): <bos> words <eos> <pad>...
        mem = torch.as_tensor(np.asarray(memory, dtype=np.float32), device=self.device)
        mem = mem.view(n, *self.memory_shape).to(dtype)  # (N, S, D)
        out = sequence_log_likelihood(model, mem, tokens, self.tokenizer.pad_id)
        return out.masked_fill(torch.tensor(empty, device=self.device), 0.0).cpu().numpy()


def _fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are native here (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
