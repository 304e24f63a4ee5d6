"""open_clip joint encoder: any open_clip architecture with pretrained or local weights.

Specs (the part after ``openclip:``):
* ``ViT-B-32/laion2b_s34b_b79k``: an architecture and an open_clip pretrained tag;
* ``ViT-B-32//abs/path/model.pt`` or ``ViT-B-32/~/ckpt.safetensors``: an architecture and a
  local checkpoint file;
* ``hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K``: config and weights from a Hugging Face repo.

image (B, 3, H, W) -> model.encode_image -> (B, D) -> L2 normalise
text  B strings -> tokenizer (B, T) -> model.encode_text -> (B, D) -> L2 normalise

open_clip is imported inside :meth:`OpenClipEncoder.from_spec`, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from retrieval.encoder import EncoderInfo, JointEncoder, l2_normalize
from retrieval.errors import InputError, ModelLoadError

HF_HUB_PREFIX = "hf-hub:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_HF_BLOB_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class OpenClipSpec:
    """A parsed ``openclip:`` spec."""

    arch: str  # "ViT-B-32", or "hf-hub:org/repo" (config and weights both come from the repo)
    pretrained: str | None  # a pretrained tag, or None for hf-hub specs
    checkpoint: Path | None  # set when the weights are a local file

    @property
    def is_hf_hub(self) -> bool:
        return self.arch.startswith(HF_HUB_PREFIX)


def looks_like_path(pretrained: str) -> bool:
    """True when ``pretrained`` names a checkpoint file rather than an open_clip tag."""
    return (
        "/" in pretrained
        or os.sep in pretrained
        or pretrained.startswith(("~", "."))
        or pretrained.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def parse_spec(spec: str) -> OpenClipSpec:
    """``<arch>/<tag or checkpoint path>`` or ``hf-hub:<org>/<repo>`` -> :class:`OpenClipSpec`."""
    spec = (spec or "").strip()
    if spec.startswith(HF_HUB_PREFIX):
        repo = spec[len(HF_HUB_PREFIX):].strip()
        if not repo or "/" not in repo or not all(part.strip() for part in repo.split("/")):
            raise InputError(f"open_clip spec {spec!r} must look like 'hf-hub:<org>/<repo>'")
        return OpenClipSpec(arch=HF_HUB_PREFIX + repo, pretrained=None, checkpoint=None)
    arch, sep, pretrained = spec.partition("/")
    arch, pretrained = arch.strip(), pretrained.strip()
    if not sep or not arch or not pretrained:
        raise InputError(
            f"open_clip spec {spec!r} must look like '<architecture>/<pretrained tag or checkpoint path>', "
            f"e.g. 'ViT-B-32/laion2b_s34b_b79k' or 'ViT-B-32//models/clip.pt' (or 'hf-hub:<org>/<repo>')"
        )
    checkpoint = Path(pretrained).expanduser() if looks_like_path(pretrained) else None
    return OpenClipSpec(arch=arch, pretrained=pretrained, checkpoint=checkpoint)


def set_offline() -> None:
    """Forbid Hugging Face downloads in this process, so only cached or local weights load.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, so an already imported copy is told too.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def file_sha256(path: Path) -> str:
    """sha256 of the file at ``path`` (following symlinks).

    A Hugging Face cache blob of an LFS file is named by that sha256, so it is read from the name
    instead of hashing gigabytes on every start.
    """
    real = path.resolve()
    if real.parent.name == "blobs" and _HF_BLOB_SHA256.fullmatch(real.name):
        return real.name
    digest = hashlib.sha256()
    with real.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_weights(open_clip: Any, spec: OpenClipSpec, cache_dir: str | None) -> Path:
    """The local file holding the weights for ``spec``, downloaded into ``cache_dir`` if needed.

    open_clip resolves the same file again (from the cache) when it builds the model; fetching it
    here first gives us its path to hash, and a clear error instead of a randomly initialised model
    when an hf-hub repo has no weights.
    """
    if spec.checkpoint is not None:
        if not spec.checkpoint.is_file():
            raise ModelLoadError(f"open_clip checkpoint {spec.checkpoint} does not exist")
        return spec.checkpoint
    from open_clip.pretrained import download_pretrained_from_hf

    if spec.is_hf_hub:
        return Path(download_pretrained_from_hf(spec.arch[len(HF_HUB_PREFIX):], cache_dir=cache_dir))
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise ModelLoadError(
            f"{spec.pretrained!r} is neither an open_clip pretrained tag for {spec.arch} "
            f"(known: {', '.join(tags) or 'none'}) nor a checkpoint path"
        )
    return Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir))


@dataclass
class LoadedOpenClip:
    """An open_clip model with its transforms and tokenizer, and where its weights came from."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str  # "openclip:<spec>", a local checkpoint by its resolved path ("./m.pt" and "/abs/m.pt" agree)
    sha256: str  # of the weights file
    device: torch.device
    cache: str | None


def load_open_clip(spec: str, device: torch.device, cache_dir: str | Path | None, offline: bool,
                   parsed: OpenClipSpec | None = None) -> LoadedOpenClip:
    """Build the open_clip model of ``spec`` (shared by the encoder and the CoCa captioner).

    With ``offline`` nothing is downloaded: the weights must be a local file or in ``cache_dir``.
    Every failure to build the model is a :class:`ModelLoadError` that says how to get the weights.
    """
    parsed = parsed or parse_spec(spec)
    cache = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
    if offline:
        set_offline()
    try:
        import open_clip

        if not parsed.is_hf_hub and parsed.arch not in open_clip.list_models():
            raise ModelLoadError(
                f"unknown open_clip architecture {parsed.arch!r}; open_clip.list_models() has the valid names"
            )
        weights = _fetch_weights(open_clip, parsed, cache)
        model, _, preprocess = open_clip.create_model_and_transforms(
            parsed.arch,
            pretrained=str(weights) if parsed.checkpoint is not None else parsed.pretrained,
            device=device,
            cache_dir=cache,
        )
        tokenizer = open_clip.get_tokenizer(parsed.arch, cache_dir=cache)
        sha = file_sha256(weights)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means the model cannot be used
        raise ModelLoadError(_load_failure(spec, cache, offline, exc)) from exc
    name = f"openclip:{parsed.arch}/{weights.resolve()}" if parsed.checkpoint is not None else f"openclip:{spec}"
    return LoadedOpenClip(model.eval(), preprocess, tokenizer, name, sha, device, cache)


class OpenClipEncoder(JointEncoder):
    """An open_clip model behind the :class:`JointEncoder` interface (``openclip:<spec>``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        info: EncoderInfo,
        device: torch.device,
    ) -> None:
        self.model = model.eval()
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self.info = info
        self.device = device

    @classmethod
    def from_spec(
        cls,
        spec: str,
        device: torch.device | None = None,
        cache_dir: str | Path | None = None,
        offline: bool = False,
    ) -> OpenClipEncoder:
        """Build the encoder for ``spec`` on ``device`` (already resolved; CPU when None).

        With ``offline`` nothing is downloaded: the weights must be a local file or in ``cache_dir``.
        Every failure to build the model is a :class:`ModelLoadError` that says how to get the weights.
        """
        loaded = load_open_clip(spec, device or torch.device("cpu"), cache_dir, offline)
        try:
            with torch.inference_mode():
                tokens = loaded.tokenizer([""]).to(loaded.device)
                dim = int(loaded.model.eval().encode_text(tokens).shape[-1])  # (1, D)
        except Exception as exc:  # noqa: BLE001 - a model that cannot encode text is unusable here
            raise ModelLoadError(_load_failure(spec, loaded.cache, offline, exc)) from exc
        info = EncoderInfo(name=loaded.name, weights_sha256=loaded.sha256, dim=dim)
        return cls(loaded.model, loaded.preprocess, loaded.tokenizer, info, loaded.device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)  # (3, H, W)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return l2_normalize(self.model.encode_image(pixels.to(self.device)))  # (B, 3, H, W) -> (B, D)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(list(texts)).to(self.device)  # (B, T)
        return l2_normalize(self.model.encode_text(tokens))  # (B, D)


def _load_failure(spec: str, cache_dir: str | None, offline: bool, exc: BaseException) -> str:
    """The message of a :class:`ModelLoadError`: what was asked, where we looked, how to fix it."""
    where = cache_dir or "the default Hugging Face cache ($HF_HOME/hub, or ~/.cache/clip for URL weights)"
    mode = "offline, so nothing was downloaded; " if offline else ""
    return (
        f"could not load open_clip model 'openclip:{spec}' ({mode}cache dir: {where}): {str(exc).rstrip('. ')}. "
        f"To get the weights, run once online with the same cache dir, or pass a local checkpoint "
        f"as 'openclip:<architecture>/<path to .pt/.safetensors>'"
    )
